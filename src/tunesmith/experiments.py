"""Several runs of one config: the same config over N seeds (`train --seeds N`), and hyperparameter
sweeps (`tunesmith sweep`).

Every run is an ordinary run directory inside the config's `output_dir`: `seed-S/` or `trial-NNN/`,
each with its own report.html, so `tunesmith predict`, `report` and `compare` work on each.

Seeds: small-data results swing by several points from seed to seed (the order of batches, the
head's initialisation, dropout); `--seeds N` trains seeds `train.seed` .. `train.seed + N - 1` and
gives each metric's mean, standard deviation and range (`seeds.json`, `seeds.html`). Seeds already
finished in the folder are kept, so `--seeds 5` after `--seeds 3` trains two more.

Sweeps: Optuna (Akiba et al., KDD 2019), the library the HF Trainer's `hyperparameter_search` uses:
its TPE sampler (Bergstra et al., NeurIPS 2011) proposes values from the `sweep:` section of the
config, and its median pruner stops a trial whose validation metric, after its second or a later
evaluation, is below the median of earlier trials at the same evaluation (the rule of Google Vizier,
Golovin et al., KDD 2017).
The study lives in `sweep.db` (SQLite) in the sweep folder: a stopped sweep continues where it was.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config import Config, load_config, set_key
from tunesmith.errors import Stopped, UserError
from tunesmith.observers import Observer
from tunesmith.report import METRICS, make_console
from tunesmith.run_report import SECTIONS



def _raw(config: str | Path | dict[str, Any] | Config, overrides: list[str] | None) -> tuple[Config, dict[str, Any]]:
    """The validated config and its plain dict (what each run's own config is made from)."""
    if isinstance(config, Config):
        config = config.to_dict()
    cfg = load_config(config, overrides)
    raw = cfg.to_dict()
    raw.pop("sweep", None)  # a run inside an experiment does not carry the search space
    return cfg, raw


def _with(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    for key, value in values.items():
        set_key(out, key.split("."), value, f"key '{key}'")
    return out


# -- seeds ---------------------------------------------------------------------------------------
def stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n, "values": values}


def summarize(evs: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Mean, sample standard deviation and range of every test metric every run has, and of the best
    validation score and the runtime."""
    out: dict[str, Any] = {}
    for section in SECTIONS:
        for m in METRICS:
            vals = [(ev.get(section) or {}).get(m) for ev in evs]
            if all(isinstance(v, (int, float)) for v in vals):
                out.setdefault(section, {})[m] = stats([float(v) for v in vals])
    best = [(ev.get("validation_best") or {}).get(metric) for ev in evs]
    if all(isinstance(v, (int, float)) for v in best):
        out["validation_best"] = {metric: stats([float(v) for v in best])}
    runtime = [(ev.get("train") or {}).get("runtime_s") for ev in evs]
    if all(isinstance(v, (int, float)) for v in runtime):
        out["runtime_s"] = stats([float(v) for v in runtime])
    return out


def train_seeds(config: str | Path | dict[str, Any] | Config, n: int, overrides: list[str] | None = None,
                quiet: bool = False) -> dict[str, Any]:
    """Train the config with `n` seeds into OUTPUT_DIR/seed-S; returns (and writes) seeds.json."""
    from tunesmith.loop import run
    from tunesmith.run_report import compare

    cfg, raw = _raw(config, overrides)
    if n < 1:
        raise UserError(f"--seeds {n}: give 1 or more")
    base, console = Path(cfg.output_dir), make_console(quiet)
    seeds = [cfg.train.seed + k for k in range(n)]
    runs, evs = [], []
    for i, seed in enumerate(seeds, 1):
        out = base / f"seed-{seed}"
        if (out / "eval.json").is_file() and not cfg.overwrite:
            console.print(f"seed {seed} ({i}/{n}): finished earlier in {out}, kept")
            ev = json.loads((out / "eval.json").read_text(encoding="utf-8"))
        else:
            console.print(f"seed {seed} ({i}/{n}) -> {out}")
            ev = run(load_config(_with(raw, {"train.seed": seed, "output_dir": str(out)})), quiet=True).eval
        runs.append(out)
        evs.append(ev)
    summary = {"seeds": seeds, "metric": cfg.train.metric, "runs": [str(r) for r in runs], **summarize(evs, cfg.train.metric)}
    (base / "seeds.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if n > 1:
        (base / "seeds.html").write_text(compare(runs)[2], encoding="utf-8")
    console.print(seeds_table(summary))
    console.print(f"seeds: {base / 'seeds.json'}" + (f", {base / 'seeds.html'}" if n > 1 else ""))
    return summary


def seeds_table(summary: dict[str, Any]) -> Any:
    from rich.table import Table

    n = len(summary["seeds"])
    t = Table(title=f"held-out test set over {n} seed(s): mean ± standard deviation (min - max)", title_justify="left")
    t.add_column("metric")
    sections = [s for s in SECTIONS if s in summary]
    for s in sections:
        t.add_column(SECTIONS[s], justify="right")
    for m in METRICS:
        if any(m in summary[s] for s in sections):
            t.add_row(m, *[f"{v['mean']:.4f} ± {v['std']:.4f} ({v['min']:.4f} - {v['max']:.4f})" if (v := summary[s].get(m)) else "-"
                           for s in sections])
    return t


# -- sweeps --------------------------------------------------------------------------------------
class Pruning(Observer):
    """Reports the validation metric to the Optuna trial after each evaluation, numbered 1, 2, ... (so trials
    with other batch sizes or epochs compare evaluation by evaluation); stops the run when the pruner says
    the trial will not beat the others. The first evaluation is never pruned (WARMUP): one epoch says little."""

    def __init__(self, trial: Any, metric: str):
        self.trial, self.metric, self.evals = trial, metric, 0

    def validation_end(self, run: Any, metrics: dict[str, Any], improved: bool) -> None:
        self.evals += 1
        value = float(metrics[self.metric])
        self.trial.report(value, self.evals)
        if self.trial.should_prune():
            raise Stopped(f"pruned by the sweep at step {run.state.step} (evaluation {self.evals}): validation {self.metric} "
                          f"{value:.4f} is below the median of the earlier trials at this evaluation")


WARMUP = 2  # MedianPruner's n_warmup_steps in evaluations: the earliest prune is at the second


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError("tunesmith sweep needs Optuna: pip install 'tunesmith[sweep]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def check_space(cfg: Config, raw: dict[str, Any], where: str) -> None:
    """Every searched key is a real config key and its ends/choices are values it accepts: checked
    before the first trial, with the key named."""
    if not cfg.sweep:
        raise UserError(f"{where}: no sweep: section; add the keys to search, e.g. "
                        "sweep: {optim.lr: {low: 1.0e-5, high: 1.0e-3, log: true}, strategy.name: {choices: [full, lora]}}")
    for key, p in cfg.sweep.items():
        if key in ("output_dir", "sweep", "overwrite", "resume") or key.startswith("sweep."):
            raise UserError(f"{where}: sweep.{key} cannot be searched; search training keys such as optim.lr")
        for value in p.choices if p.choices is not None else [p.low, p.high]:
            try:
                load_config(_with(raw, {key: value}))
            except UserError as e:
                raise UserError(f"{where}: sweep.{key} = {value!r} is not a value the config accepts: {e}") from None


def suggest(trial: Any, key: str, p: Any) -> Any:
    if p.choices is not None:
        return trial.suggest_categorical(key, p.choices)
    if p.integer:
        return trial.suggest_int(key, p.low, p.high, step=p.step or 1, log=p.log)
    return trial.suggest_float(key, float(p.low), float(p.high), step=p.step, log=p.log)


def run_trial(trial: Any, raw: dict[str, Any], values: dict[str, Any], run_dir: Path, seeds: int, metric: str) -> float:
    """The trial's validation metric: its run's best, or with `seeds` > 1 the mean over that many seeds
    (runs in trial-NNN/seed-S). Only the first seed's run reports to the pruner."""
    from tunesmith.loop import run

    base, scores = raw["train"]["seed"], []
    for k in range(seeds):
        fixed = {"output_dir": str(run_dir if seeds == 1 else run_dir / f"seed-{base + k}"), "overwrite": True, "resume": False,
                 "train.checkpoint_epochs": False, "train.checkpoint_every": 0, "train.seed": base + k}
        result = run(load_config(_with(raw, {**values, **fixed})), quiet=True, observers=[Pruning(trial, metric)] if k == 0 else [])
        value = (result.eval.get("validation_best") or {}).get(metric)
        if value is None:
            raise UserError(f"no validation {metric}: a sweep chooses on validation, and eval.every_epoch is off")
        scores.append(float(value))
    return sum(scores) / len(scores)


def sweep(config: str | Path | dict[str, Any] | Config, overrides: list[str] | None = None, trials: int = 20,
          time_budget: float | None = None, quiet: bool = False, seeds: int = 1) -> dict[str, Any]:
    """Search the config's `sweep:` space with Optuna; returns (and writes) sweep.json, best.yaml, sweep.html.
    `seeds` > 1: each trial is scored by the mean of that many seeds."""
    from tunesmith.registry import TASKS

    optuna = _optuna()
    cfg, raw = _raw(config, overrides)
    where = str(config) if isinstance(config, (str, Path)) else "the config"
    check_space(cfg, raw, where)
    out, console = Path(cfg.output_dir), make_console(quiet)
    out.mkdir(parents=True, exist_ok=True)
    metric = cfg.train.metric
    direction = "minimize" if TASKS.get(cfg.task).metrics_better[metric] == "min" else "maximize"
    study = optuna.create_study(
        study_name="tunesmith", storage=f"sqlite:///{(out / 'sweep.db').resolve()}", direction=direction,
        sampler=optuna.samplers.TPESampler(seed=cfg.train.seed, n_startup_trials=min(10, max(trials // 3, 3))),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=WARMUP), load_if_exists=True)
    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):  # a sweep stopped mid-trial: that trial failed
        study.tell(t.number, state=states.FAIL)
    counted = (states.COMPLETE, states.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=counted))
    if done:
        console.print(f"sweep: {done} trial(s) already in {out / 'sweep.db'}; continuing")
    start = time.monotonic()
    while done < trials and (time_budget is None or time.monotonic() - start < time_budget):
        trial = study.ask()
        values = {key: suggest(trial, key, p) for key, p in cfg.sweep.items()}
        run_dir = out / f"trial-{trial.number:03d}"
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        t0 = time.monotonic()
        try:
            value = run_trial(trial, raw, values, run_dir, seeds, metric)
        except Stopped as e:
            study.tell(trial, state=states.PRUNED)
            console.print(f"trial {trial.number}: {shown}: {e} ({time.monotonic() - t0:.0f} s)")
        except UserError as e:  # a combination the data or model refuses: this trial fails, the sweep goes on
            study.tell(trial, state=states.FAIL)
            console.print(f"[yellow]trial {trial.number}: {shown}: failed: {e}[/yellow]")
            continue
        else:
            study.tell(trial, value)
            mean = f" (mean of {seeds} seeds)" if seeds > 1 else ""
            console.print(f"trial {trial.number}: {shown}: validation {metric} {value:.4f}{mean} ({time.monotonic() - t0:.0f} s)")
        done += 1
    return write_sweep(study, cfg, raw, out, console)


def write_sweep(study: Any, cfg: Config, raw: dict[str, Any], out: Path, console: Any) -> dict[str, Any]:
    """sweep.json (every trial), best.yaml (the config with the best values), sweep.html; prints the table."""
    from rich.table import Table

    metric = cfg.train.metric
    trials = [{"number": t.number, "state": t.state.name.lower(), "params": t.params, "value": t.value,
               "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
               "run": str(out / f"trial-{t.number:03d}"),
               "seconds": (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None}
              for t in study.get_trials(deepcopy=False)]
    complete = [t for t in trials if t["state"] == "complete"]
    summary: dict[str, Any] = {"metric": metric, "direction": study.direction.name.lower(), "trials": trials,
                               "complete": len(complete), "pruned": sum(t["state"] == "pruned" for t in trials),
                               "failed": sum(t["state"] == "fail" for t in trials)}
    if complete:
        best = study.best_trial
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "run": str(out / f"trial-{best.number:03d}")}
        best_raw = _with(raw, {**best.params, "output_dir": str(out / "best")})
        (out / "best.yaml").write_text(f"# tunesmith sweep: trial {best.number} of {len(trials)}, validation {metric} "
                                       f"{best.value:.4f}\n" + yaml.safe_dump(best_raw, sort_keys=False), encoding="utf-8")
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    (out / "sweep.html").write_text(sweep_page(summary, list(cfg.sweep)), encoding="utf-8")
    t = Table(title=f"sweep: {len(trials)} trials ({summary['complete']} complete, {summary['pruned']} pruned, "
                    f"{summary['failed']} failed); validation {metric}", title_justify="left")
    for c in ("trial", "state", *cfg.sweep, metric):
        t.add_column(c, justify="right" if c not in ("state",) else "left")
    best_n = (summary.get("best") or {}).get("number")
    for tr in trials:
        row = [str(tr["number"]) + (" *" if tr["number"] == best_n else ""), tr["state"]]
        row += [f"{v:.3g}" if isinstance(v := tr["params"].get(k), float) else str(v if v is not None else "-") for k in cfg.sweep]
        row.append(f"{tr['value']:.4f}" if tr["value"] is not None else "-")
        t.add_row(*row)
    console.print(t)
    if complete:
        console.print(f"best: trial {best_n} ({summary['best']['run']}); its config: {out / 'best.yaml'}; page: {out / 'sweep.html'}")
    return summary


def sweep_page(summary: dict[str, Any], keys: list[str]) -> str:
    """Trial history (each trial's validation metric by evaluation, pruned ones dashed) and the metric against
    each searched key."""
    from tunesmith.run_report import CSS, pyplot, png_bytes, img, table

    trials, metric = summary["trials"], summary["metric"]
    parts = [f"<h1>tunesmith sweep: {len(trials)} trials</h1>",
             f"<p>{summary['complete']} complete, {summary['pruned']} pruned early, {summary['failed']} failed; "
             f"validation {metric}, {summary['direction']}d</p>"]
    plt = pyplot()
    if any(t["intermediate"] for t in trials):
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        for t in trials:
            if t["intermediate"]:
                xs = [int(k) for k in t["intermediate"]]
                ax.plot(xs, list(t["intermediate"].values()), "--" if t["state"] == "pruned" else "-", lw=1,
                        color="tab:gray" if t["state"] == "pruned" else None, label=None if t["state"] == "pruned" else f"trial {t['number']}")
        ax.set_xlabel("evaluation")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title("trial history (pruned: dashed gray)")
        ax.grid(alpha=0.3)
        if sum(t["state"] != "pruned" and bool(t["intermediate"]) for t in trials) <= 12:
            ax.legend(fontsize=7)
        parts += ["<h2>Trial history</h2>", img(png_bytes(fig), "trial history")]
    done = [t for t in trials if t["value"] is not None]
    if done and keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(t["params"][k], t["value"]) for t in done if k in t["params"]]
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pts):
                ax.scatter([x for x, _ in pts], [y for _, y in pts], s=18)
                if pts and min(x for x, _ in pts) > 0 and max(x for x, _ in pts) > 20 * min(x for x, _ in pts):
                    ax.set_xscale("log")
            else:
                cats = sorted({str(x) for x, _ in pts})
                ax.scatter([cats.index(str(x)) for x, _ in pts], [y for _, y in pts], s=18)
                ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
            ax.set_xlabel(k)
            ax.set_ylabel(f"validation {metric}")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        parts += ["<h2>Validation metric against each searched key</h2>", img(png_bytes(fig), "metric against each key")]
    parts.append("<h2>Trials</h2>")
    parts.append(table(["trial", "state", *keys, metric, "seconds"],
                       [[t["number"], t["state"], *[t["params"].get(k, "-") for k in keys],
                         t["value"] if t["value"] is not None else "-", t["seconds"] if t["seconds"] is not None else "-"]
                        for t in trials]))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tunesmith sweep</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>")
