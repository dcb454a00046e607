"""Data on disk (tunesmith.data.store): texts and token ids read back exactly, subsets share the file,
duplicate and overlap checks on 64-bit hashes, and reading a file does not hold its rows in memory."""

import csv
import tracemalloc

import numpy as np
import pytest

from tunesmith.config import DataConfig
from tunesmith.data.batching import Ragged
from tunesmith.data.store import Records, Spill, StoredStrings, encode, key_hash
from tunesmith.data.text import read_text_set
from tunesmith.validate import duplicates_and_conflicts

TEXTS = ["", "a", "héllo wörld", "\U0001f600 emoji", "bad byte \udcff kept", "x" * 10_000, "tab\tand\nnewline"]


def test_strings_round_trip_by_index_slice_take_and_iteration():
    s = StoredStrings(Records.write(Spill(), [encode(t) for t in TEXTS]))
    assert len(s) == len(TEXTS)
    assert [s[i] for i in range(len(s))] == TEXTS
    assert s[-1] == TEXTS[-1] and s[1:4] == TEXTS[1:4] and s[::2] == TEXTS[::2]
    assert list(s) == TEXTS
    sub = s.take([5, 0, 5, 2])
    assert list(sub) == [TEXTS[5], TEXTS[0], TEXTS[5], TEXTS[2]]
    assert sub.records.spill is s.records.spill  # a subset is offsets only, nothing copied
    with pytest.raises(IndexError):
        s[len(TEXTS)]


def test_records_merge_neighbouring_reads_but_keep_each_record():
    spill = Spill()
    rec = Records.write(spill, [bytes([i % 256]) * (i + 1) for i in range(300)])
    assert rec.range(0, 300) == [bytes([i % 256]) * (i + 1) for i in range(300)]
    back = rec.take(list(range(299, -1, -3)))  # reversed: no read can be merged
    assert back.range(0, len(back)) == [bytes([i % 256]) * (i + 1) for i in range(299, -1, -3)]
    other = Records.write(Spill(), [b"z" * 7])
    joined = Records.join([rec.take([1, 2]), other])
    assert joined.spill is spill and joined.range(0, 3) == [b"\x01" * 2, b"\x02" * 3, b"z" * 7]


def test_ragged_token_ids_on_disk():
    rows = [[101, 7, 102], [101, 102], list(range(50_000, 50_300)), [0]]
    r = Ragged.from_rows(rows)
    assert r.lengths == [3, 2, 300, 1]
    assert [x.tolist() for x in r] == rows and r[2].dtype == np.int32
    assert [x.tolist() for x in r.rows([3, 0])] == [[0], [101, 7, 102]]
    both = r.take([1]) + Ragged.from_rows([[5, 6]])
    assert [x.tolist() for x in both] == [[101, 102], [5, 6]]


def test_duplicates_and_conflicts_from_hashes():
    keys = np.array([key_hash(t) for t in ["a", "b", "a", "c", "a", "b"]], dtype=np.int64)
    assert duplicates_and_conflicts(keys, ["x", "y", "x", "x", "z", "y"]) == (3, 1)  # 'a' seen as x and z
    assert duplicates_and_conflicts(keys, [["p", "q"], ["p"], ["p", "q"], ["q"], ["p", "q"], ["q"]]) == (3, 1)
    assert duplicates_and_conflicts(np.zeros(0, np.int64), []) == (0, 0)
    assert key_hash("ab", "c") != key_hash("a", "bc") and key_hash("a", None) != key_hash("a", "")


def test_reading_a_large_file_streams_it(tmp_path):
    """40,000 rows of 250 characters (10 MB of text) read with under 3 MB of Python allocations at the
    peak: the rows go to disk as they are read, 40 bytes a row of index stay (benchmarks/bench_memory.py
    measures the whole run)."""
    path = tmp_path / "big.csv"
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "actor", "scene", "boring", "moving", "slow", "sharp"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(40_000):
            w.writerow([f"{i} " + " ".join(rng.choice(words, 40)), "pos" if i % 3 else "neg"])
    tracemalloc.start()
    try:
        s = read_text_set(str(path), DataConfig(train=str(path)), "train")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(s) == 40_000 and s.labels.count("neg") == 13_334
    assert s.texts[39_999].startswith("39999 ") and s.where[39_999] == f"{path}:40001"
    assert len(set(s.keys.tolist())) == 40_000
    assert peak < 3 * 2**20, f"reading held {peak / 2**20:.1f} MB"
