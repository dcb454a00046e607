"""report.html: what happened in a run, on one page that needs nothing but a browser.

Written at the end of every run (`RUN/report.html`, its figures also as PNGs in `RUN/report/`) and
rebuilt from the run directory alone by `tunesmith report RUN`: config.yaml, metrics.jsonl and
eval.json hold everything it shows. Figures are matplotlib PNGs embedded as data URIs (no network,
no script). `tunesmith compare RUN...` puts several runs side by side on one page.

What it shows: training and validation loss and metric curves with the best point marked and
overfitting flagged (validation loss rising while training loss falls); the learning rate of every
parameter group; before / linear probe / after on the test set; the confusion matrix, per-class
table and the most confident mistakes (texts, or image thumbnails); for language models the base
and tuned answers and the forgetting perplexity; the resolved config, the strategy and why, data
counts and warnings, runtime, throughput and memory.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config import dotted
from tunesmith.errors import UserError
from tunesmith.report import METRICS

REPORT = "report.html"
FIGURES = "report"  # the PNGs, beside report.html

SECTIONS = {"before": "before", "linear_probe": "linear probe", "after": "after"}  # eval.json's test-set results


def sections(ev: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(shown name, metrics) of each test-set result eval.json holds, in order."""
    return [(name, ev[k]) for k, name in SECTIONS.items() if isinstance(ev.get(k), dict)]


@dataclass
class RunRecord:
    """What a run directory holds: its config, its eval.json ({} while unfinished), its metrics.jsonl."""

    path: Path
    config: dict[str, Any]
    ev: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, run: str | Path) -> "RunRecord":
        path = Path(run)
        if not (path / "config.yaml").is_file():
            raise UserError(f"{path} is not a run directory (no config.yaml); give the output_dir of a `tunesmith train` run")
        try:
            config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
            ev = json.loads((path / "eval.json").read_text(encoding="utf-8")) if (path / "eval.json").is_file() else {}
        except (yaml.YAMLError, ValueError) as e:
            raise UserError(f"{path}: config.yaml or eval.json is damaged ({str(e).splitlines()[0]})") from None
        records = []
        if (path / "metrics.jsonl").is_file():
            for line in (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a kill: the rest still draws
        return cls(path, config, ev, records)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metric(self) -> str:
        return (self.config.get("train") or {}).get("metric") or "loss"

    @cached_property
    def train(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == "train"]

    @cached_property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == "eval"]

    @property
    def status(self) -> str:
        if self.ev:
            return "finished"
        return "failed" if (self.path / "failed.json").is_file() else "not finished"

    def stage_starts(self) -> list[tuple[int, str]]:
        """(first step, strategy) of each stage after the first (LP-FT's fine-tuning, a later unfreeze)."""
        out, step = [], 0
        for i, st in enumerate(self.ev.get("optimizer") or []):
            if i:
                out.append((step, str(st.get("strategy", f"stage {i}"))))
            step += int(st.get("steps") or 0)
        return out


LOWER_IS_BETTER = ("loss", "perplexity", "kl")


def overfitting(run: RunRecord) -> dict[str, Any] | None:
    """The validation metric that picks the model (`train.metric`) getting worse after its best, over at
    least two evaluations (by 2% for a loss, 0.01 for a score), while the training loss went on falling:
    where it started and by how much. A validation loss that rises while accuracy holds is calibration
    (overconfident predictions), not a worse model, and is not flagged when the metric is a score."""
    metric = run.metric
    vals = [(e["step"], e[metric]) for e in run.evals if isinstance(e.get(metric), (int, float))]
    if len(vals) < 3:
        return None
    lower = metric in LOWER_IS_BETTER
    best = (min if lower else max)(range(len(vals)), key=lambda i: vals[i][1])
    first, last = vals[best][1], vals[-1][1]
    worse = last >= first * 1.02 if lower else last <= first - 0.01
    if len(vals) - 1 - best < 2 or not worse:
        return None

    def train_loss_at(i: int) -> float | None:  # the mean training loss logged since the evaluation before
        lo = vals[i - 1][0] if i else -1
        losses = [r["loss"] for r in run.train if lo < r["step"] <= vals[i][0]]
        return sum(losses) / len(losses) if losses else None

    at_best, at_end = train_loss_at(best), train_loss_at(len(vals) - 1)
    if at_best is None or at_end is None or at_end >= at_best:
        return None
    return {"metric": metric, "from_step": vals[best][0], "to_step": vals[-1][0], "best": first, "last": last,
            "train_loss_fall_pct": 100 * (1 - at_end / at_best)}


