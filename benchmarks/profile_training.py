"""Where a tunesmith training step spends its time: torch.profiler over steady-state steps.

    .venv/bin/python benchmarks/profile_training.py [--rows 1280] [--steps 20] [--precision fp32]

The packaged MiniLM, `strategy: full` without LP-FT, batch 32, max length 128, lr 5e-5, on Rotten
Tomatoes rows (the text-classification benchmark's setting). The profiler starts after 5 warm-up
steps and records `--steps` optimizer steps, the data path, forward, backward and AdamW included.
Printed: the operators by self CPU time, and the whole window grouped into matrix products,
attention, dropout, normalisation and activations, embeddings, optimizer and the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GROUPS = [
    ("matrix products", ("addmm", "mm", "bmm", "matmul", "linear")),
    ("attention", ("scaled_dot_product", "_flash_attention", "softmax")),
    ("dropout", ("bernoulli", "dropout", "native_dropout")),
    ("layer norm, GELU", ("layer_norm", "gelu")),
    ("embeddings", ("embedding",)),
    ("optimizer", ("_fused_adamw", "adamw", "_foreach", "lerp", "addcdiv", "addcmul")),
    ("zeroing, copies", ("zero_", "fill_", "copy_", "clone", "contiguous", "to", "cat")),
]


from tunesmith.observers import Observer  # noqa: E402


class Profile(Observer):
    """An observer: profile optimizer steps warmup..warmup+steps."""

    def __init__(self, warmup: int, steps: int):
        import torch

        self.warmup, self.steps, self.seen = warmup, steps, 0
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def step_end(self, run) -> None:
        self.seen += 1
        if self.seen == self.warmup:
            self.prof.__enter__()
        elif self.seen == self.warmup + self.steps:
            self.prof.__exit__(None, None, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1280)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--json", default="profile_training.json")
    a = ap.parse_args()
    from _rotten import write_split

    from tunesmith.loop import run as run_training  # the loop itself: it takes observers

    import tunesmith

    tmp = Path(tempfile.mkdtemp(prefix="tunesmith-profile-"))
    write_split(tmp / "data", a.rows, 200, seed=0)
    cfg = tunesmith.load_config({
        "task": "text-classification", "model": "minilm-l6", "output_dir": str(tmp / "run"),
        "data": {"train": str(tmp / "data" / "train.csv"), "test": str(tmp / "data" / "test.csv")},
        "strategy": {"name": "full", "lp_ft": False},
        "optim": {"lr": 5e-5, "batch_size": 32, "epochs": 1, "min_steps": 0},
        "train": {"max_length": 128, "precision": a.precision, "eval_every": 0},
        "eval": {"linear_probe": False, "report": False},
    })
    prof = Profile(5, a.steps)
    run_training(cfg, quiet=True, observers=[prof])
    events = prof.prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]
    print(f"{a.steps} steps, {total / 1e6:.2f} s of operator time ({total / 1e6 / a.steps * 1000:.0f} ms a step)\n")
    print(f"{'operator':44} {'self CPU':>9} {'share':>6} {'calls':>7}")
    for e in rows:
        print(f"{e.key[:44]:44} {e.self_cpu_time_total / 1e6:8.2f}s {e.self_cpu_time_total / total:6.1%} {e.count:7d}")
    grouped: dict[str, float] = {}
    for e in events:
        name = e.key.removeprefix("aten::")
        group = next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")
        grouped[group] = grouped.get(group, 0.0) + e.self_cpu_time_total
    print("\ngrouped:")
    for g, t in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"  {g:24} {t / total:6.1%}")
    Path(a.json).write_text(json.dumps({"steps": a.steps, "ms_per_step": total / 1e3 / a.steps,
                                        "top": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                                                for e in rows],
                                        "groups": {g: t / total for g, t in grouped.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
