"""Strategies: which weights train and how fast. Each registers itself by name."""

from tunesmith.strategies.base import ParamGroup, Strategy, count_params
from tunesmith.strategies import full, head_only  # noqa: F401  (registers them)

__all__ = ["ParamGroup", "Strategy", "count_params"]
