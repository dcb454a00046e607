"""AdamW and the learning-rate schedule, built from the strategy's parameter groups.

Biases and normalisation weights get no weight decay (the usual BERT/timm rule). Each group's lr
is the base lr times the group's `lr_scale`.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from tunesmith.config import OptimConfig
from tunesmith.strategies.base import ParamGroup


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def build_optimizer(groups: list[ParamGroup], cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    torch_groups = []
    for g in groups:
        # Every parameter a strategy lists, frozen or not: gradual unfreezing turns some on later,
        # and AdamW skips parameters without a gradient.
        decay = [p for n, p in g.params if not _no_decay(n, p)]
        plain = [p for n, p in g.params if _no_decay(n, p)]
        for params, wd in ((decay, cfg.weight_decay), (plain, 0.0)):
            if params:
                torch_groups.append({"params": params, "lr": lr * g.lr_scale, "weight_decay": wd, "name": g.name})
    # fused AdamW: one kernel over all tensors (CPU and CUDA) instead of a loop of small ops.
    return torch.optim.AdamW(torch_groups, lr=lr, betas=cfg.betas, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    warmup = min(warmup, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return LambdaLR(optimizer, factor)
