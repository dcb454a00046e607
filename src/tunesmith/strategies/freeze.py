"""`freeze`: train the top of the network only, or freeze parameters by name.

`train_last_n: N` trains the last N blocks, the layers above them (the neck: a pooler or final
norm) and the head; `freeze_patterns` freezes parameters whose names match glob patterns (on
top of `train_last_n`, or starting from everything trainable). Embeddings stay frozen unless
`freeze_embeddings: false`. Combines with `layer_decay`.
"""

from __future__ import annotations

from pydantic import Field

from tunesmith.errors import UserError
from tunesmith.strategies.base import BaseStrategy, LayerDecayOptions, ModelParts, ParamGroup, layer_param_groups, match_patterns


class FreezeOptions(LayerDecayOptions):
    train_last_n: int | None = Field(
        None, ge=0, description="freeze: train the last N blocks (plus the layers above them and the head); the rest stays frozen."
    )
    freeze_patterns: list[str] = Field(
        default_factory=list, description="freeze: also freeze parameters whose names match these glob patterns, e.g. '*.attention.*'."
    )
    freeze_embeddings: bool = Field(True, description="freeze / gradual-unfreeze: keep the embeddings frozen.")


class Freeze(BaseStrategy):
    name = "freeze"
    default_lr = 1e-4
    description = "train the last N blocks + head (train_last_n) or freeze by name (freeze_patterns)"
    Options = FreezeOptions
    probe_first = True

    @classmethod
    def check(cls, config) -> None:
        if config.train_last_n is None and not config.freeze_patterns:
            raise ValueError("strategy 'freeze' needs strategy.train_last_n (e.g. 2) or strategy.freeze_patterns")

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        cfg = self.config
        names = [n for n, _ in parts.model.named_parameters()]
        head = set(parts.head)
        if cfg.train_last_n is not None or cfg.layer_decay is not None:
            layers = parts.layers
            n_blocks = len(layers.blocks)
            embeddings = set(layers.embeddings)
        else:  # patterns only: no need to know the blocks
            layers, n_blocks = None, 0
            embeddings = {n for n in names if "embed" in n and n not in head}
        if cfg.train_last_n is not None:
            n = cfg.train_last_n
            if n > n_blocks:
                raise UserError(
                    f"strategy.train_last_n={n}, but {parts.model.__class__.__name__} has {n_blocks} blocks; "
                    f"use 0..{n_blocks} (or strategy full)"
                )
            train = head | {p for block in layers.blocks[n_blocks - n :] for p in block}
            if n:
                train |= set(layers.neck)
            if not cfg.freeze_embeddings:
                train |= embeddings
        else:
            train = set(names) - (embeddings if cfg.freeze_embeddings else set())
        for pattern, hits in match_patterns(names, cfg.freeze_patterns).items():
            if head & set(hits):
                raise UserError(f"strategy.freeze_patterns: '{pattern}' matches the new head ({sorted(head & set(hits))[0]}); the head always trains")
            train -= set(hits)
        for n, p in parts.model.named_parameters():
            p.requires_grad_(n in train)
        if layers is not None:
            groups = layer_param_groups(parts, cfg.layer_decay)
        else:
            groups = [ParamGroup("backbone", parts.named("backbone")), ParamGroup("head", parts.named("head"))]
        groups = [ParamGroup(g.name, [(n, p) for n, p in g.params if p.requires_grad], g.lr_scale) for g in groups]
        return [g for g in groups if g.params]
