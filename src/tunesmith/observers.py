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
    run_failed(run, error)     the run stopped on an error (failed.json is written)

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
    def steps_start(self, run: Any, stage: Any) -> None: ...  # gradient steps follow (not for a head fitted in closed form)
    def log(self, run: Any, record: dict[str, Any]) -> None: ...
    def message(self, run: Any, text: str) -> None: ...
    def step_end(self, run: Any) -> None: ...
    def validation_end(self, run: Any, metrics: dict[str, Any], improved: bool) -> None: ...
    def epoch_end(self, run: Any) -> None: ...
    def checkpoint(self, run: Any, path: Path | None) -> None: ...
    def fit_end(self, run: Any) -> None: ...
    def run_end(self, run: Any, ev: dict[str, Any]) -> None: ...
    def run_failed(self, run: Any, error: BaseException) -> None: ...


class Observers(Observer):
    """Several observers as one: each event goes to each, in order."""

    def __init__(self, observers: list[Observer]):
        self.observers = list(observers)

    def fit_start(self, run: Any, stage: Any) -> None:
        for o in self.observers:
            o.fit_start(run, stage)

    def steps_start(self, run: Any, stage: Any) -> None:
        for o in self.observers:
            o.steps_start(run, stage)

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

    def run_failed(self, run: Any, error: BaseException) -> None:
        for o in self.observers:
            try:
                o.run_failed(run, error)
            except Exception:  # noqa: BLE001 - the run's own error is the one to report
                pass


class ConsoleProgress(Observer):
    """The progress bar (steps, loss, throughput) and the lines people read during training."""

    def __init__(self, console: Any, unit: str, show: bool):
        self.console, self.unit, self.show = console, unit, show
        self.progress: Any = None

    def steps_start(self, run: Any, stage: Any) -> None:
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
    """A checkpoint every `train.checkpoint_every` steps, and at the end of an epoch (`checkpoint_epochs`) once
    `checkpoint_minutes` of training have passed since the run started or resumed or the last checkpoint (as
    Lightning's ModelCheckpoint(train_time_interval=...)): a checkpoint of MiniLM (weights, AdamW's moments, the best
    and stage-start copies) takes 2-3.5 s to write, and a 2,000-row run wrote eight of them, 22 s of its 118 s."""

    def __init__(self, every: int, epochs: bool, minutes: float = 0.0):
        self.every, self.epochs, self.seconds = every, epochs, minutes * 60
        self.since: float | None = None  # the training time (run.stages_time_now) at the start or the last checkpoint

    def fit_start(self, run: Any, stage: Any) -> None:
        if self.since is None:
            self.since = run.stages_time_now()

    def checkpoint(self, run: Any, path: Path | None) -> None:
        self.since = run.stages_time_now()

    def step_end(self, run: Any) -> None:
        if self.every and run.state.step % self.every == 0:
            run.save_checkpoint()

    def epoch_end(self, run: Any) -> None:
        # not after the run's last epoch: the run finishes within seconds and a finished run keeps no checkpoints
        # (a kill in those seconds resumes from the one before)
        if self.epochs and run.training_continues():
            due = run.stages_time_now() - (self.since or 0.0) >= self.seconds
            if run.process_max(int(due)):  # every process checkpoints, or none: their clocks differ
                run.save_checkpoint()


class EarlyStopping(Observer):
    """Stop after `patience` validations without improvement (the best weights are restored later)."""

    def __init__(self, patience: int):
        self.patience = patience

    def validation_end(self, run: Any, metrics: dict[str, Any], improved: bool) -> None:
        if self.patience and run.state.evals_without_gain >= self.patience:
            run.state.stop = True


class ReportPage(Observer):
    """report.html once eval.json is written (main process, `eval.report`). The run is finished by then:
    a report that cannot be drawn is a warning and the command `tunesmith report RUN` to retry."""

    def run_end(self, run: Any, ev: dict[str, Any]) -> None:
        if not run.main or not run.cfg.eval.report:
            return
        from tunesmith import run_report

        try:
            path = run_report.write(run.out)
        except Exception as e:  # noqa: BLE001 - drawing must never turn a finished run into a failed one
            run.console.print(f"[yellow]warning: report.html was not written ({type(e).__name__}: {e}); "
                              f"`tunesmith report {run.out}` tries again[/yellow]")
        else:
            run.console.print(f"report: {path}")


