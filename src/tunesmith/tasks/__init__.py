"""Tasks: what the model learns. The contract is `tunesmith.tasks.base.Task`; tasks are
registered by name in `tunesmith.registry.TASKS` and imported when first asked for."""

from tunesmith.tasks.base import Accumulator, Prepared, Runtime, Task

__all__ = ["Accumulator", "Prepared", "Runtime", "Task"]
