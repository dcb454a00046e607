"""One run per output directory at a time, and room on its disk before training starts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO

from tunesmith.errors import UserError


def acquire(out: Path) -> IO[str] | None:
    """Hold an exclusive lock on out/.lock for the life of the run (released by the kernel if the
    process dies, even by SIGKILL: no stale locks to clean up by hand)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not guarded there
        return None
    f = open(out / ".lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{out} is in use by another tunesmith run (pid {pid}); wait for it to finish or choose another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def check_disk(out: Path, need_bytes: int, what: str) -> None:
    """Fail before training when the output disk cannot hold what the run will write."""
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise UserError(
            f"{out}: {free / 2**20:.0f} MB free on its disk, but {what} needs about {need_bytes / 2**20:.0f} MB; "
            "free some space or choose another output_dir"
        )


FAILED = "failed.json"  # in a run directory: the run stopped on this error (see loop.Recipe.mark_failed)


def check_not_failed(run_dir: Path) -> None:
    """A run directory whose run stopped on an error (failed.json, no model/) is refused with that error."""
    record = Path(run_dir) / FAILED
    if not record.exists() or (Path(run_dir) / "eval.json").exists():
        return
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    resume = "; resume it with tunesmith train CONFIG --resume" if info.get("checkpoint") else ""
    what = "was pruned by a sweep" if info.get("status") == "pruned" else "failed"
    raise UserError(f"the run in {run_dir} {what} at step {info.get('step', '?')} and holds no model: "
                    f"{str(info.get('error', 'see failed.json'))[:300]}{resume}")
