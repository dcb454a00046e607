import pytest

from conftest import make_texts, write_csv, write_jsonl
from tunesmith.config import DataConfig
from tunesmith.data.batching import make_batches, pad_batch, shard
from tunesmith.data.readers import read_table
from tunesmith.data.text import read_text_set, stratified_split
from tunesmith.errors import UserError


def cfg(path, **kw):
    return DataConfig(train=str(path), **kw)


def test_all_formats_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_texts(20, seed=0)
    write_csv(tmp_path / "a.csv", rows)
    write_csv(tmp_path / "a.tsv", rows, delimiter="\t")
    write_jsonl(tmp_path / "a.jsonl", [{"text": t, "label": l} for t, l in rows])
    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [l for _, l in rows]}), tmp_path / "a.parquet")
    for ext in ("csv", "tsv", "jsonl", "parquet"):
        s = read_text_set(str(tmp_path / f"a.{ext}"), cfg(tmp_path / f"a.{ext}"), "train")
        assert list(s.texts) == [t for t, _ in rows] and s.labels == [l for _, l in rows], ext


def test_missing_column_lists_existing_columns(tmp_path):
    p = write_csv(tmp_path / "a.csv", make_texts(4, 0), header=("review", "label"))
    with pytest.raises(UserError, match=r"no column 'text' \(set by data.text_column\).*columns in the file: review, label"):
        read_text_set(str(p), cfg(p), "train")
    with pytest.raises(UserError, match="no column 'sentiment'"):
        read_text_set(str(p), cfg(p, text_column="review", label_column="sentiment"), "train")


def test_bad_rows_error_with_lines_or_skip_and_count(tmp_path):
    p = tmp_path / "a.jsonl"
    write_jsonl(p, [{"text": "good", "label": "a"}, {"text": "", "label": "b"}, {"text": 5, "label": "a"},
                    {"text": "fine", "label": None}, {"text": "ok", "label": "b"}])
    with pytest.raises(UserError) as e:
        read_text_set(str(p), cfg(p), "train")
    msg = str(e.value)
    assert msg.startswith("3 bad row(s)") and f"{p}:2: text is empty" in msg and f"{p}:3: text is int" in msg
    assert f"{p}:4: label is missing" in msg and "data.bad_rows=skip" in msg
    s = read_text_set(str(p), cfg(p, bad_rows="skip"), "train")
    assert len(s) == 2 and s.skipped == 3


def test_unreadable_files_name_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label"\n')
    with pytest.raises(UserError, match=rf"{p}:2: not valid JSON"):
        read_table(p)
    q = tmp_path / "b.csv"
    q.write_bytes(b"text,label\nok,a\n\xff\xfe bad,b\n")
    with pytest.raises(UserError, match=rf"{q}:3: not valid UTF-8"):
        read_table(q)
    r = tmp_path / "c.csv"
    r.write_text("text,label\nok,a\ntoo,many,fields\n")
    with pytest.raises(UserError, match=rf"{r}:3: 3 fields, but the header has 2"):
        read_table(r)
    with pytest.raises(UserError, match="unsupported file type '.xlsx'"):
        (tmp_path / "d.xlsx").write_text("x")
        read_table(tmp_path / "d.xlsx")
    with pytest.raises(UserError, match="does not exist"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(UserError, match="is empty"):
        read_table(tmp_path / "e.csv")


def test_bom_and_crlf_are_accepted(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes("\ufefftext,label\r\nhello,a\r\nworld,b\r\n".encode("utf-8"))
    s = read_text_set(str(p), cfg(p), "train")
    assert list(s.texts) == ["hello", "world"] and s.labels == ["a", "b"]


def test_multi_label_from_separator_and_lists(tmp_path):
    p = write_csv(tmp_path / "a.csv", [("x", "b|a"), ("y", "a")])
    s = read_text_set(str(p), cfg(p, label_separator="|"), "train")
    assert s.labels == [["a", "b"], ["a"]]
    q = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": ["b", "a"]}, {"text": "y", "label": [1]}])
    assert read_text_set(str(q), cfg(q), "train").labels == [["a", "b"], ["1"]]


def test_stratified_split_is_seeded_and_keeps_proportions(tmp_path):
    rows = make_texts(90, 0, classes=("a", "a", "b"))  # 60 a, 30 b
    p = write_csv(tmp_path / "a.csv", rows)
    s = read_text_set(str(p), cfg(p), "train")
    parts = stratified_split(s, {"validation": 0.1, "test": 0.2}, seed=3, multi_label=False)
    again = stratified_split(s, {"validation": 0.1, "test": 0.2}, seed=3, multi_label=False)
    assert list(parts["test"].texts) == list(again["test"].texts)
    assert sorted(len(p) for p in parts.values()) == [9, 18, 63]
    assert parts["test"].labels.count("a") == 12 and parts["test"].labels.count("b") == 6
    all_where = sorted(w for p in parts.values() for w in p.where)
    assert all_where == sorted(s.where)  # nothing lost, nothing twice


def test_class_too_small_to_split(tmp_path):
    p = write_csv(tmp_path / "a.csv", make_texts(20, 0) + [("the film", "rare"), ("the plot", "rare")])
    s = read_text_set(str(p), cfg(p), "train")
    with pytest.raises(UserError, match="class 'rare' has only 2 row.*at least 3"):
        stratified_split(s, {"validation": 0.1, "test": 0.1}, 0, False)


def test_length_grouped_batches_cover_each_index_once_with_less_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(1000)]
    grouped = make_batches(lengths, 32, seed=0, epoch=1)
    plain = make_batches(lengths, 32, seed=0, epoch=1, group_by_length=False)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert make_batches(lengths, 32, seed=0, epoch=2) != grouped  # a new order each epoch
    assert make_batches(lengths, 32, seed=0, epoch=1) == grouped  # and the same for the same seed

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    assert padded(grouped) < 1.1 * sum(lengths) < padded(plain)


def test_shard_and_pad():
    assert shard(list(range(7)), 0, 2) == [0, 2, 4, 6] and shard(list(range(7)), 1, 2) == [1, 3, 5]
    b = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