# -- figures -------------------------------------------------------------------------------------
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def fig_curves(run: RunRecord, over: dict[str, Any] | None) -> bytes | None:
    train, evals = run.train, run.evals
    if not train and not evals:
        return None
    plt = pyplot()
    scores = [m for m in METRICS if m not in LOWER_IS_BETTER and any(m in e for e in evals)]
    if "accuracy" in scores and "micro_f1" in scores:
        scores.remove("micro_f1")  # single-label: the same number
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(11 if scores else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, color="tab:blue", label="training loss")
    vl = [(e["step"], e["loss"]) for e in evals if "loss" in e]
    if vl:
        ax.plot(*zip(*vl), "o-", ms=3, color="tab:orange", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    panels = [ax]
    if scores:
        ax2 = axes[0][1]
        for m in scores:
            pts = [(e["step"], e[m]) for e in evals if m in e]
            ax2.plot(*zip(*pts), "o-", ms=3, label=f"validation {m}")
        ax2.set_xlabel("step")
        ax2.set_title("validation metrics")
        panels.append(ax2)
    best = run.ev.get("validation_best") or {}
    target = panels[0] if run.metric == "loss" else panels[1] if scores and run.metric in scores else None
    if target is not None and run.metric in best and "step" in best:
        target.plot([best["step"]], [best[run.metric]], "*", ms=14, color="gold", mec="black",
                    label=f"best {run.metric} (step {best['step']})", zorder=5)
    for p in panels:
        for step, name in run.stage_starts():
            p.axvline(step, ls="--", color="gray", lw=0.8)
            p.text(step, p.get_ylim()[1], f" {name}", fontsize=7, color="gray", va="top")
        if over:
            p.axvspan(over["from_step"], over["to_step"], color="red", alpha=0.08,
                      label="overfitting" if p is panels[0] else None)
        p.grid(alpha=0.3)
        p.legend(fontsize=8)
    return png_bytes(fig)


def fig_lr(run: RunRecord) -> bytes | None:
    train = run.train
    if not train:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    groups: dict[str, list[tuple[int, float]]] = {}
    for r in train:
        for name, lr in (r.get("lr_groups") or {"lr": r["lr"]}).items():
            groups.setdefault(name, []).append((r["step"], lr))
    for name, pts in list(groups.items())[:12]:
        ax.plot(*zip(*pts), lw=1, label=name)
    if len(groups) > 12:
        ax.plot([], [], " ", label=f"... {len(groups) - 12} more groups")
    positive = [lr for pts in groups.values() for _, lr in pts if lr > 0]
    if positive and max(positive) > 20 * min(positive):  # rates 10-1000x apart (a head, layer decay): log scale
        ax.set_yscale("log")  # zeros (the end of a decay) are left out of a log plot
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate per parameter group")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(groups) > 6 else 1)
    return png_bytes(fig)


def fig_baselines(run: RunRecord) -> bytes | None:
    ev = run.ev
    cols = sections(ev)
    shown = [m for m in METRICS if any(isinstance(v.get(m), (int, float)) for _, v in cols)]
    if len(cols) < 2 or not shown:
        return None
    shown = [m for m in shown if m != "micro_f1" or "accuracy" not in shown][:3]  # single-label: micro-F1 is accuracy
    plt = pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(3.4 * len(shown), 2.8), squeeze=False, sharey=True)
    colors = {"before": "tab:gray", "linear probe": "tab:blue", "after": "tab:green"}
    for ax, m in zip(axes[0], shown):
        names = [n for n, v in cols if isinstance(v.get(m), (int, float))]
        values = [v[m] for n, v in cols if isinstance(v.get(m), (int, float))]
        bars = ax.barh(names, values, color=[colors[n] for n in names])
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
        if ax is axes[0][0]:
            ax.invert_yaxis()  # shared: once
        ax.set_title(f"test {m}" + (" (lower is better)" if m in ("loss", "perplexity") else ""), fontsize=9)
        ax.set_xlim(0, max(values) * 1.25 if values and max(values) > 0 else 1)
    fig.subplots_adjust(wspace=0.3)
    return png_bytes(fig)


