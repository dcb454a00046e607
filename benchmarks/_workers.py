"""Running one side of a benchmark in a fresh process: its RESULT line and its own peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_worker(argv: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """`python argv...` with output to `log` (a file, not a pipe: os.wait4 gives this child's own peak RSS);
    the dict its `RESULT {json}` line printed, with `peak_rss_mb` added. Exits with the log's tail if it fails."""
    with log.open("w") as fh:
        p = subprocess.Popen([sys.executable, *argv], stdout=fh, stderr=subprocess.STDOUT,
                             env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
        _, status, usage = os.wait4(p.pid, 0)
    out = log.read_text()
    if os.waitstatus_to_exitcode(status):
        print(out[-4000:])
        raise SystemExit(f"{log.stem} failed")
    r = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    r["peak_rss_mb"] = usage.ru_maxrss / 1024
    return r
