"""The Python API, mirroring the CLI: `train`, `validate`, `evaluate`, `load`, `export`, `serve`.

The CLI parses arguments and prints; the work is here, and it goes through the same phases as a
training run (`tunesmith.loop.preflight` first), so `validate` accepts exactly what `train` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.config import Config, load_config
from tunesmith.errors import UserError
from tunesmith.runlock import check_not_failed
from tunesmith.loop import RunResult, preflight, run
from tunesmith.predict import load
from tunesmith.validate import DataReport


def _config(config: str | Path | dict[str, Any] | Config, overrides: list[str] | None, **kwargs: Any) -> Config:
    if isinstance(config, Config):
        config = config.to_dict()
    return load_config(config, overrides, **kwargs)


def train(config: str | Path | dict[str, Any] | Config, overrides: list[str] | None = None,
          quiet: bool = False, **kwargs: Any) -> RunResult:
    """Fine-tune as the config says; returns the run directory, resolved config and metrics.

    `config` is a YAML path, a dict, or a `Config`; overrides are dotted `key=value` strings
    (`["optim.lr=3e-5"]`) or keyword arguments with `__` for dots (`optim__lr=3e-5`).
    """
    return run(_config(config, overrides, **kwargs), quiet=quiet)


def validate(config: str | Path | dict[str, Any] | Config, overrides: list[str] | None = None,
             **kwargs: Any) -> DataReport:
    """The pre-flight report `train` runs first; a model that cannot be loaded is one of its errors."""
    _, _, report = preflight(_config(config, overrides, **kwargs), keep_going=True)
    return report


def show_tokens(config: str | Path | dict[str, Any] | Config, n: int, overrides: list[str] | None = None,
                **kwargs: Any) -> tuple[DataReport, list[Any], list[str]]:
    """The report, and the first `n` training examples as the model sees them (`validate --show-tokens`)."""
    task, _, report = preflight(_config(config, overrides, **kwargs))
    if not report.ok:
        return report, [], []
    views, layout = task.token_preview(n)
    return report, views, layout


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run directory's resolved config.yaml, as a dict."""
    import yaml

    p = Path(run_dir) / "config.yaml"
    check_not_failed(Path(run_dir))
    if not p.exists():
        raise UserError(f"{run_dir} is not a tunesmith run directory (no config.yaml)")
    return yaml.safe_load(p.read_text(encoding="utf-8"))


def evaluate(run_dir: str | Path, data: str) -> dict[str, Any]:
    """The task's metrics of a finished run on a labelled file read with the run's own data settings."""
    import torch

    from tunesmith.registry import TASKS
    from tunesmith.tasks.base import Runtime

    run_dir = Path(run_dir)
    raw = run_config(run_dir)
    cfg = load_config({**raw, "resume": False,
                       "data": {**raw["data"], "train": data, "validation": data, "test": data, "max_rows": None}})
    task = TASKS.get(cfg.task)(cfg)
    model = task.load_trained(run_dir / "model")
    enc = task.read_eval_set(data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return task.evaluate(model.to(device), enc, Runtime(device, batch_size=cfg.eval.batch_size))[0]


def export(run_dir: str | Path, format: str, output: str | Path | None = None, quantize: str | None = None,
           quiet: bool = True) -> dict[str, Any]:
    """`tunesmith export`: ONNX (classifiers; quantize None or "int8") or GGUF (Llama-family chat runs;
    quantize "f16" or "q8_0"), checked against PyTorch; returns what export.json holds."""
    if format == "onnx":
        from tunesmith.export_onnx import export_onnx

        if quantize not in (None, "int8"):
            raise UserError(f"--quantize {quantize} is for gguf; ONNX takes --quantize int8")
        return export_onnx(run_dir, output, quantize=quantize, quiet=quiet)
    if format == "gguf":
        from tunesmith.export_gguf import export_gguf

        return export_gguf(run_dir, output, quantize=quantize or "f16", quiet=quiet)
    raise UserError(f"format={format!r}: choose 'onnx' or 'gguf'")


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """`tunesmith serve`: run the HTTP server until interrupted (kwargs: name, onnx, quantized, limits)."""
    from tunesmith.serve import serve as run_server

    run_server(run_dir, host=host, port=port, **kwargs)


__all__ = ["train", "validate", "evaluate", "load", "export", "serve", "run_config", "RunResult"]
