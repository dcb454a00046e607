"""Cached backbone features: what `feature-extraction` trains its head on.

A `Features` set stands in for a tokenized set in the loop: same `lengths`, `labels`,
`subset` and `__len__`, and its batches are `{"features": ...}` for the head alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Features:
    features: torch.Tensor  # (N, D) float32, the input of the model's head
    labels: torch.Tensor | None
    truncated: int = 0

    @property
    def lengths(self) -> list[int]:
        return [1] * len(self)

    def __len__(self) -> int:
        return self.features.shape[0]

    def subset(self, idx: list[int]) -> "Features":
        return Features(self.features[idx], self.labels[idx] if self.labels is not None else None)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = {"features": self.features[idx]}
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch
