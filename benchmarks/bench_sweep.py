"""`tunesmith sweep`: how long a feature-extraction search takes, and how many full fine-tuning
trials the median pruner stops early. One run, side by side with what a user would write instead.

    .venv/bin/python benchmarks/bench_sweep.py [--trials 20] [--full-trials 9] [--full-rows 300] [--only fe|full]

Data: the demo's split of the Rotten Tomatoes snippets (4,000 train, 1,000 validation, 2,000 test,
seed 0), the packaged MiniLM.

1. feature-extraction sweep, 20 trials over the head's rate, weight decay, epochs and linear/MLP
   head; the features are computed once and cached (the first trial), every later trial trains
   a head on the cache. Against: the script a user writes without tunesmith: encode the three
   sets once with transformers (mean pooling, the model's own), then Optuna over scikit-learn's
   LogisticRegression C, 20 trials, chosen on validation.
2. full fine-tuning sweep on `--full-rows` training rows, over the learning rate and epochs: how
   many trials the median pruner stops early (target: at least a third).

Prints one JSON line per part and a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import tempfile
import time
from pathlib import Path


def demo_data(d: Path, train_rows: int = 4000) -> dict[str, str]:
    from tunesmith.demo import rotten_tomatoes_rows

    rows, _ = rotten_tomatoes_rows()
    random.Random(0).shuffle(rows)
    parts = {"test": rows[:2000], "validation": rows[2000:3000], "train": rows[3000 : 3000 + train_rows]}
    d.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with (d / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
    return {k: str(d / f"{k}.csv") for k in parts}


def fe_sweep(work: Path, trials: int) -> dict:
    import tunesmith

    data = demo_data(work / "data")
    cfg = {"task": "text-classification", "model": "minilm-l6", "data": data, "output_dir": str(work / "fe"),
           "strategy": {"name": "feature-extraction"}, "train": {"max_length": 128},
           "sweep": {"optim.lr": {"low": 1e-3, "high": 1e-1, "log": True}, "optim.weight_decay": {"low": 0.0, "high": 0.1},
                     "optim.epochs": {"low": 3, "high": 20}, "strategy.head": {"choices": ["linear", "mlp"]}}}
    t0 = time.perf_counter()
    summary = tunesmith.sweep(cfg, trials=trials, quiet=True)
    seconds = time.perf_counter() - t0
    best = json.loads((Path(summary["best"]["run"]) / "eval.json").read_text())
    return {"part": "feature-extraction sweep", "tool": "tunesmith sweep", "trials": len(summary["trials"]), "pruned": summary["pruned"],
            "seconds": round(seconds, 1), "best_validation_macro_f1": round(summary["best"]["value"], 4),
            "best_test_accuracy": round(best["after"]["accuracy"], 4), "best_params": summary["best"]["params"]}


def fe_by_hand(work: Path, trials: int) -> dict:
    """Encode once (transformers, mean pooling), then Optuna over LogisticRegression's C."""
    import numpy as np
    import optuna
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModel, AutoTokenizer

    from tunesmith.models.resolve import resolve_model

    t0 = time.perf_counter()
    data = demo_data(work / "data")
    path = str(resolve_model("minilm-l6", "text-classification").path)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def encode(file: str) -> tuple[np.ndarray, np.ndarray]:
        with open(file, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))[1:]
        out = []
        with torch.inference_mode():
            for i in range(0, len(rows), 64):
                b = tok([r[0] for r in rows[i : i + 64]], padding=True, truncation=True, max_length=128, return_tensors="pt")
                h, m = model(**b).last_hidden_state, b["attention_mask"].unsqueeze(-1).float()
                out.append(((h * m).sum(1) / m.sum(1)).numpy())
        return np.concatenate(out), np.array([r[1] for r in rows])

    (xtr, ytr), (xva, yva), (xte, yte) = (encode(data[k]) for k in ("train", "validation", "test"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial: optuna.Trial) -> float:
        clf = LogisticRegression(C=trial.suggest_float("C", 1e-3, 1e2, log=True), max_iter=2000).fit(xtr, ytr)
        return f1_score(yva, clf.predict(xva), average="macro")

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=trials)
    clf = LogisticRegression(C=study.best_params["C"], max_iter=2000).fit(xtr, ytr)
    return {"part": "feature-extraction sweep", "tool": "transformers + scikit-learn + Optuna by hand", "trials": trials,
            "seconds": round(time.perf_counter() - t0, 1), "best_validation_macro_f1": round(study.best_value, 4),
            "best_test_accuracy": round(accuracy_score(yte, clf.predict(xte)), 4), "best_params": study.best_params}


def full_sweep(work: Path, trials: int, rows: int) -> dict:
    import tunesmith

    data = demo_data(work / "data-full", train_rows=rows)
    cfg = {"task": "text-classification", "model": "minilm-l6", "data": data, "output_dir": str(work / "full"),
           "strategy": {"name": "full"}, "train": {"max_length": 64},
           "sweep": {"optim.lr": {"low": 1e-6, "high": 3e-4, "log": True}, "optim.epochs": {"low": 2, "high": 6}}}
    t0 = time.perf_counter()
    summary = tunesmith.sweep(cfg, trials=trials, quiet=True)
    return {"part": f"full fine-tuning sweep, {rows} rows", "tool": "tunesmith sweep", "trials": len(summary["trials"]),
            "pruned": summary["pruned"], "seconds": round(time.perf_counter() - t0, 1),
            "best_validation_macro_f1": round(summary["best"]["value"], 4), "best_params": summary["best"]["params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--full-trials", type=int, default=9)
    ap.add_argument("--full-rows", type=int, default=300)
    ap.add_argument("--only", choices=["fe", "full"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-sweep-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("TUNESMITH_CACHE", str(work / "cache"))  # a cold feature cache: the first trial pays for it
        results = []
        if a.only in (None, "fe"):
            for part in (fe_sweep(work, a.trials), fe_by_hand(work, a.trials)):
                print(json.dumps(part), flush=True)
                results.append(part)
        if a.only in (None, "full"):
            part = full_sweep(work, a.full_trials, a.full_rows)
            print(json.dumps(part), flush=True)
            results.append(part)
    print()
    print("| part | tool | trials | pruned | seconds | best validation macro-F1 | best's test accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['part']} | {r['tool']} | {r['trials']} | {r.get('pruned', '-')} | {r['seconds']} | "
              f"{r['best_validation_macro_f1']} | {r.get('best_test_accuracy', '-')} |")


if __name__ == "__main__":
    main()
