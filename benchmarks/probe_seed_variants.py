"""A recipe variant against the defaults on one proxy over several seeds: per-seed test accuracy and the
validation curve, then the mean and spread. The variants the robust-defaults issue measured on rt-1000
(docs/strategies.md, "Targets ... not met"):

    .venv/bin/python benchmarks/probe_seed_variants.py                               # auto at its defaults
    .venv/bin/python benchmarks/probe_seed_variants.py --set strategy.soup=1         # one fine-tuning run, no model soup
    .venv/bin/python benchmarks/probe_seed_variants.py --soup-best                   # a soup of the runs' best steps
    .venv/bin/python benchmarks/probe_seed_variants.py --ema 0.95                    # weight EMA, validated and kept
    .venv/bin/python benchmarks/probe_seed_variants.py --set train.metric=loss       # best step by validation loss
    .venv/bin/python benchmarks/probe_seed_variants.py --set eval.every_epoch=false  # the last weights
    .venv/bin/python benchmarks/probe_seed_variants.py --proxy digits-20pc --strategy full

`--ema D` is an experiment, not a tunesmith option: it patches the loop so that after every optimizer step
an exponential moving average of the trainable weights is updated (decay min(D, (1+t)/(10+t)), timm's
warm-up), and validation (hence the best copy and the stage choice) sees the averaged weights. It does
not survive a resume. One `tunesmith.train` per seed, about 50 s each for rt-1000 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import bench_defaults as bd  # noqa: E402


def patch_ema(decay: float) -> None:
    from tunesmith import loop

    build, finish, validate = loop.Recipe.build_optimizer, loop.Recipe.finish_step, loop.Recipe.validate

    def build_optimizer(self):
        build(self)
        self.ema, self.ema_t = None, 0

    def finish_step(self, window, epoch):
        step = self.state.step
        due = finish(self, window, epoch)
        if self.state.step > step:  # a step was taken (not skipped)
            params = [p.detach() for _, p in self.trainable_params if p.requires_grad]
            with torch.no_grad():
                if self.ema is None:
                    self.ema = [p.clone() for p in params]
                else:
                    self.ema_t += 1
                    torch._foreach_lerp_(self.ema, params, 1 - min(decay, (1 + self.ema_t) / (10 + self.ema_t)))
        return due

    def validate_averaged(self):
        if getattr(self, "ema", None) is None:
            return validate(self)
        params = [p for _, p in self.trainable_params if p.requires_grad]
        with torch.no_grad():
            raw = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, self.ema)
        validate(self)
        with torch.no_grad():
            torch._foreach_copy_(params, raw)

    loop.Recipe.build_optimizer, loop.Recipe.finish_step, loop.Recipe.validate = build_optimizer, finish_step, validate_averaged


def patch_soup_best() -> None:
    """The model soup as it was before 2026-12-06 evening: each run restored to its best validation step before
    it joins the soup (the default now averages the runs' last weights)."""
    from tunesmith import loop

    def restore_best(self):
        if self.best_state is not None:
            self.load_weights(self.best_state, moving=True)

    loop.Recipe.restore_best = restore_best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proxy", default="rt-1000", choices=sorted(bd.PROXIES))
    p.add_argument("--strategy", default="auto")
    p.add_argument("--seeds", default="0,1,2,3,4,5")
    p.add_argument("--ema", type=float, default=0.0, help="decay of a weight EMA (0: off)")
    p.add_argument("--soup-best", action="store_true", help="a soup of the runs' best validation steps (before 2026-12-06 evening)")
    p.add_argument("--set", nargs="*", default=[], help="dotted key=value overrides, e.g. optim.lr=5e-5")
    args = p.parse_args()
    if args.ema:
        patch_ema(args.ema)
    if args.soup_best:
        patch_soup_best()
    import tunesmith

    root = Path(tempfile.mkdtemp(prefix="tunesmith-seeds-"))
    base = bd.PROXIES[args.proxy](root)
    accs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = root / f"seed-{seed}"
        cfg = bd.merge(base, {"strategy": {"name": args.strategy}, "output_dir": str(out), "overwrite": True})
        t = time.perf_counter()
        ev = tunesmith.train(cfg, args.set + [f"train.seed={seed}"], quiet=True).eval
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
        accs.append(ev["after"]["accuracy"])
        print(json.dumps({"seed": seed, "accuracy": round(ev["after"]["accuracy"], 4), "macro_f1": round(ev["after"]["macro_f1"], 4),
                          "probe_macro_f1": round((ev.get("linear_probe") or {}).get("macro_f1", float("nan")), 4),
                          "kept_stage": ev.get("kept_stage"), "validation": [(e["step"], round(e["macro_f1"], 3)) for e in evals],
                          "s": round(time.perf_counter() - t)}), flush=True)
    print(f"{args.proxy} {args.strategy} ema={args.ema}{' soup-best' if args.soup_best else ''} set={' '.join(args.set) or '-'}: mean accuracy "
          f"{statistics.mean(accs):.4f}, sd {statistics.pstdev(accs):.4f} over {len(accs)} seeds")


if __name__ == "__main__":
    main()
