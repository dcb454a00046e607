"""Forgetting guards and the weights-moved report.

`Anchor` keeps the starting value of every pre-trained weight that may train. It serves
L2-SP (Li et al., 2018: penalise the distance from the pre-trained weights, not from zero) and
the end-of-run report of how far each layer group moved, as relative L2:
||w - w0|| / ||w0|| over the group's weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tunesmith.strategies.base import ModelParts


class Anchor:
    """Starting values of the pre-trained weights that may train.

    With L2-SP they are needed every step: a copy on the training device. Without it they are
    read once, at the end, for the moved report: straight from the checkpoint's safetensors
    files (memory-mapped, so no second copy of the model while training), falling back to a CPU
    copy for weights the checkpoint does not hold under a recognisable name.
    """

    def __init__(self, params: list[tuple[str, nn.Parameter]], group_of: dict[str, str], on_device: bool,
                 checkpoint_dir: Path | None = None, prefix: str = ""):
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.group_of = group_of
        self.files: dict[str, tuple[Path, str]] = {}
        if not on_device and checkpoint_dir is not None:
            self.files = _checkpoint_keys(checkpoint_dir, self.names, prefix)
            self._keep_exact_matches(params)
        self.start: list[torch.Tensor | None] = [
            None if n in self.files else (p.detach().clone() if on_device else p.detach().to("cpu", copy=True))
            for n, p in params
        ]

    @torch.no_grad()
    def _keep_exact_matches(self, params: list[tuple[str, nn.Parameter]]) -> None:
        """Only checkpoint tensors equal to the loaded weights count (renamed, converted or
        resized ones are copied instead); checked once, before training."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str, nn.Parameter]]] = {}
        for n, p in params:
            if n in self.files:
                path, key = self.files[n]
                by_file.setdefault(path, []).append((n, key, p))
        for path, items in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for n, key, p in items:
                    t = f.get_tensor(key)
                    if t.shape != p.shape or not torch.equal(t.to(p.dtype), p.detach().cpu()):
                        del self.files[n]

    def _start(self, i: int) -> torch.Tensor:
        s = self.start[i]
        if s is not None:
            return s
        from safetensors import safe_open

        path, key = self.files[self.names[i]]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    @torch.no_grad()
    def add_l2sp_grad_(self, strength: float) -> None:
        """grad += strength * (w - w0): the gradient of strength/2 * ||w - w0||^2, added once per
        optimizer step after the gradients of the window are complete (and all-reduced)."""
        pairs = [(p, s) for p, s in zip(self.params, self.start) if p.grad is not None and s is not None]
        if not pairs:
            return
        params, start = zip(*pairs)
        diff = torch._foreach_sub([p.detach() for p in params], list(start))
        torch._foreach_add_([p.grad for p in params], diff, alpha=strength)

    @torch.no_grad()
    def _squares(self) -> tuple[dict[str, float], dict[str, float]]:
        """Per layer group: sum of (w - w0)^2, sum of w0^2."""
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for i, (n, p) in enumerate(zip(self.names, self.params)):
            g = self.group_of.get(n, "backbone")
            s32 = self._start(i).float()
            num[g] = num.get(g, 0.0) + float((p.detach().to(s32.device, torch.float32) - s32).pow(2).sum())
            den[g] = den.get(g, 0.0) + float(s32.pow(2).sum())
        return num, den

    def distance(self) -> float:
        """||w - w0|| over all anchored weights."""
        return math.sqrt(sum(self._squares()[0].values()))

    def moved(self) -> dict[str, float]:
        """Relative L2 distance from the start, per layer group, bottom to top."""
        return relative_l2(*self._squares())


def relative_l2(num: dict[str, float], den: dict[str, float]) -> dict[str, float]:
    """sqrt(sum of squared changes) / sqrt(sum of squared start values), per group."""
    return {g: math.sqrt(num[g]) / math.sqrt(den[g]) if den[g] > 0 else 0.0 for g in num}


def _checkpoint_keys(directory: Path, names: list[str], prefix: str) -> dict[str, tuple[Path, str]]:
    """Parameter name -> (safetensors file, key), for names found in the checkpoint as they are
    or without the base-model prefix (a checkpoint saved from `BertModel` has no `bert.`)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    where[k] = f
        except Exception:  # an unreadable file: fall back to copies
            return {}
    out = {}
    for n in names:
        for key in (n, n.removeprefix(prefix + ".") if prefix else n):
            if key in where:
                out[n] = (where[key], key)
                break
    return out


def anchor_for(parts: "ModelParts", may_train: set[int], on_device: bool, checkpoint_dir: Path | None) -> Anchor | None:
    """The starting values of the pre-trained weights that may train (the new head is not anchored)."""
    model = parts.model
    head_ids = {id(p) for _, p in parts.params(parts.head)}
    anchored = [(n, p) for n, p in model.named_parameters() if id(p) in may_train and id(p) not in head_ids]
    if not anchored:
        return None
    return Anchor(anchored, parts.group_of(), on_device=on_device, checkpoint_dir=checkpoint_dir,
                  prefix=getattr(model, "base_model_prefix", ""))
