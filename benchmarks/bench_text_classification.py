"""tunesmith vs the Hugging Face Trainer on the same model, data and budget, in one run.

    python benchmarks/bench_text_classification.py            # full table (about 10 minutes on 2 cores)
    python benchmarks/bench_text_classification.py --quick    # 500 train / 500 test rows
    python benchmarks/bench_text_classification.py --pooling cls   # both tools on a first-token (CLS) classifier

Same model (packaged MiniLM-L6), same data (Rotten Tomatoes snippets, 2,000 train / 2,000 held
out, seeded), batch 32, lr 5e-5, 1 epoch, max length 128. The Trainer gets every speed option a
careful user would set: dynamic padding, `train_sampling_strategy="group_by_length"`, and bf16 on
a CPU that runs bf16 fast (on one that does not, bf16 is far slower and is measured only with
--trainer-bf16). Each configuration runs in its own process so peak RSS is its own.
Prints samples/s of the training phase, peak RSS, held-out accuracy, and the achieved FLOP/s
as a fraction of this CPU's measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _matmul_peak(dtype_name: str) -> float:
    import torch

    from tunesmith.precision import cpu_bf16_is_fast

    dtype = getattr(torch, dtype_name)
    # An emulated bf16 matmul runs at ~1 GFLOP/s: measure it on a small size then.
    size = 2048 if dtype_name == "float32" or cpu_bf16_is_fast() or torch.cuda.is_available() else 256
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    n = 5
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * size**3 * n / (time.perf_counter() - t)


def _train_flops(model_path: str, train_csv: Path, max_length: int) -> float:
    """6 * non-embedding params * tokens + attention, for one epoch: the work any tool must do."""
    import csv

    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    with train_csv.open(encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_token = layers * (4 * h * h + 2 * h * inter) * 2  # forward multiply-adds x2
    attn = sum(layers * 2 * 2 * n * n * h for n in lengths)  # QK^T and PV, forward
    return 3 * (per_token * sum(lengths) + attn)  # backward ~ 2x forward


def run_trainer(args, train_csv: Path, test_csv: Path, bf16: bool) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from tunesmith.models import resolve_model

    torch.manual_seed(0)
    path = args.model_dir or str(resolve_model("minilm-l6").path)
    tok = AutoTokenizer.from_pretrained(path)

    def load(p: Path):
        import csv

        with p.open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        enc = tok([r["text"] for r in rows], truncation=True, max_length=args.max_length)
        labels = [0 if r["label"] == "fresh" else 1 for r in rows]
        return [
            {"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)
        ]

    train, test = load(train_csv), load(test_csv)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        num_train_epochs=getattr(args, "epochs", 1),
        warmup_steps=0.06,
        weight_decay=0.01,
        train_sampling_strategy="group_by_length",
        bf16=bf16,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        seed=0,
        dataloader_num_workers=0,
    )

    class ListDataset(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=ListDataset(train),
        data_collator=DataCollatorWithPadding(tok),
    )
    rss_before = _peak_rss_mb()
    t = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - t
    pred = trainer.predict(ListDataset(test))
    acc = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {
        "tool": "HF Trainer" + (" bf16" if bf16 else ""),
        "samples_per_s": len(train) / runtime,
        "runtime_s": runtime,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_train_mb": rss_before,
        "accuracy": acc,
    }


def run_tunesmith(args, train_csv: Path, test_csv: Path, out: Path) -> dict:
    import tunesmith

    result = tunesmith.train(
        {
            "task": "text-classification",
            "model": args.model_dir or "minilm-l6",
            "data": {"train": str(train_csv), "test": str(test_csv), "validation": str(test_csv)},
            # equal arithmetic: one plain fine-tuning pass, as the Trainer does (no LP-FT stage, no step floor)
            "strategy": {"name": "full", "lp_ft": False},
            "optim": {"lr": args.lr, "batch_size": args.batch_size, "epochs": 1, "min_steps": 0},
            "train": {"max_length": args.max_length, "precision": args.precision, "seed": 0, "fast_cpu_ops": not args.plain},
            "eval": {"before": False, "linear_probe": False, "every_epoch": False},
            "output_dir": str(out),
            "overwrite": True,
        },
        quiet=True,
    )
    tr = result.eval["train"]
    return {
        "tool": f"tunesmith ({tr['precision']}{', train.fast_cpu_ops=false' if args.plain else ''})",
        "samples_per_s": tr["samples_per_s"],
        "runtime_s": tr["runtime_s"],
        "peak_rss_mb": _peak_rss_mb(),
        "accuracy": result.eval["after"]["accuracy"],
    }


def child(args) -> None:
    data = Path(args.data_dir)
    train_csv, test_csv = data / "train.csv", data / "test.csv"
    if args.child == "trainer":
        res = run_trainer(args, train_csv, test_csv, bf16=False)
    elif args.child == "trainer-bf16":
        res = run_trainer(args, train_csv, test_csv, bf16=True)
    else:
        args.plain = args.child == "tunesmith-plain"
        res = run_tunesmith(args, train_csv, test_csv, data / "run")
    print("RESULT " + json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="500 train / 500 test rows")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--trainer-bf16", action="store_true", help="also run the Trainer with bf16=True")
    p.add_argument("--only", choices=["trainer", "trainer-bf16", "tunesmith", "tunesmith-plain"], action="append")
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="tunesmith's train.precision (fp32: the comparison an AVX2-only CPU gets, against the fp32 Trainer)")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"],
                   help="cls: the packaged MiniLM without its sentence-transformers pooling config, so tunesmith "
                   "classifies from the first token as the Trainer does (the model a hub BERT user brings)")
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.n_train = args.n_test = 500

    import torch

    from _rotten import write_split
    from tunesmith.models import resolve_model
    from tunesmith.precision import cpu_bf16_is_fast

    data = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    train_csv, _ = write_split(data, args.n_train, args.n_test)
    if args.pooling == "cls":  # the same weights, no pooling config: both tools classify from the first token
        packaged = resolve_model("minilm-l6").path
        args.model_dir = str(data / "minilm-cls")
        Path(args.model_dir).mkdir()
        for f in packaged.iterdir():
            if f.is_file() and f.name not in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
                (Path(args.model_dir) / f.name).symlink_to(f)
    fast_bf16 = torch.cuda.is_available() or cpu_bf16_is_fast()
    runs = args.only or (
        ["trainer", "trainer-bf16", "tunesmith-plain", "tunesmith"]
        if fast_bf16 or args.trainer_bf16
        else ["trainer", "tunesmith-plain", "tunesmith"]
    )
    results = []
    for name in runs:
        cmd = [sys.executable, __file__, "--child", name, "--data-dir", str(data)]
        cmd += ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--max-length", str(args.max_length),
                "--precision", args.precision] + (["--model-dir", args.model_dir] if args.model_dir else [])
        print(f"running {name} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"{name} failed")
        results.append(json.loads(line[0][7:]))

    flops = _train_flops(args.model_dir or str(resolve_model("minilm-l6").path), train_csv, args.max_length)
    peak32 = _matmul_peak("float32")
    peak16 = _matmul_peak("bfloat16")
    print(f"\nCPU matmul peak: float32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s (2048^2)")
    print(f"{args.n_train} train / {args.n_test} held-out rows, batch {args.batch_size}, 1 epoch, max length {args.max_length}\n")
    print("| tool | samples/s | train s | peak RSS MB | accuracy | GFLOP/s | of fp32 peak |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        gf = flops / r["runtime_s"]
        print(
            f"| {r['tool']} | {r['samples_per_s']:.1f} | {r['runtime_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['accuracy']:.4f} | {gf / 1e9:.0f} | {gf / peak32:.0%} |"
        )
    base = max((r for r in results if r["tool"].startswith("HF")), key=lambda r: r["samples_per_s"], default=None)
    ours = [r for r in results if r["tool"].startswith("tunesmith") and "fast_cpu_ops=false" not in r["tool"]]
    if base and ours:
        print(f"\ntunesmith / fastest Trainer: {ours[0]['samples_per_s'] / base['samples_per_s']:.2f}x samples/s")


if __name__ == "__main__":
    main()
