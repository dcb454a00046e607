"""Every strategy on the packaged MiniLM and Rotten Tomatoes, at several training-set sizes.

    python benchmarks/bench_strategies.py                    # all sizes (about 45 minutes on 2 cores)
    python benchmarks/bench_strategies.py --sizes 300 --strategies full,lora   # a subset
    python benchmarks/bench_strategies.py --fixed-epochs     # the tables before the robust defaults

Fixed split (seeded): 1,000 held-out test rows, 300 validation rows, and the first N of a
4,000-row training pool for N in --sizes. Every strategy runs at its defaults (budget: 3 epochs
raised to optim.min_steps, LP-FT, validation each epoch with the best weights restored), batch
32, max length 128; `--fixed-epochs` gives every strategy the same epochs at a size instead,
min(10, max(2, ceil(3000 / N))), as the tables before the robust defaults did. Each run is its own
`tunesmith train` process, so peak RSS is its own. Learning rates are each strategy's default
unless the table says otherwise. "before" and "probe" are the starting model (its new head) and
the linear probe on the same test rows, measured by each run.

`feature-extraction` runs twice at each size: the first pass fills the cache, the second reads
it; "s/epoch" is the head's training time per epoch, which is what the cache buys against
`head-only` (which runs the frozen backbone on every step).
Writes the tables (Markdown) to --out and prints them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

STRATEGIES: dict[str, list[str]] = {
    "full": ["strategy.name=full"],
    "full + layer_decay 0.8": ["strategy.name=full", "strategy.layer_decay=0.8", "optim.lr=1e-4"],
    "full + l2sp 0.1": ["strategy.name=full", "strategy.l2sp=0.1"],
    "freeze (last 2 blocks)": ["strategy.name=freeze", "strategy.train_last_n=2"],
    "gradual-unfreeze": ["strategy.name=gradual-unfreeze"],
    "lora (r 8, query/value)": ["strategy.name=lora"],
    "lora + dora": ["strategy.name=lora", "strategy.lora.use_dora=true"],
    "lora all-linear": ["strategy.name=lora", "strategy.lora.target_modules=all-linear"],
    "lora all-linear + dora": ["strategy.name=lora", "strategy.lora.target_modules=all-linear", "strategy.lora.use_dora=true"],
    "head-only": ["strategy.name=head-only"],
    "feature-extraction": ["strategy.name=feature-extraction"],
    "feature-extraction (mlp)": ["strategy.name=feature-extraction", "strategy.head=mlp"],
    "auto": ["strategy.name=auto"],
}


def write_data(out: Path, seed: int = 0) -> dict[str, Path]:
    from tunesmith.demo import rotten_tomatoes_rows

    rows, _ = rotten_tomatoes_rows()
    random.Random(seed).shuffle(rows)
    parts = {"test": rows[:1000], "validation": rows[1000:1300], "pool": rows[1300:5300]}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in parts.items():
        p = out / f"{name}.csv"
        with p.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
        paths[name] = p
    return paths


def write_train(paths: dict[str, Path], n: int) -> None:
    """The first n rows of the pool: smaller training sets are prefixes of larger ones."""
    with paths["pool"].open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    p = paths["pool"].with_name(f"train_{n}.csv")
    with p.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows[: n + 1])
    paths[f"train_{n}"] = p


def epochs_for(n: int) -> int:
    return min(10, max(2, math.ceil(3000 / n)))


def run_one(work: Path, name: str, overrides: list[str], paths: dict[str, Path], n: int, cache: Path,
            fixed_epochs: bool = False) -> dict:
    out = work / "runs" / f"{n}-{name.split()[0]}-{abs(hash(name)) % 10_000}"
    budget = [f"optim.epochs={epochs_for(n)}", "optim.min_steps=0"] if fixed_epochs else []
    cmd = [
        sys.executable, "-m", "tunesmith", "train", str(work / "config.yaml"),
        f"data.train={paths[f'train_{n}']}", *budget,
        f"output_dir={out}", "--overwrite", "--quiet", *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                                                          "TUNESMITH_CACHE": str(cache)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        return {"strategy": name, "rows": n, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    ev = json.loads((out / "eval.json").read_text())
    cfg = (out / "config.yaml").read_text()
    trainable = ev["parameters"]["trainable_at_end"]
    feats = ev.get("features") or {}
    first_pass = sum(v["seconds"] for k, v in feats.items() if isinstance(v, dict) and not v.get("cached"))
    return {
        "strategy": name, "rows": n, "epochs": ev["train"]["epochs_run"], "steps": ev["train"]["steps"],
        "accuracy": ev["after"]["accuracy"], "macro_f1": ev["after"]["macro_f1"],
        "before": ev["before"]["accuracy"], "probe": (ev.get("linear_probe") or {}).get("accuracy"),
        "kept": (ev.get("kept_stage") or {}).get("stage"),
        "wall_s": wall, "train_s": ev["train"]["runtime_s"], "s_per_epoch": ev["train"]["runtime_s"] / max(ev["train"]["epochs_run"], 1),
        "peak_rss_mb": ev["train"]["peak_rss_mb"], "trainable": trainable,
        "feature_pass_s": first_pass if feats else None,
        "features_cached": all(v.get("cached") for v in feats.values() if isinstance(v, dict)) if feats else None,
        "chosen": ev["strategy"] if name == "auto" else None,
        "weights_moved": ev.get("weights_moved"),
        "reason": yaml.safe_load(cfg)["strategy"].get("reason"),
    }


def table(results: list[dict], n: int, fixed_epochs: bool = False) -> str:
    rows = [r for r in results if r["rows"] == n]
    lines = [
        f"#### {n} training rows ({f'{epochs_for(n)} epochs' if fixed_epochs else 'defaults'})", "",
        "| strategy | accuracy | macro-F1 | before | probe | kept | steps | wall s | train s/epoch | peak RSS MB | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | error: {r['error']} | | | | | | | | | |")
            continue
        name = r["strategy"] + (f" -> {r['chosen']}" if r.get("chosen") else "")
        if r.get("features_cached"):
            name += " (cache hit)"
        probe = f"{r['probe']:.3f}" if r.get("probe") is not None else "-"
        kept = {None: "-", "logistic regression": "regression"}.get(r.get("kept"), f"stage {r.get('kept')}")
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['before']:.3f} | {probe} | {kept} | {r['steps']} | "
            f"{r['wall_s']:.0f} | {r['s_per_epoch']:.2f} | {r['peak_rss_mb']:.0f} | {r['trainable']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,300,1000,4000")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated names from the table (prefix match)")
    ap.add_argument("--out", default="benchmarks/results/strategies.md")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--fixed-epochs", action="store_true", help="every strategy the same epochs at a size, no step floor")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="tunesmith-bench-"))
    paths = write_data(work / "data")
    (work / "config.yaml").write_text(json.dumps({
        "task": "text-classification", "model": "minilm-l6",
        "data": {"train": str(paths["pool"]), "validation": str(paths["validation"]), "test": str(paths["test"])},
        "optim": {"batch_size": 32}, "train": {"max_length": 128, "seed": 0},
        "eval": {"before": True, "linear_probe": True},
    }))
    wanted = [s.strip() for s in a.strategies.split(",") if s.strip()]
    chosen = [k for k in STRATEGIES if any(k.startswith(w) for w in wanted)]
    cache = work / "cache"
    results: list[dict] = []
    sizes = [int(s) for s in a.sizes.split(",")]
    for n in sizes:
        write_train(paths, n)
        for name in chosen:
            repeats = 2 if name.startswith("feature-extraction") and name == "feature-extraction" else 1
            for _ in range(repeats):
                r = run_one(work, name, STRATEGIES[name], paths, n, cache, a.fixed_epochs)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "weights_moved"}), flush=True)
    md = "\n".join(table(results, n, a.fixed_epochs) for n in sizes)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
