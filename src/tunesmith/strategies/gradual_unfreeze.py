"""`gradual-unfreeze` (ULMFiT): start with the head, unfreeze one more block from the top each
epoch (or every `unfreeze_every` optimizer steps).

The optimizer holds every group from the start, so weights already training keep their AdamW
state when more blocks join; frozen weights have no gradient and AdamW skips them. The neck
(pooler, final norm) joins with the top block; the embeddings join last, and only with
`freeze_embeddings: false`. Combines with `layer_decay`.
"""

from __future__ import annotations

from pydantic import Field

from tunesmith.strategies.base import (
    BaseStrategy,
    LayerDecayOptions,
    ModelParts,
    ParamGroup,
    freeze,
    layer_param_groups,
    unfreeze,
)


class GradualUnfreezeOptions(LayerDecayOptions):
    unfreeze_every: int = Field(
        0, ge=0, description="gradual-unfreeze: unfreeze one more block every N optimizer steps; 0 = one more block each epoch."
    )
    freeze_embeddings: bool = Field(True, description="freeze / gradual-unfreeze: keep the embeddings frozen.")


class GradualUnfreeze(BaseStrategy):
    name = "gradual-unfreeze"
    default_lr = 1e-4
    description = "head first, then one more block from the top each epoch or every N steps (ULMFiT)"
    Options = GradualUnfreezeOptions
    probe_first = True
    needs_new_head = True  # it starts from the new head alone
    averages = False  # no model soup: a second run would start with every block already unfrozen

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        layers = parts.layers
        top_first = list(reversed(layers.blocks))
        # stage k trains the head plus stages[1..k]
        self.stages: list[tuple[str, list[tuple[str, object]]]] = [("head", parts.params(layers.head))]
        for i, block in enumerate(top_first):
            label = f"block {len(top_first) - 1 - i}"
            names = block + (layers.neck if i == 0 else [])
            self.stages.append((label + (" and the neck" if i == 0 and layers.neck else ""), parts.params(names)))
        if not self.config.freeze_embeddings and layers.embeddings:
            self.stages.append(("embeddings", parts.params(layers.embeddings)))
        freeze(list(parts.model.named_parameters()))
        unfreeze(self.stages[0][1])
        self.current = 0
        self.model = parts.model
        groups = layer_param_groups(parts, self.config.layer_decay)
        if self.config.freeze_embeddings:
            groups = [g for g in groups if g.name != "embeddings"]
        return groups

    def stage_for(self, step: int, epoch: int) -> int:
        every = self.config.unfreeze_every
        target = step // every if every else epoch - 1
        return min(target, len(self.stages) - 1)

    def update(self, step: int, epoch: int) -> str | None:
        target = self.stage_for(step, epoch)
        if target <= self.current:
            return None
        joined = []
        for k in range(self.current + 1, target + 1):
            unfreeze(self.stages[k][1])
            joined.append(self.stages[k][0])
        self.current = target
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return f"unfroze {', '.join(joined)} after {step} step(s) of this stage: {trainable:,} parameters train"
