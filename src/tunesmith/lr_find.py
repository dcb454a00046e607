"""The learning-rate range test (Smith, 2015; fastai's `lr_find`).

The learning rate grows exponentially from `start` to `end` over a few hundred optimizer steps
on training batches; the loss is smoothed (exponential moving average, bias-corrected) and the
sweep stops once it exceeds 4x its minimum. The suggestion is the rate at the minimum divided by
10 (the classic rule); the steepest-descent rate is reported too. Every weight and the RNG state
are restored afterwards, so training starts from the same point as without the test.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.data.batching import make_batches
from tunesmith.optim import build_optimizer


def lr_find(task: Any, model: torch.nn.Module, groups: list[Any], train_enc: Any, cfg: Any, device: torch.device,
            amp: torch.dtype | None, png: Path | None, console: Any, fallback: float) -> dict[str, Any]:
    """Sweep, restore, suggest. `fallback` is suggested when the loss never fell (nothing to read)."""
    start, end = cfg.optim.lr_find_range
    steps = cfg.optim.lr_find_steps
    params = [p for g in groups for _, p in g.params]
    saved = [p.detach().clone() for p in params]  # a copy of what may train: restored at the end
    rng_state = torch.get_rng_state()
    optimizer = build_optimizer(groups, cfg.optim, start)
    scales = [g["lr"] / start for g in optimizer.param_groups]
    mult = (end / start) ** (1 / max(steps - 1, 1))
    batches: list[list[int]] = []
    epoch = 0
    lrs, losses, smoothed = [], [], []
    avg, beta, best = 0.0, 0.98, math.inf
    model.train()
    from rich.progress import Progress

    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("lr-find", total=steps)
        for i in range(steps):
            if not batches:
                epoch += 1
                batches = make_batches(train_enc.lengths, cfg.optim.batch_size, seed=cfg.train.seed, epoch=epoch)
            idx = batches.pop(0)
            lr = start * mult**i
            for g, s in zip(optimizer.param_groups, scales):
                g["lr"] = lr * s
            batch = {k: v.to(device) for k, v in task.collate(train_enc, idx).items()}
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = task.step(model, batch)["loss"]
            loss.backward()
            if cfg.optim.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            raw = loss.item()  # host-device sync each step: the sweep needs the value to stop
            progress.advance(bar)
            if not math.isfinite(raw):
                break
            avg = beta * avg + (1 - beta) * raw
            value = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
            losses.append(raw)
            smoothed.append(value)
            best = min(best, value)
            if i > 10 and value > 4 * best:
                break
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    torch.set_rng_state(rng_state)
    if len(smoothed) < 5:
        from tunesmith.errors import UserError

        raise UserError(f"lr-find: the loss diverged after {len(smoothed)} steps; lower optim.lr_find_range's start")
    s = np.asarray(smoothed)
    i_min = int(s.argmin())
    skip = max(1, len(s) // 10)
    grads = np.gradient(s, np.log(np.asarray(lrs)))
    i_steep = skip + int(grads[skip : max(i_min, skip + 1)].argmin()) if i_min > skip else i_min
    fell = i_min > skip and s[i_min] < 0.98 * s[:skip].mean()
    if not fell:
        console.print(f"lr-find: the loss did not fall during the sweep; keeping the strategy's default lr {fallback:.1e}")
    result = {
        "suggested_lr": lrs[i_min] / 10 if fell else fallback,
        "loss_fell": bool(fell),
        "min_loss_lr": lrs[i_min],
        "steepest_lr": lrs[i_steep],
        "steps": len(lrs),
        "lrs": lrs,
        "losses": losses,
        "smoothed": smoothed,
    }
    if png is not None:
        plot(result, png)
        result["plot"] = str(png)
    return result


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(result["lrs"], result["losses"], color="0.8", lw=0.8, label="loss")
    ax.plot(result["lrs"], result["smoothed"], color="C0", lw=2, label="smoothed loss")
    ax.set_xscale("log")
    lo, hi = min(result["smoothed"]), max(result["smoothed"][: max(len(result["smoothed"]) // 2, 1)])
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.25 * (hi - lo + 1e-9))
    for key, color, text in (("suggested_lr", "C3", "suggested"), ("steepest_lr", "C2", "steepest")):
        ax.axvline(result[key], color=color, ls="--", lw=1)
        ax.text(result[key], ax.get_ylim()[1], f" {text} {result[key]:.1e}", color=color, va="top", fontsize=8)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
