"""Forgetting guards and the weights-moved report.

`Anchor` keeps the starting value of every pre-trained weight that may train. It serves
L2-SP (Li et al., 2018: penalise the distance from the pre-trained weights, not from zero) and
the end-of-run report of how far each layer group moved, as relative L2:
||w - w0|| / ||w0|| over the group's weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Anchor:
    """Starting copies of the pre-trained weights that may train.

    On the training device when L2-SP needs them every step, else on the CPU (only read once at
    the end, and CPU memory is the cheaper place for a second copy).
    """

    def __init__(self, params: list[tuple[str, nn.Parameter]], group_of: dict[str, str], on_device: bool):
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.start = [p.detach().clone() if on_device else p.detach().to("cpu", copy=True) for p in self.params]
        self.group_of = group_of

    @torch.no_grad()
    def add_l2sp_grad_(self, strength: float) -> None:
        """grad += strength * (w - w0): the gradient of strength/2 * ||w - w0||^2, added once per
        optimizer step after the gradients of the window are complete (and all-reduced)."""
        pairs = [(p, s) for p, s in zip(self.params, self.start) if p.grad is not None]
        if not pairs:
            return
        params, start = zip(*pairs)
        diff = torch._foreach_sub([p.detach() for p in params], list(start))
        torch._foreach_add_([p.grad for p in params], diff, alpha=strength)

    @torch.no_grad()
    def distance(self) -> float:
        """||w - w0|| over all anchored weights."""
        total = 0.0
        for p, s in zip(self.params, self.start):
            total += float((p.detach().to(s.device, torch.float32) - s.float()).pow(2).sum())
        return math.sqrt(total)

    @torch.no_grad()
    def moved(self) -> dict[str, float]:
        """Relative L2 distance from the start, per layer group, bottom to top."""
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for n, p, s in zip(self.names, self.params, self.start):
            g = self.group_of.get(n, "backbone")
            s32 = s.float()
            num[g] = num.get(g, 0.0) + float((p.detach().to(s.device, torch.float32) - s32).pow(2).sum())
            den[g] = den.get(g, 0.0) + float(s32.pow(2).sum())
        return {g: math.sqrt(num[g]) / math.sqrt(den[g]) if den[g] > 0 else 0.0 for g in num}