TRACKER_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"), "mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb")}


def check_trackers(names: list[str]) -> None:
    """Each tracker train.report_to names can be imported: checked before training, with the pip command."""
    import importlib.util

    from tunesmith.errors import UserError

    for name in names:
        module, package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None and not (name == "tensorboard" and importlib.util.find_spec("tensorboard")):
            raise UserError(f"train.report_to: {name} needs the {package} package: pip install {package} "
                            f"(or pip install 'tunesmith[track]'), or remove {name} from train.report_to")


class Trackers(Observer):
    """train.report_to: the numbers of metrics.jsonl (and the test results at the end) through Accelerate's
    trackers, under the same names: `train/loss`, `train/lr`, `validation/macro_f1`, `test/after/accuracy`.
    Local by default: TensorBoard event files in RUN/tensorboard, an MLflow store in RUN/mlflow.db (SQLite, the
    local store MLflow 3 keeps up to date; `mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`), W&B offline
    in RUN/wandb. A resumed run logs into the same MLflow run (its id is kept in RUN/trackers.json)."""

    def __init__(self, names: list[str], out: Path, config: dict[str, Any]):
        self.names, self.out, self.config = list(names), out, config
        self.trackers: list[Any] = []

    def fit_start(self, run: Any, stage: Any) -> None:
        if self.trackers or not run.main:
            return
        import os

        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        state_file = self.out / "trackers.json"
        state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.exists() else {}
        for name in self.names:
            if name == "tensorboard":
                tracker = TensorBoardTracker("tensorboard", str(self.out))
            elif name == "mlflow":
                import logging

                import mlflow

                for noisy in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..." is not for people
                    logging.getLogger(noisy).setLevel(logging.WARNING)

                if not os.environ.get("MLFLOW_TRACKING_URI"):  # SQLite in the run directory: MLflow 3's local store
                    mlflow.set_tracking_uri(f"sqlite:///{(self.out / 'mlflow.db').resolve()}")
                tracker = MLflowTracker(experiment_name="tunesmith", run_id=state.get("mlflow_run_id"), run_name=self.out.name,
                                        logging_dir=(self.out / "mlflow-artifacts").resolve().as_uri())
            else:
                os.environ.setdefault("WANDB_MODE", "offline")
                os.environ.setdefault("WANDB_DIR", str(self.out))
                tracker = WandBTracker("tunesmith", name=self.out.name)
            tracker.start()
            self.trackers.append(tracker)
            if name == "mlflow":
                state["mlflow_run_id"] = tracker.active_run.info.run_id
        state_file.write_text(json.dumps(state), encoding="utf-8")
        from tunesmith.config import dotted

        params = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in dotted(self.config).items()}
        for t in self.trackers:
            t.store_init_configuration(params)

    def log(self, run: Any, record: dict[str, Any]) -> None:
        if record["type"] == "train":
            values = {f"train/{k}": v for k, v in record.items() if k not in ("type", "step", "epoch", "lr_groups")}
            values.update({f"train/lr/{g}": v for g, v in (record.get("lr_groups") or {}).items()})
        elif record["type"] == "eval":
            values = {f"{record.get('split', 'validation')}/{k}": v for k, v in record.items()
                      if k not in ("type", "step", "epoch", "split", "n")}
        else:
            return
        self._log(values, record["step"])

    def run_failed(self, run: Any, error: BaseException) -> None:
        self.close()

    def run_end(self, run: Any, ev: dict[str, Any]) -> None:
        from tunesmith.run_report import SECTIONS

        values = {f"test/{section}/{k}": v for section in SECTIONS
                  for k, v in (ev.get(section) or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._log(values, run.state.step)
        self.close()

    def close(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []

    def _log(self, values: dict[str, Any], step: int) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self.trackers:
            t.log(values, step=step)

