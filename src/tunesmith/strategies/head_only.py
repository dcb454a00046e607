"""`head-only`: the pre-trained backbone is frozen; only the new head trains (higher lr).

Frozen modules are also kept in eval mode by the loop, so dropout and batch-norm statistics in
the backbone do not change.
"""

from __future__ import annotations

from tunesmith.registry import STRATEGIES
from tunesmith.strategies.base import ModelParts, ParamGroup, freeze


@STRATEGIES.register("head-only")
class HeadOnly:
    name = "head-only"
    default_lr = 1e-3
    description = "backbone frozen, only the new head trains"

    def __init__(self, config=None):
        self.config = config

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        freeze(parts.named("backbone"))
        head = parts.named("head")
        for _, p in head:
            p.requires_grad_(True)
        return [ParamGroup("head", head)]
