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


class Ragged:
    """Rows of token ids of different lengths, in one flat int32 array and its row offsets.

    4 bytes a token and two objects for a whole data set; a list of lists of Python ints (what a
    tokenizer returns) costs about 36 bytes a token and one object per token, so memory stayed
    tied to the corpus size (measured in benchmarks/bench_memory.py)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[int]]) -> "Ragged":
        rows = list(rows)
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    @classmethod
    def join(cls, parts: Sequence["Ragged"]) -> "Ragged":
        flat = np.concatenate([p.flat for p in parts]) if parts else np.zeros(0, np.int32)
        offsets = [np.zeros(1, np.int64)]
        base = 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return cls(flat, np.concatenate(offsets))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __add__(self, other: "Ragged") -> "Ragged":
        return Ragged.join([self, other])

    @property
    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    def take(self, idx: Sequence[int]) -> "Ragged":
        return Ragged.from_rows([self[i] for i in idx])


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