def fig_confusion(run: RunRecord) -> bytes | None:
    after, labels = run.ev.get("after") or {}, run.ev.get("labels") or []
    cm = after.get("confusion_matrix")
    if not cm or not labels or len(labels) > 30 or len(cm) != len(labels):
        return None
    import numpy as np

    plt = pyplot()
    a = np.asarray(cm, dtype=float)
    rows = a / np.maximum(a.sum(axis=1, keepdims=True), 1)
    size = min(3 + 0.35 * len(labels), 11)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test, after; rows sum to 1)", fontsize=9)
    if len(labels) <= 12:
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{int(a[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return png_bytes(fig)


# -- the page ------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.n{text-align:right;font-variant-numeric:tabular-nums}img.fig{max-width:100%}
.warn{background:#fff4e5;border-left:4px solid #f90;padding:.4em .8em;margin:.4em 0}
.ok{background:#eef8ee;border-left:4px solid #3a3;padding:.4em .8em;margin:.4em 0}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em}.grid{display:flex;flex-wrap:wrap;gap:8px}
.grid figure{margin:0;width:150px;font-size:.75em}.grid img{width:150px;height:150px;object-fit:cover}"""

esc = html.escape


def _num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return esc(str(v))
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return esc(str(v))


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{_num(c)}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
                                    else f"<td>{esc(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(png: bytes, alt: str) -> str:
    return f'<img class="fig" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _thumbnail(path: str, size: int = 150) -> str | None:
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def results_rows(ev: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    cols = sections(ev)
    rows = [[m, *[v.get(m, "-") for _, v in cols]] for m in METRICS if any(m in v for _, v in cols)]
    if any("general_text" in v for _, v in cols):
        rows.append(["general-text perplexity", *[(v.get("general_text") or {}).get("perplexity", "-") for _, v in cols]])
    return ["test set", *[n for n, _ in cols]], rows


def build(run: RunRecord) -> tuple[str, dict[str, bytes]]:
    """The page and its figures by file name."""
    ev, cfg = run.ev, run.config
    over = overfitting(run)
    figures = {name: png for name, png in (
        ("curves.png", fig_curves(run, over)), ("learning_rate.png", fig_lr(run)),
        ("test_metrics.png", fig_baselines(run)), ("confusion_matrix.png", fig_confusion(run))) if png}
    strategy = ev.get("strategy") or (cfg.get("strategy") or {}).get("name", "?")
    parts = [f"<h1>tunesmith run: {esc(run.name)}</h1>",
             table(["task", "model", "strategy", "status", "directory"],
                   [[cfg.get("task", "?"), cfg.get("model", "?"), strategy, run.status, str(run.path.resolve())]])]
    if ev.get("strategy_reason"):
        parts.append(f"<p>strategy <b>auto</b> chose <b>{esc(strategy)}</b>: {esc(ev['strategy_reason'])}</p>")
    guard = ev.get("guard") or {}
    if guard.get("worse"):
        parts.append(f'<div class="warn">{esc(guard["message"])}</div>')
    if over:
        parts.append(f'<div class="warn">overfitting: from step {over["from_step"]} to {over["to_step"]} validation '
                     f'{esc(over["metric"])} went from {over["best"]:.4f} to {over["last"]:.4f} while the training loss fell '
                     f'{over["train_loss_fall_pct"]:.1f}%; the weights of the best point are the model (fewer epochs, '
                     f'train.early_stopping, or more weight decay save the time)</div>')
    header, rows = results_rows(ev)
    if rows:
        parts += ["<h2>Held-out test set</h2>", table(header, rows)]
    if "test_metrics.png" in figures:
        parts.append(img(figures["test_metrics.png"], "test metrics before, linear probe, after"))
    if "curves.png" in figures:
        best = ev.get("validation_best") or {}
        note = f"<p>best validation {esc(run.metric)} {_num(best.get(run.metric))} at step {best.get('step')} (its weights are the model)</p>" \
            if run.metric in best else ""
        parts += ["<h2>Training and validation</h2>", note, img(figures["curves.png"], "loss and metric curves")]
    if "learning_rate.png" in figures:
        parts += ["<h2>Learning rate</h2>", img(figures["learning_rate.png"], "learning rate per parameter group")]
    after = ev.get("after") or {}
    if "confusion_matrix.png" in figures or after.get("per_class"):
        parts.append("<h2>Classes</h2>")
        if "confusion_matrix.png" in figures:
            parts.append(img(figures["confusion_matrix.png"], "confusion matrix"))
        if after.get("per_class"):
            parts.append(table(["class", "precision", "recall", "f1", "support"],
                               [[c, m["precision"], m["recall"], m["f1"], m["support"]] for c, m in list(after["per_class"].items())[:100]]))
    parts += _mistakes(ev.get("mistakes") or [])
    parts += _samples(ev)
    parts += _data(ev)
    parts += _runtime(ev)
    parts += ["<h2>Config (resolved)</h2>", f"<pre>{esc(yaml.safe_dump(cfg, sort_keys=False))}</pre>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tunesmith: {esc(run.name)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    return page, figures


def _mistakes(mistakes: list[dict[str, Any]]) -> list[str]:
    if not mistakes:
        return []
    out = ["<h2>Most confident mistakes (test)</h2>"]
    if any("image" in m for m in mistakes):
        cells = []
        for m in mistakes:
            src = _thumbnail(m["image"]) if m.get("image") else None
            pic = f'<img alt="{esc(m["where"])}" src="{src}">' if src else "<div>(image not readable now)</div>"
            cells.append(f"<figure>{pic}<figcaption>true <b>{esc(m['label'])}</b>, predicted <b>{esc(m['predicted'])}</b> "
                         f"({m['confidence']:.2f})<br>{esc(Path(m['where']).name)}</figcaption></figure>")
        return out + [f'<div class="grid">{"".join(cells)}</div>']
    return out + [table(["where", "text", "true", "predicted", "confidence"],
                        [[m["where"], m.get("text", ""), m["label"], m["predicted"], m["confidence"]] for m in mistakes])]


def _samples(ev: dict[str, Any]) -> list[str]:
    samples = (ev.get("after") or {}).get("samples") or []
    out = []
    if ev.get("forgetting"):
        fg = ev["forgetting"]
        out += ["<h2>Forgetting</h2>", table(["general text", "perplexity before", "perplexity after", "change"],
                                             [[fg["source"], fg["perplexity_before"], fg["perplexity_after"], f"{fg['change_pct']:+.1f}%"]])]
    if samples:
        out += ["<h2>Base and tuned answers</h2>",
                table(["prompt", "base model", "tuned model", "reference"],
                      [[s["prompt"], s.get("base") if s.get("base") is not None else "(eval.before off)", s["tuned"],
                        s.get("reference") or ""] for s in samples])]
    return out


def _data(ev: dict[str, Any]) -> list[str]:
    rep, data = ev.get("data_report") or {}, ev.get("data") or {}
    if not rep and not data:
        return []
    out = ["<h2>Data</h2>"]
    if data:
        out.append(table(["split", "rows", "skipped", "truncated", "source"],
                         [[k, v.get("rows"), v.get("skipped", 0), v.get("truncated", 0), v.get("source", "")] for k, v in data.items()]))
    labels = {f["split"]: f.get("labels") for f in rep.get("files", []) if f.get("labels")}
    if labels:
        out.append(table(["split", "labels (count)"], [[k, ", ".join(f"{n} {c}" for n, c in list(v.items())[:20])]
                                                      for k, v in labels.items()]))
    if rep.get("overlap"):
        out.append(f"<p>rows of the training text also in: {', '.join(f'{esc(k)} {v}' for k, v in rep['overlap'].items())}</p>")
    for w in rep.get("warnings", []):
        out.append(f'<div class="warn">{esc(w)}</div>')
    return out


def _runtime(ev: dict[str, Any]) -> list[str]:
    t, p = ev.get("train") or {}, ev.get("parameters") or {}
    if not t:
        return []
    rows = [[k.replace("_", " "), t[k]] for k in ("runtime_s", "samples_per_s", "tokens_per_s", "peak_rss_mb", "steps", "epochs_run",
                                                  "stopped_early", "best_step", "skipped_steps", "precision", "device", "processes") if k in t]
    rows += [[f"parameters {k.replace('_', ' ')}", v] for k, v in p.items()]
    out = ["<h2>Runtime</h2>", table(["", ""], rows)]
    stages = ev.get("optimizer") or []
    if stages:
        out.append(table(["stage", "strategy", "steps", "groups (lr)"],
                         [[s.get("stage"), s.get("strategy"), s.get("steps"),
                           ", ".join(f"{g['name']} {g['lr']:.2e}" for g in s.get("groups", [])[:12])] for s in stages]))
    return out


def write(run_dir: str | Path) -> Path:
    """Write RUN/report.html and RUN/report/*.png; returns the page's path."""
    run = RunRecord.read(run_dir)
    page, figures = build(run)
    folder = run.path / FIGURES
    folder.mkdir(exist_ok=True)
    for name, png in figures.items():
        (folder / name).write_bytes(png)
    out = run.path / REPORT
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


# -- several runs side by side -------------------------------------------------------------------
def config_differences(runs: list[RunRecord]) -> list[tuple[str, list[Any]]]:
    """(dotted key, value per run) for every key whose value is not the same in all runs (output_dir aside)."""
    flat = [dotted(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f} - {"output_dir"})
    missing = object()
    diffs = []
    for k in keys:
        values = [f.get(k, missing) for f in flat]
        if any(v != values[0] for v in values[1:]):
            diffs.append((k, ["(unset)" if v is missing else v for v in values]))
    return diffs


def headline(run: RunRecord) -> dict[str, Any]:
    """The figures a comparison shows for a run: the primary metric before / probe / after on test."""
    ev, m = run.ev, run.metric
    row = {"run": run.name, "task": run.config.get("task", "?"), "strategy": ev.get("strategy") or
           (run.config.get("strategy") or {}).get("name", "?"), "status": run.status, "metric": m}
    for k in SECTIONS:
        v = (ev.get(k) or {}).get(m)
        row[k] = v if isinstance(v, (int, float)) else None
    row["best_validation"] = (ev.get("validation_best") or {}).get(m)
    row["runtime_s"] = (ev.get("train") or {}).get("runtime_s")
    return row


def fig_compare(runs: list[RunRecord]) -> bytes | None:
    metric = runs[0].metric
    curves = [(r.name, [(e["step"], e[metric]) for e in r.evals if metric in e]) for r in runs]
    if not any(pts for _, pts in curves):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, pts in curves:
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"validation {metric} by run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def compare(run_dirs: list[str | Path]) -> tuple[list[dict[str, Any]], list[tuple[str, list[Any]]], str]:
    """(headline rows, config differences, the HTML page) for these runs."""
    runs = [RunRecord.read(d) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # two runs/ folders with the same last part: show more of the path
        names = [str(r.path) for r in runs]
        for r, n in zip(runs, names):
            r.path = Path(n)
    rows, diffs = [headline(r) for r in runs], config_differences(runs)
    cols = ["run", "task", "strategy", "status", "metric", "before", "linear_probe", "after", "best_validation", "runtime_s"]
    parts = [f"<h1>tunesmith: {len(runs)} runs compared</h1>", "<h2>Held-out test set</h2>",
             table([c.replace("_", " ") for c in cols], [[r[c] if r[c] is not None else "-" for c in cols] for r in rows])]
    png = fig_compare(runs)
    if png:
        parts += ["<h2>Validation curves</h2>", img(png, "validation curves of every run")]
    parts.append("<h2>Config differences</h2>")
    parts.append(table(["key", *[r.name for r in runs]], [[k, *[json.dumps(v) if not isinstance(v, str) else v for v in vs]]
                                                          for k, vs in diffs]) if diffs else "<p>the configs are the same</p>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tunesmith: compare</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    return rows, diffs, page
