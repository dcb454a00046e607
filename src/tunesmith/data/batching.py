"""Batches of similar length, padded only to their own longest example.

Length grouping follows the megabatch scheme of the Hugging Face `LengthGroupedSampler`: shuffle,
cut into megabatches of `mega` batches, sort each megabatch by length, cut into batches, shuffle
the batch order. Padding drops to a few percent while every epoch still sees a new order.
Batches are *global*: under data parallelism every process builds the same list (same seed) and
takes its own slice of each batch, so results do not depend on the number of processes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from tunesmith.data.store import Records, RecordsBuilder, Spill


class Ragged:
    """Rows of token ids of different lengths, int32, kept on disk (`tunesmith.data.store`): 16 bytes a
    row stay in memory, the ids are read back a batch at a time. A list of lists of Python ints (what a
    tokenizer returns) costs about 36 bytes a token in memory, so a run's memory grew with the corpus
    (measured in benchmarks/bench_memory.py)."""

    def __init__(self, records: Records):
        self.records = records

    @classmethod
    def writer(cls, spill: Spill | None = None) -> "RaggedWriter":
        return RaggedWriter(spill or Spill(prefix="tokens-"))

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[int]], spill: Spill | None = None) -> "Ragged":
        w = cls.writer(spill)
        w.extend(rows)
        return w.done()

    @classmethod
    def join(cls, parts: Sequence["Ragged"]) -> "Ragged":
        return cls(Records.join([p.records for p in parts]))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(self.records.get(i), dtype=np.int32)

    def rows(self, idx: Sequence[int]) -> list[np.ndarray]:
        """Several rows, neighbours read together."""
        return [np.frombuffer(b, dtype=np.int32) for b in self.records.take(idx).range(0, len(idx))]

    def __iter__(self):
        return (np.frombuffer(b, dtype=np.int32) for b in self.records.blocks())

    def __add__(self, other: "Ragged") -> "Ragged":
        return Ragged.join([self, other])

    @property
    def lengths(self) -> list[int]:
        return (self.records.sizes // 4).tolist()

    def take(self, idx: Sequence[int]) -> "Ragged":
        return Ragged(self.records.take(idx))


class RaggedWriter:
    """Token id rows appended as they are tokenized (a chunk at a time)."""

    def __init__(self, spill: Spill):
        self.spill, self._out = spill, RecordsBuilder(spill)

    def extend(self, rows: Iterable[Sequence[int]]) -> None:
        for r in rows:
            self._out.append(np.asarray(r, dtype=np.int32).tobytes())

    def done(self) -> Ragged:
        return Ragged(self._out.done())


def make_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = True,
    mega: int = 50,
) -> list[list[int]]:
    idx = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(idx)
    if not group_by_length:
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    if not shuffle:  # evaluation: sort everything, order does not matter
        idx.sort(key=lambda i: -lengths[i])
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    size = batch_size * mega
    batches: list[list[int]] = []
    for start in range(0, len(idx), size):
        chunk = sorted(idx[start : start + size], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's part of a global batch (strided, so lengths stay balanced)."""
    return batch[rank::world]


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, extra: dict[str, Sequence[Sequence[int]]] | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad token ids to the longest sequence in the batch; attention_mask marks real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[row, : len(s)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    for name, seqs in (extra or {}).items():
        t = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            t[row, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        out[name] = t
    return out
