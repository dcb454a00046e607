"""Batches of similar length, padded only to their own longest example.

Length grouping follows the megabatch scheme of the Hugging Face `LengthGroupedSampler`: shuffle,
cut into megabatches of `mega` batches, sort each megabatch by length, cut into batches, shuffle
the batch order. Padding drops to a few percent while every epoch still sees a new order.
Batches are *global*: under data parallelism every process builds the same list (same seed) and
takes its own slice of each batch, so results do not depend on the number of processes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch


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
    sequences: list[list[int]], pad_id: int, extra: dict[str, list[list[int]]] | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad token ids to the longest sequence in the batch; attention_mask marks real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    for name, seqs in (extra or {}).items():
        t = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            t[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        out[name] = t
    return out
