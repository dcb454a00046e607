"""The strategy protocol and parameter groups.

A strategy freezes what must not train and returns named parameter groups, each with an lr
scale. The optimizer is built from these groups in one place (`tunesmith.optim`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


@dataclass
class ParamGroup:
    name: str
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    lr_scale: float = 1.0

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


@dataclass
class ModelParts:
    """A model split into the pre-trained backbone and the newly initialised head."""

    model: nn.Module
    head: list[str]  # parameter names of the new head

    def named(self, which: str) -> list[tuple[str, nn.Parameter]]:
        head = set(self.head)
        return [(n, p) for n, p in self.model.named_parameters() if (n in head) == (which == "head")]


class Strategy(Protocol):
    name: str
    default_lr: float

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        """Freeze what does not train (requires_grad=False); return the groups that do."""
        ...


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total - trainable


def freeze(params: list[tuple[str, torch.nn.Parameter]]) -> None:
    for _, p in params:
        p.requires_grad_(False)
