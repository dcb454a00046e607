"""Console output: the printer the loop talks to, and the tables users read."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from tunesmith.optim import group_lr


def make_console(quiet: bool) -> Console:
    return Console(stderr=False, quiet=quiet, highlight=False, soft_wrap=True)


def peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS counter so the next reading covers one phase only (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def param_table(groups: list[Any], lr: float, head_lr: float | None = None) -> Table:
    t = Table(title="parameter groups", title_justify="left")
    t.add_column("group")
    t.add_column("params", justify="right")
    t.add_column("trainable now", justify="right")
    t.add_column("lr", justify="right")
    for g in groups:
        t.add_row(g.name, f"{g.numel:,}", f"{g.trainable:,}", f"{group_lr(g, lr, head_lr):.2e}")
    return t


def moved_table(moved: dict[str, float]) -> Table:
    t = Table(title="how far the pre-trained weights moved (relative L2, ||w - w0|| / ||w0||)", title_justify="left")
    t.add_column("group")
    t.add_column("moved", justify="right")
    for g, v in moved.items():
        t.add_row(g, f"{v:.2e}")
    return t


# the task metrics tables, reports and seed summaries show, in order
METRICS = ("accuracy", "macro_f1", "micro_f1", "loss", "perplexity", "preference_accuracy", "reward_accuracy", "reward_margin",
           "kl")


def results_table(ev: dict[str, Any]) -> Table:
    cols = [(k, ev[k]) for k in ("before", "linear_probe", "after") if isinstance(ev.get(k), dict)]
    names = {"before": "before (new head)" if "accuracy" in ev.get("after", {}) else "before",
             "linear_probe": "linear probe", "after": "after fine-tuning"}
    t = Table(title="held-out test set", title_justify="left")
    t.add_column("metric")
    for k, _ in cols:
        t.add_column(names[k], justify="right")
    for metric in METRICS:
        if any(metric in m for _, m in cols):
            t.add_row(metric, *[f"{m[metric]:.4f}" if metric in m else "-" for _, m in cols])
    if any("general_text" in m for _, m in cols):  # causal-lm: the forgetting check
        t.add_row("general-text perplexity", *[f"{m['general_text']['perplexity']:.2f}" if "general_text" in m else "-"
                                               for _, m in cols])
    return t


def per_class_table(metrics: dict[str, Any], limit: int = 30) -> Table:
    t = Table(title="per class (after)", title_justify="left")
    for c in ("class", "precision", "recall", "f1", "support"):
        t.add_column(c, justify="left" if c == "class" else "right")
    for i, (name, m) in enumerate(metrics["per_class"].items()):
        if i >= limit:
            t.add_row(f"... {len(metrics['per_class']) - limit} more", "", "", "", "")
            break
        t.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    return t
