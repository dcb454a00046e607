"""A finished run's files, read after training, and the folders exports write beside it."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError


def run_settings(run: Path) -> dict[str, Any]:
    """The run's resolved config.yaml as a dict; {} for a folder that is not a run (a model directory)."""
    import yaml

    cfg_file = Path(run) / "config.yaml"
    if not cfg_file.exists():
        return {}
    return yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}


@contextlib.contextmanager
def export_folder(out: Path, what: str) -> Iterator[Path]:
    """A fresh folder beside `out` to write an export into; when the block ends without an error it
    replaces `out` (an earlier export of the same kind), otherwise it is removed and `out` is untouched.
    A folder that holds something else is refused before anything is written."""
    if out.exists() and not (out / "export.json").exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not an earlier {what} export; choose another --output")
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
