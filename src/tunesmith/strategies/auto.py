"""`auto`: pick a strategy from the hardware, the model size, the number of examples and the class balance.

The rules, first match wins (the thresholds are the constants below):

| when | strategy | why |
|---|---|---|
| model >= 350M parameters | lora | full fine-tuning needs ~4x the weights' memory for AdamW; adapters train <1% |
| the smallest class has fewer than 20 training rows, or fewer than 100 rows in all; a text classifier on a sentence encoder (mean pooling) with 10 or more in every class and fewer than 64 a class on average | contrastive | SetFit's few-shot end: pairs of rows multiply the few labels (docs/strategies.md: above feature-extraction on 4 of the 5 such proxies, by 1.4 to 13 points; the fifth 0.7 below, within a seed's spread) |
| the same few rows otherwise | feature-extraction | fewer than 2 of that class reach the validation split: too few to tell whether moving the backbone helped; the head is the best logistic regression, fitted in seconds |
| CPU, model <= 50M parameters | full | a small model trains fully on a CPU (layer_decay 0.8 measured 0.4-1.2 points lower on Rotten Tomatoes at 1,000 rows) |
| CPU, larger model | freeze, last third of the blocks, layer_decay 0.8 | a CPU cannot afford backward through the whole model |
| GPU | full, layer_decay 0.9 | the usual best accuracy when compute is not the limit |

Every row below the feature-extraction row starts from a linear probe (LP-FT) and falls back on it
when fine-tuning ends below it on validation, so there the backbone is moved only where it
measurably helps. Contrastive has no such fallback (with a few validation rows a class the choice
would be noise, docs/strategies.md); from 100 rows and 20 a class, where `full` with LP-FT and a
soup takes over, contrastive's gain was not consistent across proxies. With `l2sp` or `replay` set
(forgetting guards need a backbone that trains on labels), the contrastive and feature-extraction rows
give way to the full / freeze rows. A task can declare a fixed choice
(`Task.auto_choice`: causal-lm takes LoRA), settled when the config is read. The choice and its
reason go into the run's config.yaml; keys of the user's config that do not apply to the chosen
strategy are dropped. This module is the one place `auto` is decided.
"""

from __future__ import annotations

import math

import torch

from typing import Any

from tunesmith.errors import UserError
from tunesmith.models.heads import mean_pooled_in_model
from tunesmith.registry import STRATEGIES
from tunesmith.strategies.base import BaseStrategy, ModelParts, ParamGroup

LARGE_MODEL = 350_000_000
SMALL_MODEL = 50_000_000
FEW_ROWS = 100
FEW_PER_CLASS = 20
CONTRASTIVE_MIN = 10  # where feature-extraction's rule holds, contrastive from this many training rows in every class
CONTRASTIVE_MAX_MEAN = 64  # ... while the classes average fewer training rows than this (not a rare class in a large set)


def decide(device_type: str, n_params: int, n_train: int, n_blocks: int | None, guards: bool,
           smallest_class: int | None = None, encoder_labels: int | None = None) -> tuple[dict, str]:
    """(strategy settings, one-line reason) for the table in the module doc; `smallest_class`: the training
    rows of the rarest class (None: not a classifier); `encoder_labels`: the label count of a text classifier
    on a sentence encoder (one that mean-pools), None for any other model."""
    gpu = device_type == "cuda"
    m = f"{n_params / 1e6:.0f}M-parameter model"
    if n_params >= LARGE_MODEL and not guards:
        return {"name": "lora"}, f"{m} (>= {LARGE_MODEL / 1e6:.0f}M): LoRA adapters train <1% of the weights and fit in memory"
    few_rows = n_train < FEW_ROWS
    if (few_rows or (smallest_class is not None and smallest_class < FEW_PER_CLASS)) and not guards:
        what = f"{n_train} training rows (< {FEW_ROWS})" if few_rows else (
            f"the smallest class has {smallest_class} training rows (< {FEW_PER_CLASS})")
        if encoder_labels and smallest_class is not None and smallest_class >= CONTRASTIVE_MIN and (
                n_train < CONTRASTIVE_MAX_MEAN * encoder_labels):
            return {"name": "contrastive"}, (
                f"{what} on a sentence encoder, {smallest_class} or more in every class (>= {CONTRASTIVE_MIN}): the "
                "few-shot end, where SetFit's contrastive pairs multiply the few labelled rows"
            )
        return {"name": "feature-extraction"}, (
            f"{what}: too few to tell on validation whether moving the backbone helps; "
            "the head is the best logistic regression on cached features"
        )
    if gpu:
        return {"name": "full", "layer_decay": 0.9}, f"GPU, {n_train} rows, {m}: full fine-tuning, lower layers at smaller rates"
    if n_params <= SMALL_MODEL or not n_blocks:
        return {"name": "full"}, f"CPU, {n_train} rows, small {m}: full fine-tuning"
    n = max(1, math.ceil(n_blocks / 3))
    return {"name": "freeze", "train_last_n": n, "layer_decay": 0.8}, (
        f"CPU, {n_train} rows, {m}: backward through all {n_blocks} blocks is too slow; train the last {n}"
    )


def choose(cfg: Any, parts: ModelParts, n_train: int, device: torch.device, smallest_class: int | None = None) -> Any:
    """At run time, with the model loaded: the strategy config `auto` resolves to."""
    n_params = sum(p.numel() for p in parts.model.parameters())
    try:
        n_blocks = len(parts.layers.blocks)
    except UserError:
        n_blocks = None
    guards = bool(cfg.l2sp or cfg.replay)
    encoder_labels = parts.model.config.num_labels if mean_pooled_in_model(parts.model) else None
    settings, reason = decide(device.type, n_params, n_train, n_blocks, guards, smallest_class, encoder_labels)
    raw = cfg.model_dump()
    raw.update({"train_last_n": None, "layer_decay": None}, **settings)
    raw["reason"] = reason
    return type(cfg).model_validate(_for(settings["name"], raw))


def _for(name: str, raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with name set and only the keys the named strategy reads (plus the common ones)."""
    own = set(STRATEGIES.get(name).Options.model_fields)
    common = {"name", "l2sp", "replay", "reason", "lp_ft", "soup"}
    return {k: v for k, v in {**raw, "name": name}.items() if k in own | common}


class Auto(BaseStrategy):
    """Placeholder so `auto` is a known name; the loop replaces it with the chosen strategy."""

    name = "auto"
    description = "picks a strategy from hardware, model size, row count and class balance; prints why"

    @classmethod
    def choose(cls, config: Any, parts: ModelParts, n_train: int, device: torch.device, smallest_class: int | None = None) -> Any:
        return choose(config, parts, n_train, device, smallest_class)

    @staticmethod
    def settle(strategy: dict[str, Any], task: Any) -> dict[str, Any]:
        """At config time: `auto` for a task that declares its choice becomes that strategy (raw keys in and out)."""
        if strategy.get("name") != "auto" or task.auto_choice is None:
            return strategy
        name, reason = task.auto_choice
        return _for(name, {**strategy, "reason": reason})

    def apply(self, parts: ModelParts) -> list[ParamGroup]:  # pragma: no cover - replaced before use
        raise RuntimeError("strategy 'auto' is resolved by the loop before apply()")
