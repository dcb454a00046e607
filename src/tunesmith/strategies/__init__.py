"""Strategies: which weights train and how fast. The contract is
`tunesmith.strategies.base.BaseStrategy`; strategies are registered by name in
`tunesmith.registry.STRATEGIES` and imported when first asked for."""

from tunesmith.strategies.base import BaseStrategy, ParamGroup, StrategyOptions, TrainingView, count_params

__all__ = ["BaseStrategy", "ParamGroup", "StrategyOptions", "TrainingView", "count_params"]
