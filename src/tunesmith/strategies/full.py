"""`full`: every weight trains, at a low learning rate so the pre-trained features survive."""

from __future__ import annotations

from tunesmith.registry import STRATEGIES
from tunesmith.strategies.base import ModelParts, ParamGroup


@STRATEGIES.register("full")
class Full:
    name = "full"
    default_lr = 2e-5
    description = "every weight trains (low learning rate)"

    def __init__(self, config=None):
        self.config = config

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        for _, p in parts.model.named_parameters():
            p.requires_grad_(True)
        return [ParamGroup("backbone", parts.named("backbone")), ParamGroup("head", parts.named("head"))]
