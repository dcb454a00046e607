"""Everything that watches training, behind one seam: the loop announces events, observers act.

Events, in the order a run sees them:

    fit_start(run, stage)      a stage's optimizer is ready; `run.total_steps` is known
    log(run, record)           one metrics.jsonl line: {"type": "train" | "eval" | "skip", ...}
    message(run, text)         a line for people (a skipped step, more blocks unfrozen)
    step_end(run)              after each optimizer step (skipped ones included)
    validation_end(run, metrics, improved)
    epoch_end(run)
    checkpoint(run, path)      a checkpoint was written
    fit_end(run)
    run_end(run, ev)           eval.json is written

`run` is the `tunesmith.loop.Recipe`: observers read its state (`run.state`, `run.cfg`) and may ask
it to stop (`run.state.stop = True`) or to checkpoint (`run.save_checkpoint()`). Trackers, the
report and sweep pruning subscribe here the same way; none of them lives in the loop body.
Every process sees every event (checkpointing is collective); what only the main process should
do (printing, writing files) checks `run.main`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any


class Observer:
    """No-op defaults: an observer overrides the events it cares about."""

    def fit_start(self, run: Any, stage: Any) -> None: ...
    def log(self, run: Any, record: dict[str, Any]) -> None: ...
    def message(self, run: Any, text: str) -> None: ...
    def step_end(self, run: Any) -> None: ...
    def validation_end(self, run: Any, metrics: dict[str, Any], improved: bool) -> None: ...
    def epoch_end(self, run: Any) -> None: ...
    def checkpoint(self, run: Any, path: Path | None) -> None: ...
    def fit_end(self, run: Any) -> None: ...
    def run_end(self, run: Any, ev: dict[str, Any]) -> None: ...


class Observers(Observer):
    """Several observers as one: each event goes to each, in order."""

    def __init__(self, observers: list[Observer]):
        self.observers = list(observers)

    def fit_start(self, run: Any, stage: Any) -> None:
        for o in self.observers:
            o.fit_start(run, stage)

    def log(self, run: Any, record: dict[str, Any]) -> None:
        for o in self.observers:
            o.log(run, record)

    def message(self, run: Any, text: str) -> None:
        for o in self.observers:
            o.message(run, text)

    def step_end(self, run: Any) -> None:
        for o in self.observers:
            o.step_end(run)

    def validation_end(self, run: Any, metrics: dict[str, Any], improved: bool) -> None:
        for o in self.observers:
            o.validation_end(run, metrics, improved)

    def epoch_end(self, run: Any) -> None:
        for o in self.observers:
            o.epoch_end(run)

    def checkpoint(self, run: Any, path: Path | None) -> None:
        for o in self.observers:
            o.checkpoint(run, path)

    def fit_end(self, run: Any) -> None:
        for o in self.observers:
            o.fit_end(run)

    def run_end(self, run: Any, ev: dict[str, Any]) -> None:
        for o in self.observers:
            o.run_end(run, ev)


class ConsoleProgress(Observer):
    """The progress bar (steps, loss, throughput) and the lines people read during training."""

    def __init__(self, console: Any, unit: str, show: bool):
        self.console, self.unit, self.show = console, unit, show
        self.progress: Any = None

    def fit_start(self, run: Any, stage: Any) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} " + self.unit + "/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.bar = self.progress.add_task("train", total=run.total_steps, epoch=run.state.epoch, loss="-", speed="-",
                                          completed=run.state.step - stage.first_step)
        if self.show:
            self.progress.start()

    def log(self, run: Any, record: dict[str, Any]) -> None:
        if record["type"] == "train" and self.progress is not None:
            shown = record["tokens_per_s"] if self.unit == "tokens" else record["samples_per_s"]
            self.progress.update(self.bar, loss=f"{record['loss']:.4f}", speed=f"{shown:.1f}")

    def message(self, run: Any, text: str) -> None:
        self.console.print(text)

    def step_end(self, run: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.bar, completed=run.state.step - run.stage.first_step, epoch=run.state.epoch)

    def validation_end(self, run: Any, metrics: dict[str, Any], improved: bool) -> None:
        s, metric = run.state, run.cfg.train.metric
        self.console.print(f"step {s.step}: validation {metric} {metrics[metric]:.4f} (best {s.best_metric:.4f} at step {s.best_step})")

    def fit_end(self, run: Any) -> None:
        if self.progress is not None and self.show:
            self.progress.stop()
        self.progress = None


class MetricsLog(Observer):
    """metrics.jsonl: one JSON line per logged step, validation and skipped step (main process only)."""

    def __init__(self, path: Path | None, resume_step: int | None):
        self.file: IO[str] | None = None
        if path is None:
            return
        if resume_step is not None and path.exists():
            # keep what the checkpointed part of the run logged; what came after it will be redone
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(path, "a" if resume_step is not None else "w", encoding="utf-8")

    def log(self, run: Any, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def run_end(self, run: Any, ev: dict[str, Any]) -> None:
        self.close()


class Checkpointer(Observer):
    """A checkpoint every `train.checkpoint_every` steps and at the end of every epoch (`checkpoint_epochs`)."""

    def __init__(self, every: int, epochs: bool):
        self.every, self.epochs = every, epochs

    def step_end(self, run: Any) -> None:
        if self.every and run.state.step % self.every == 0:
            run.save_checkpoint()

    def epoch_end(self, run: Any) -> None:
        if self.epochs:
            run.save_checkpoint()


class EarlyStopping(Observer):
    """Stop after `patience` validations without improvement (the best weights are restored later)."""

    def __init__(self, patience: int):
        self.patience = patience

    def validation_end(self, run: Any, metrics: dict[str, Any], improved: bool) -> None:
        if self.patience and run.state.evals_without_gain >= self.patience:
            run.state.stop = True
