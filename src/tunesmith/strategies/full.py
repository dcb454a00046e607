"""`full`: every weight trains, at a low learning rate so the pre-trained features survive.

With `layer_decay` the learning rates are discriminative: the head gets `lr`, each block below
it `layer_decay` times the block above (ULMFiT's discriminative fine-tuning, BEiT/ELECTRA's
layer-wise decay).
"""

from __future__ import annotations

from tunesmith.strategies.base import BaseStrategy, LayerDecayOptions, ModelParts, ParamGroup, layer_param_groups, unfreeze


class Full(BaseStrategy):
    name = "full"
    default_lr = 2e-5
    description = "every weight trains (low learning rate); layer_decay for discriminative rates"
    Options = LayerDecayOptions
    probe_first = True

    def __init__(self, config=None):
        super().__init__(config)
        if config is not None and config.layer_decay is not None:
            # with layer decay `lr` is the head's rate: the lower blocks get the usual full rate
            self.default_lr = 1e-4

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        unfreeze(list(parts.model.named_parameters()))
        if self.config is not None and self.config.layer_decay is not None:
            return layer_param_groups(parts, self.config.layer_decay)
        groups = [ParamGroup("backbone", parts.named("backbone")), ParamGroup("head", parts.named("head"))]
        return [g for g in groups if g.params]  # a language model has no new head
