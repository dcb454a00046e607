"""The Python API, mirroring the CLI: `train(config, **overrides)` and `load(run_dir)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.config import Config, load_config
from tunesmith.loop import RunResult, run
from tunesmith.predict import load


def train(config: str | Path | dict[str, Any] | Config, overrides: list[str] | None = None,
          quiet: bool = False, **kwargs: Any) -> RunResult:
    """Fine-tune as the config says; returns the run directory, resolved config and metrics.

    `config` is a YAML path, a dict, or a `Config`; overrides are dotted `key=value` strings
    (`["optim.lr=3e-5"]`) or keyword arguments with `__` for dots (`optim__lr=3e-5`).
    """
    if isinstance(config, Config):
        config = config.to_dict()
    return run(load_config(config, overrides, **kwargs), quiet=quiet)


__all__ = ["train", "load", "RunResult"]
