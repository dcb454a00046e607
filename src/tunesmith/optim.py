"""AdamW and the learning-rate schedule, built from the strategy's parameter groups.

Biases and normalisation weights get no weight decay (the usual BERT/timm rule). Each group's lr
is the base lr times the group's `lr_scale`. Schedules are transformers' (`get_scheduler`), by
the names users know from the HF Trainer; `constant` with a warmup is its `constant_with_warmup`.
They are `LambdaLR`s, so their state is a step count and resume is exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from tunesmith.config import OptimConfig
    from tunesmith.strategies.base import ParamGroup


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def group_lr(group: "ParamGroup", lr: float, head_lr: float | None) -> float:
    """A group's rate: `head_lr` for the group named "head" when given, else the base rate times its lr_scale."""
    return head_lr if head_lr is not None and group.name == "head" else lr * group.lr_scale


def build_optimizer(groups: list["ParamGroup"], cfg: "OptimConfig", lr: float, head_lr: float | None = None) -> torch.optim.AdamW:
    """`head_lr`: the rate of the group named "head" (a new head training beside pre-trained weights)."""
    torch_groups = []
    for g in groups:
        rate = group_lr(g, lr, head_lr)
        # Every parameter a strategy lists, frozen or not: gradual unfreezing turns some on later,
        # and AdamW skips parameters without a gradient.
        decay = [p for n, p in g.params if not _no_decay(n, p)]
        plain = [p for n, p in g.params if _no_decay(n, p)]
        for params, wd in ((decay, cfg.weight_decay), (plain, 0.0)):
            if params:
                torch_groups.append({"params": params, "lr": rate, "weight_decay": wd, "name": g.name})
    # fused AdamW: one kernel over all tensors (CPU and CUDA) instead of a loop of small ops.
    return torch.optim.AdamW(torch_groups, lr=lr, betas=cfg.betas, fused=True)


def warmup_steps(cfg: "OptimConfig", total_steps: int) -> int:
    """optim.warmup: a fraction of all steps if < 1, else a number of steps; never all of them."""
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    return min(warmup, max(total_steps - 1, 0))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: "OptimConfig", total_steps: int) -> LambdaLR:
    from transformers import get_scheduler

    warmup = warmup_steps(cfg, total_steps)
    name = "constant_with_warmup" if cfg.scheduler == "constant" and warmup else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))
