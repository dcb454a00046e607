"""Where tunesmith keeps what it computes once: converted packaged models, cached features."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def cache_root(configured: str | None = None) -> Path:
    """`configured`, else $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    return Path(configured or os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith")


def model_identity(model: Any) -> str:
    """What a cache of the model's outputs is keyed by: its directory, the files there (size, mtime), its config."""
    path = Path(str(getattr(model, "name_or_path", "") or ""))
    files = []
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file():
                st = f.stat()
                files.append((f.name, st.st_size, st.st_mtime_ns))
    if path.is_file():  # a weights file (timm architecture + model_file)
        st = path.stat()
        files.append((path.name, st.st_size, st.st_mtime_ns))
    cfg = model.config.to_dict() if hasattr(model, "config") else dict(getattr(model, "pretrained_cfg", None) or {})
    cfg = json.dumps({k: v for k, v in cfg.items() if k != "tunesmith_head"}, sort_keys=True, default=str)
    return json.dumps([str(path.resolve()) if str(path) else "", files, cfg])
