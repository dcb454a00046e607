"""Name -> object registries for tasks, strategies and packaged models.

Each task or strategy registers itself next to its definition (``@STRATEGIES.register("full")``);
asking for an unknown name raises a :class:`~tunesmith.errors.UserError` that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from tunesmith.errors import UserError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        _load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                f"known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: Any) -> bool:
        _load_builtins()
        return name in self._entries


TASKS: Registry[Any] = Registry("task")
STRATEGIES: Registry[Any] = Registry("strategy")


def _load_builtins() -> None:
    # Importing the modules runs their @register decorators; done lazily to avoid import cycles.
    import tunesmith.strategies  # noqa: F401
    import tunesmith.tasks  # noqa: F401
