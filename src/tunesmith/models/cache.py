"""Where tunesmith keeps what it computes once: converted packaged models, cached features."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(configured: str | None = None) -> Path:
    """`configured`, else $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    return Path(configured or os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith")
