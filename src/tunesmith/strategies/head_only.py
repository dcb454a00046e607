"""`head-only`: the pre-trained backbone is frozen; only the new head trains (higher lr).

The frozen backbone still runs forward on every step; `feature-extraction` runs it once and
caches its output instead. Frozen modules are kept in eval mode by the loop, so dropout and
batch-norm statistics in the backbone do not change.
"""

from __future__ import annotations

from tunesmith.strategies.base import BaseStrategy, ModelParts, ParamGroup, freeze, unfreeze


class HeadOnly(BaseStrategy):
    name = "head-only"
    default_lr = 1e-3
    description = "backbone frozen, only the new head trains (backbone runs every step)"
    trains_backbone = False
    needs_new_head = True
    guards = frozenset()
    no_guard_reason = "the pre-trained weights do not move, nothing can be forgotten"

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        freeze(parts.named("backbone"))
        head = parts.named("head")
        unfreeze(head)
        return [ParamGroup("head", head)]
