"""Strategies: which weights train and how fast. Each registers itself by name."""

from tunesmith.strategies.base import BaseStrategy, ParamGroup, count_params
from tunesmith.strategies import (  # noqa: F401  (registers them)
    auto,
    feature_extraction,
    freeze,
    full,
    gradual_unfreeze,
    head_only,
    lora,
)

__all__ = ["BaseStrategy", "ParamGroup", "count_params"]
