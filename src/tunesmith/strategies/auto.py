"""`auto`: pick a strategy from the hardware, the model size and the number of examples.

The rules, first match wins (the thresholds are the constants below):

| when | strategy | why |
|---|---|---|
| model >= 350M parameters | lora | full fine-tuning needs ~4x the weights' memory for AdamW; adapters train <1% |
| fewer than 1,000 rows on a CPU, or fewer than 300 on a GPU | feature-extraction | too few rows to move a backbone safely; the backbone runs once and the head trains in seconds |
| CPU, model <= 50M parameters | full, layer_decay 0.8 | a small model trains fully on a CPU; lower layers move less |
| CPU, larger model | freeze, last third of the blocks, layer_decay 0.8 | a CPU cannot afford backward through the whole model |
| GPU | full, layer_decay 0.9 | the usual best accuracy when compute is not the limit |

With `l2sp` or `replay` set (forgetting guards need a backbone that trains), the first two rows
give way to the full / freeze rows. A task can declare a fixed choice (`Task.auto_choice`:
causal-lm takes LoRA), settled when the config is read. The choice and its reason go into the
run's config.yaml; keys of the user's config that do not apply to the chosen strategy are dropped.
This module is the one place `auto` is decided.
"""

from __future__ import annotations

import math

import torch

from typing import Any

from tunesmith.errors import UserError
from tunesmith.registry import STRATEGIES
from tunesmith.strategies.base import BaseStrategy, ModelParts, ParamGroup

LARGE_MODEL = 350_000_000
SMALL_MODEL = 50_000_000
FEW_ROWS_CPU = 1000
FEW_ROWS_GPU = 300


def decide(device_type: str, n_params: int, n_train: int, n_blocks: int | None, guards: bool) -> tuple[dict, str]:
    """(strategy settings, one-line reason) for the table in the module doc."""
    gpu = device_type == "cuda"
    m = f"{n_params / 1e6:.0f}M-parameter model"
    if n_params >= LARGE_MODEL and not guards:
        return {"name": "lora"}, f"{m} (>= {LARGE_MODEL / 1e6:.0f}M): LoRA adapters train <1% of the weights and fit in memory"
    few = FEW_ROWS_GPU if gpu else FEW_ROWS_CPU
    if n_train < few and not guards:
        return {"name": "feature-extraction"}, (
            f"{n_train} training rows (< {few} on {'a GPU' if gpu else 'a CPU'}): too few to move the backbone safely; "
            "it runs once and the head trains on cached features"
        )
    if gpu:
        return {"name": "full", "layer_decay": 0.9}, f"GPU, {n_train} rows, {m}: full fine-tuning, lower layers at smaller rates"
    if n_params <= SMALL_MODEL or not n_blocks:
        return {"name": "full", "layer_decay": 0.8}, f"CPU, {n_train} rows, small {m}: full fine-tuning, lower layers at smaller rates"
    n = max(1, math.ceil(n_blocks / 3))
    return {"name": "freeze", "train_last_n": n, "layer_decay": 0.8}, (
        f"CPU, {n_train} rows, {m}: backward through all {n_blocks} blocks is too slow; train the last {n}"
    )


def choose(cfg: Any, parts: ModelParts, n_train: int, device: torch.device) -> Any:
    """At run time, with the model loaded: the strategy config `auto` resolves to."""
    n_params = sum(p.numel() for p in parts.model.parameters())
    try:
        n_blocks = len(parts.layers.blocks)
    except UserError:
        n_blocks = None
    guards = bool(cfg.l2sp or cfg.replay)
    settings, reason = decide(device.type, n_params, n_train, n_blocks, guards)
    raw = cfg.model_dump()
    raw.update({"train_last_n": None, "layer_decay": None}, **settings)
    raw["reason"] = reason
    return type(cfg).model_validate(_for(settings["name"], raw))


def _for(name: str, raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with name set and only the keys the named strategy reads (plus the common ones)."""
    own = set(STRATEGIES.get(name).Options.model_fields)
    common = {"name", "l2sp", "replay", "reason", "lp_ft"}
    return {k: v for k, v in {**raw, "name": name}.items() if k in own | common}


class Auto(BaseStrategy):
    """Placeholder so `auto` is a known name; the loop replaces it with the chosen strategy."""

    name = "auto"
    description = "picks a strategy from hardware, model size and row count; prints why"

    @classmethod
    def choose(cls, config: Any, parts: ModelParts, n_train: int, device: torch.device) -> Any:
        return choose(config, parts, n_train, device)

    @staticmethod
    def settle(strategy: dict[str, Any], task: Any) -> dict[str, Any]:
        """At config time: `auto` for a task that declares its choice becomes that strategy (raw keys in and out)."""
        if strategy.get("name") != "auto" or task.auto_choice is None:
            return strategy
        name, reason = task.auto_choice
        return _for(name, {**strategy, "reason": reason})

    def apply(self, parts: ModelParts) -> list[ParamGroup]:  # pragma: no cover - replaced before use
        raise RuntimeError("strategy 'auto' is resolved by the loop before apply()")
