"""The model card every exported `model/` carries: README.md in the Hugging Face model-card format
(YAML metadata, then Markdown), written from the run itself: base model, task, data counts,
strategy and why, hyperparameters, the before / linear probe / after table, forgetting figures,
intended use and limits, and how to load it with and without tunesmith.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from tunesmith.config import Config


def base_model_id(spec: str) -> str:
    """The hub id of a packaged model (its weights are the hub's), else what the config named."""
    from tunesmith.registry import MODELS

    if spec in MODELS:
        return MODELS.get(spec).hub_id or spec
    return spec


def _metrics_table(ev: dict[str, Any]) -> list[str]:
    cols = [(k, ev[k]) for k in ("before", "linear_probe", "after") if isinstance(ev.get(k), dict)]
    names = {"before": "starting model", "linear_probe": "linear probe", "after": "fine-tuned"}
    metrics = [m for m in ("accuracy", "macro_f1", "micro_f1", "top5_accuracy", "loss", "perplexity")
               if any(isinstance(c.get(m), (int, float)) for _, c in cols)]
    if not cols or not metrics:
        return []
    lines = ["| metric | " + " | ".join(names[k] for k, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(f"{c[m]:.4f}" if isinstance(c.get(m), (int, float)) else "-" for _, c in cols) + " |")
    return lines


def model_card(cfg: "Config", ev: dict[str, Any], card: dict[str, str]) -> str:
    """README.md for a run's model/: `card` is what the task declares (library_name, pipeline_tag, usage)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("tunesmith")
    except PackageNotFoundError:  # a source tree that was never installed
        __version__ = "(source)"
    base = base_model_id(cfg.model)
    data = ev.get("data", {})
    labels = ev.get("labels") or []
    meta: dict[str, Any] = {"base_model": base, "library_name": card["library_name"], "pipeline_tag": card["pipeline_tag"],
                            "tags": ["tunesmith", cfg.task, ev.get("strategy", cfg.strategy.name)]}
    name = cfg.output_dir.rstrip("/").rsplit("/", 1)[-1]
    train = ev.get("train", {})
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"`{base}` fine-tuned for **{cfg.task}** with [tunesmith](https://pypi.org/project/tunesmith/) {__version__}, "
        f"strategy `{ev.get('strategy', cfg.strategy.name)}`"
        + (f" (chosen by `auto`: {cfg.strategy.reason})" if cfg.strategy.reason else "") + ".", "",
        "## Data", "",
        "| split | rows | source | bad rows skipped | truncated |", "|---|---|---|---|---|",
        *[f"| {k} | {v['rows']:,} | {v['source']} | {v.get('skipped', 0)} | {v.get('truncated', 0)} |"
          for k, v in data.items() if isinstance(v, dict) and "rows" in v],
        "",
    ]
    if labels:
        shown = ", ".join(f"`{label}`" for label in labels[:30]) + (f" and {len(labels) - 30} more" if len(labels) > 30 else "")
        lines += [f"{len(labels)} labels: {shown}.", ""]
    o, t = cfg.optim, cfg.train
    lines += [
        "## Training", "",
        f"- learning rate {ev.get('lr', o.lr)}, batch size {o.batch_size} (global), {train.get('epochs_run', o.epochs)} epoch(s), "
        f"{train.get('steps', '?')} optimizer steps, {o.scheduler} schedule, warmup {o.warmup}, weight decay {o.weight_decay}",
        f"- max length {t.max_length} tokens, precision {train.get('precision', t.precision)}, seed {t.seed}, "
        f"best weights by validation {t.metric} (step {train.get('best_step', '?')})",
        f"- {train.get('runtime_s', 0):.0f} s on {train.get('processes', 1)} {train.get('device', 'cpu')} process(es)",
        "",
    ]
    table = _metrics_table(ev)
    if table:
        lines += ["## Results on the held-out test set", "", *table, ""]
    guard = ev.get("guard")
    if isinstance(guard, dict) and guard.get("worse"):
        lines += [f"**Warning:** {guard.get('message', 'the fine-tuned model is worse on validation than a baseline')}.", ""]
    fg = ev.get("forgetting")
    if isinstance(fg, dict):
        lines += ["## Forgetting", "",
                  f"Perplexity on general text ({fg.get('source')}): {fg.get('perplexity_before', 0):.2f} before, "
                  f"{fg.get('perplexity_after', 0):.2f} after fine-tuning.", ""]
    rows = data.get("train", {}).get("rows", 0) if isinstance(data.get("train"), dict) else 0
    lines += [
        "## Intended use and limits", "",
        f"Made for the task and the kind of data it was trained on: {rows:,} training examples from "
        f"`{data.get('train', {}).get('source', cfg.data.train)}`. Scores above come from that data's own held-out "
        "split and will not transfer as they are to other domains, languages or label sets: evaluate on your own "
        "examples first (`tunesmith eval`). It inherits the biases and limits of its base model "
        f"(`{base}`) and of the training data.", "",
        "## How to load it", "", card["usage"].strip(), "",
    ]
    return "\n".join(lines)
