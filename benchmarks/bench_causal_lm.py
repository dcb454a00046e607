"""tunesmith vs TRL's SFTTrainer: LoRA chat tuning of SmolLM2-135M-Instruct on chatterbot Q/A.

    pip install -e ".[trl]"      # TRL and its `datasets` dependency, for this benchmark only
    python benchmarks/bench_causal_lm.py [--steps 16] [--only tunesmith,trl-packing]

Same model (the packaged SmolLM2-135M-Instruct, float32), same data (every chatterbot-corpus
English topic as chat JSONL, `tunesmith sample-data chatterbot DIR --topics all`), same LoRA
(r 16, alpha 32, dropout 0.05, all seven linear layers of every block), batch 8, sequence length
256, learning rate 5e-4 linear without warmup, loss on assistant tokens only, the same number of
optimizer steps. TRL runs twice: without packing (dynamic padding) and with packing (its default
best-fit-decreasing strategy, which turns on its padding-free path). Each run is a fresh
process; the table reports

- tokens/s: non-padding tokens through the model per second of the training steps;
- peak RSS: the process's peak resident memory (ru_maxrss), model loading included;
- held-out loss: mean loss per assistant token on the test split, computed for every run by the
  same code (tunesmith's causal-lm evaluation, examples packed without cross-attention).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _workers import run_worker

LORA = dict(r=16, alpha=32, dropout=0.05, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
BATCH, LENGTH, LR = 8, 256, 5e-4
MICRO = 4  # tunesmith runs each batch of 8 as two micro-batches of 4 (train.micro_batch_size): same update, less memory
RUNS = ["tunesmith", "trl", "trl-packing"]
# SmolLM2's own template with the `{% generation %}` markers TRL's assistant_only_loss needs: it
# renders the same text, and marks what tunesmith trains (the answer and its <|im_end|>).
TRL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def held_out_loss(model, data_dir: Path) -> float:
    """The test split's loss per trained token, by tunesmith's own preparation and evaluation (any model)."""
    import torch

    from tunesmith.config import load_config
    from tunesmith.loop import preflight
    from tunesmith.tasks.base import Runtime

    task, _, report = preflight(load_config(_tunesmith_config(data_dir, "/tmp/unused", 1)))
    assert report.ok, report.errors
    enc = task.encode(task.load_data().test)
    return task.evaluate(model, enc, Runtime(torch.device("cpu"), batch_size=16))[0]["loss"]


def _tunesmith_config(data_dir: Path, out: str, steps: int) -> dict:
    return {
        "task": "causal-lm", "model": "smollm2-135m",
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                 "test": str(data_dir / "test.jsonl")},
        "strategy": {"name": "lora", "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                                              "target_modules": LORA["targets"]}},
        "optim": {"lr": LR, "batch_size": BATCH, "epochs": 100, "max_steps": steps, "warmup": 0, "scheduler": "linear"},
        "train": {"max_length": LENGTH, "seed": 0, "precision": "fp32", "checkpoint_epochs": False, "micro_batch_size": MICRO},
        "eval": {"before": False, "every_epoch": False},
        "lm": {"packing": True, "too_long": "skip", "forgetting": None, "samples": 0},
        "output_dir": out, "overwrite": True,
    }


def run_tunesmith(data_dir: Path, steps: int) -> dict:
    from tunesmith import train

    with tempfile.TemporaryDirectory() as tmp:
        res = train(_tunesmith_config(data_dir, tmp, steps), quiet=True)
        t = res.eval["train"]
        return {"tokens_per_s": t["tokens_per_s"], "steps": t["steps"], "train_s": t["runtime_s"],
                "held_out_loss": res.eval["after"]["loss"]}


def run_trl(data_dir: Path, steps: int, packing: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models import resolve_model

    path = resolve_model("smollm2-135m").path
    tok = AutoTokenizer.from_pretrained(path)
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(probe, tokenize=False) == tok.apply_chat_template(probe, tokenize=False, chat_template=TRL_TEMPLATE)
    tok.chat_template = TRL_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [json.loads(l) for l in (data_dir / "train.jsonl").read_text().splitlines() if l.strip()]
    ds = Dataset.from_list(rows)
    counted = {"tokens": 0}
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.setdefault("start", time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            clock["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
            lr_scheduler_type="linear", warmup_steps=0, logging_steps=max(1, steps // 4), save_strategy="no",
            report_to=[], max_length=LENGTH, packing=packing, assistant_only_loss=True, use_cpu=True,
            dataloader_num_workers=0, seed=0, bf16=False, fp16=False, disable_tqdm=True,
        )
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["targets"], task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                             callbacks=[Clock()])
        collate = trainer.data_collator

        def counting(batch):
            out = collate(batch)
            if "attention_mask" in out:
                counted["tokens"] += int(out["attention_mask"].sum())
            else:  # padding-free: one flattened row, no padding
                counted["tokens"] += int(out["input_ids"].numel())
            return out

        trainer.data_collator = counting
        trainer.train()
        seconds = clock["end"] - clock["start"]
        loss = held_out_loss(trainer.model, data_dir)
    return {"tokens_per_s": counted["tokens"] / seconds, "steps": steps, "train_s": seconds, "held_out_loss": loss}


def worker(name: str, data_dir: Path, steps: int) -> None:
    if name == "tunesmith":
        r = run_tunesmith(data_dir, steps)
    else:
        r = run_trl(data_dir, steps, packing=name == "trl-packing")
    print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--only", default=",".join(RUNS))
    ap.add_argument("--data", help="chatterbot chat JSONL folder (default: written to a temporary folder)")
    ap.add_argument("--json", default="bench_out/causal_lm.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, Path(a.data), a.steps)
        return
    import importlib.util

    if any(n.startswith("trl") for n in a.only.split(",")) and importlib.util.find_spec("trl") is None:
        raise SystemExit('TRL is not installed: pip install -e ".[trl]" (or run with --only tunesmith)')
    tmp = tempfile.mkdtemp()
    data = Path(a.data) if a.data else Path(tmp) / "chatterbot"
    if not a.data:
        from tunesmith.datasets import write_chatterbot

        write_chatterbot(data, ["all"])
    from tunesmith.models import resolve_model

    resolve_model("smollm2-135m")  # convert once, outside the timed runs
    results = {}
    for name in a.only.split(","):
        r = results[name] = run_worker([__file__, "--worker", name, "--data", str(data), "--steps", str(a.steps)],
                                       Path(tmp) / f"{name}.log")
        print(f"{name:<12} {r['tokens_per_s']:7.1f} tokens/s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
              f"held-out loss {r['held_out_loss']:.4f}  ({r['steps']} steps, {r['train_s']:.0f} s)", flush=True)
    best_trl = max((r["tokens_per_s"] for n, r in results.items() if n.startswith("trl")), default=None)
    if "tunesmith" in results and best_trl:
        t = results["tunesmith"]
        fastest = max((n for n in results if n.startswith("trl")), key=lambda n: results[n]["tokens_per_s"])
        print(f"tunesmith / fastest TRL ({fastest}): {t['tokens_per_s'] / best_trl:.2f}x tokens/s, "
              f"peak RSS {t['peak_rss_mb'] / results[fastest]['peak_rss_mb']:.2f}x, "
              f"held-out loss {t['held_out_loss'] / results[fastest]['held_out_loss'] - 1:+.1%}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"steps": a.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
