"""The one training loop, as a recipe read top to bottom (`Recipe.run`):

    prepare_data    the task reads and checks every file (the pre-flight report) before any weights load
    prepare_model   the pre-trained model with its new head; `auto` settled; tokenized once
    for each stage of the strategy (one, unless the strategy trains in stages):
        begin_stage     the strategy freezes and groups parameters; what the loop trains on (its view)
        open_run_dir    (first stage) the run directory, its lock, config.yaml, the observers
        baselines       (first stage) the starting model on the test set, and the task's own baselines
        build_optimizer AdamW and the schedule from the strategy's groups; resume restores them
        fit             epochs -> windows -> micro-batches; validation, checkpoints, early stopping
        restore_best    the weights of the best validation step (not in a soup's runs)
        soup            (LP-FT, small data) the stage again from its start, the runs' last weights averaged
                        (batch-norm statistics measured anew on the training rows)
        keep_better_stage   (a later stage) the previous stage's weights when they were better on validation
    keep_fallback       (LP-FT) the probe stage's logistic regression when fine-tuning ended below it
    release_training_state  AdamW's moments, weight copies, gradients and kept buffers go before evaluating
    final_evaluation    the test set again, and the task's extras (forgetting, samples)
    save            model/ written aside then renamed; eval.json last marks the run finished

`train.stages_s` times the stages (baselines excluded); `train.runtime_s` the optimizer steps alone.
A run that stops on an error after writing config.yaml leaves failed.json (the error, the step,
the checkpoint that can resume it); one that stops before leaves no run directory behind.

The recipe never asks which task or strategy runs: it calls the `Task` and `BaseStrategy`
contracts. What watches training (progress bar, metrics.jsonl, checkpoints, early stopping,
later trackers and reports) subscribes to events (`tunesmith.observers`). Runs unchanged on one
CPU, one GPU, or many processes under `accelerate launch` / `torchrun` (DDP): batches are global
(see `tunesmith.data.batching`), each process takes its slice, so the same config gives the same
optimisation whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tunesmith import checkpoint, runlock
from tunesmith.config import Config, save_config
from tunesmith.data.batching import make_batches, shard
from tunesmith.errors import Interrupted, Stopped, UserError
from tunesmith.model_card import model_card
from tunesmith.models.fastops import clip_grad_norm_, release_buffers, return_freed_memory, speed_up
from tunesmith.models.layers import enable_gradient_checkpointing, recompute_batch_norm, training_batch_norms
from tunesmith.observers import (Checkpointer, ConsoleProgress, EarlyStopping, MetricsLog, Observer, Observers, ReportPage,
                                 Trackers, check_trackers)
from tunesmith.optim import build_optimizer, build_scheduler
from tunesmith.precision import autocast_dtype, resolve_precision
from tunesmith.registry import STRATEGIES, TASKS
from tunesmith.report import make_console, moved_table, param_table, peak_rss_mb, peak_rss_reset, results_table
from tunesmith.strategies.base import ModelParts, Stage, count_params
from tunesmith.strategies.guards import anchor_for
from tunesmith.tasks.base import Runtime

SOUP_SEED_STEP = 7919  # run m of a soup orders its batches with train.seed + m * this (run 0: as without a soup)


@dataclass
class RunResult:
    run_dir: Path
    config: Config
    eval: dict[str, Any]
    model: Any = None  # the trained model, in memory (the saved copy is run_dir/model)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.eval["after"]


@dataclass
class RunState:
    """What fitting changes, in one object: a checkpoint saves it and resume restores it."""

    stage: int = 0
    epoch: int = 1  # the epoch in progress (in a checkpoint: the one to continue)
    window: int = 0  # the next accumulation window of that epoch
    step: int = 0
    samples: int = 0
    tokens: int = 0
    train_time: float = 0.0  # the optimizer steps' segments alone
    stages_time: float = 0.0  # the stages' wall time: feature passes, fitted heads, steps, validation (not the baselines)
    best_metric: float | None = None
    best_step: int = 0
    evals_without_gain: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0
    running_loss: float = 0.0
    running_n: int = 0
    replay: dict[str, Any] | None = None  # the replay sampler as it was when this epoch's batches were drawn
    stop: bool = False  # set by an observer (early stopping) or the step budget
    stopped_early: bool = False
    member: int = 0  # strategy.soup: which fine-tuning run of the stage is in progress (from 0)
    member_scores: list[float] = field(default_factory=list)  # the finished members' best validation values


def preflight(cfg: Config, keep_going: bool = False) -> tuple[Any, Any, Any]:
    """The first phase of every command: the task by name, its model resolved, every data file read
    and checked (the report of `tunesmith validate`) before any weights load. With `keep_going`, a
    model that cannot be resolved is one of the report's errors instead of stopping the check."""
    task = TASKS.get(cfg.task)(cfg)
    resolved, tokenizer, problem, notes = None, None, None, []
    try:
        check_trackers(cfg.train.report_to)
        resolved = task.resolve()
        tokenizer = task.load_tokenizer(resolved)
        notes = task.check_limits(resolved, tokenizer)
    except UserError as e:
        if not keep_going:
            raise
        problem = str(e)
    report = task.validate(tokenizer)
    report.warnings[:0] = notes
    if problem:
        report.errors.append(problem)
    return task, resolved, report


def set_train_mode(model: nn.Module) -> None:
    """train() the model, but keep fully frozen sub-modules in eval mode (no dropout, BN stats fixed)."""
    model.train()

    def visit(m: nn.Module) -> None:
        for child in m.children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                child.eval()
            else:
                visit(child)

    visit(model)


class Recipe:
    """One training run. State lives in attributes; each phase is a method, called in order by `run`."""

    def __init__(self, cfg: Config, quiet: bool = False, observers: list[Observer] | None = None):
        from accelerate import Accelerator

        self.cfg, self.quiet = cfg, quiet
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.main = self.accelerator.is_main_process
        self.console = make_console(quiet or not self.main)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        self.out = Path(cfg.output_dir)
        self.user_config = cfg.to_dict()  # as written (before `auto` and `lr: find` resolve): what resume compares
        self.extra_observers = list(observers or [])
        self.state = RunState()
        self.resume_from: Path | None = None
        self.saved: dict[str, Any] = {}
        self.ev: dict[str, Any] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.opened = True
        self.metrics_log: MetricsLog | None = None
        self.lock: Any = None  # the run directory's lock, once this run holds it
        self.created = False  # this run made output_dir (removed again if it fails before writing anything)
        self.events = Observers([])
        self.interrupted: dict[str, int] = {}
        self.rng_to_restore: tuple[Any, Any] | None = None  # a resumed run's RNG state, set when fitting starts
        self.pending_replay: dict[str, Any] | None = None  # a resumed run's replay sampler, for its first epoch
        self.t0: float | None = None  # start of the timed segment of training in progress
        self.stages_mark: float | None = None  # since when the stages' wall time runs uncounted (None: paused)
        # (best validation value, its step, the weights) of the stage before this one, to keep if it was better
        self.previous: tuple[float | None, int, dict[str, torch.Tensor] | None] = (None, 0, None)
        # LP-FT's logistic regression on the probe stage's features, kept aside: (the best validation score of the
        # fits tried, the kept fit's own, its (weight, bias)); the first decides against fine-tuning, as it did
        # before the fit was chosen on cross-validation
        self.fallback: tuple[float, float, Any] | None = None
        self.soup_sum: dict[str, torch.Tensor] | None = None  # strategy.soup: the finished members' weights, summed
        self.restored = False  # a resumed run's checkpoint is loaded once, into the fit it was written in
        self.fast_ops_said = False
        self.budget_notes: list[str] = []  # this stage's budget lines, shown when its first gradient step is near
        self.shown_notes: set[str] = set()
        self.stages: list[Stage] = []  # set by the recipe
        self.opened = False

    # -- the recipe ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            return self.recipe()
        except Interrupted:
            raise  # a checkpoint was written and the message says how to resume
        except Stopped as e:
            self.mark_failed(e, user_error=True, status="pruned")
            raise
        except UserError as e:
            self.mark_failed(e, user_error=True)
            raise
        except BaseException as e:
            self.mark_failed(e, user_error=False)
            raise

    def recipe(self) -> RunResult:
        self.check_output_dir()
        self.prepare_data()
        self.prepare_model()
        resume_stage = self.state.stage
        stages = self.strategy.stages(self.task)
        self.stages = stages
        with self.signals():
            self.start_stages_clock()
            for i, stage in enumerate(stages):
                if len(stages) > 1:
                    self.console.print(f"stage {i + 1}/{len(stages)}: {stage.role or stage.strategy.name}")
                self.begin_stage(stage)
                if i < resume_stage:  # resuming a later stage: this one's structure (a LoRA wrap) is enough,
                    self.validate_start(skipped=True)  # and the fit it keeps aside as a fallback
                    continue
                if not self.opened:
                    self.pause_stages_clock()  # the run directory and the baselines are not training
                    self.open_run_dir()
                    self.baselines()
                    self.start_stages_clock()
                self.start_stage_state(i)
                self.build_optimizer()
                self.fit()
                self.restore_best()
                self.soup()
                self.keep_better_stage()
        self.keep_fallback()
        self.pause_stages_clock()
        self.release_training_state()
        self.final_evaluation()
        self.save()
        return RunResult(self.out, self.cfg, self.ev, self.whole_model())

    def find_lr(self, png: Path) -> dict[str, Any]:
        """The learning-rate range test on the first stage, instead of training."""
        from accelerate.utils import set_seed

        set_seed(self.cfg.train.seed)
        self.prepare_data()
        self.prepare_model()
        self.begin_stage(self.strategy.stages(self.task)[-1], lr_find_png=png)  # the rate of the stage that fine-tunes
        return self.found

    # -- prepare: data, then model -----------------------------------------------------------------
    def check_output_dir(self) -> None:
        from accelerate.utils import set_seed

        out, cfg = self.out, self.cfg
        if (out / "eval.json").exists() and not cfg.overwrite:
            raise UserError(f"{out} holds a finished run; pass --overwrite (overwrite: true) or choose another output_dir")
        if out.exists() and not out.is_dir():
            raise UserError(f"output_dir {out} exists and is not a directory")
        self.created = not out.exists()
        if cfg.resume:
            self.resume_from = checkpoint.latest(out) if out.is_dir() else None
            if self.resume_from is None and cfg.resume is True:
                raise UserError(f"nothing to resume: {out / checkpoint.DIR} holds no complete checkpoint; run without --resume")
            if self.resume_from is not None:
                self.saved = json.loads((self.resume_from / "state.json").read_text(encoding="utf-8"))
                checkpoint.check_config_change(self.saved["config"], self.user_config, self.resume_from)
                self.state.stage = self.saved.get("stage", 0)
        set_seed(self.cfg.train.seed)

    def prepare_data(self) -> None:
        """The task by name; every data file read and checked (`tunesmith validate`'s report) first."""
        cfg, console = self.cfg, self.console
        self.task, self.resolved, self.report = preflight(cfg)
        if cfg.optim.epochs is None:  # the task's default, recorded in config.yaml as resolved
            cfg.optim.epochs = self.task.default_epochs
        self.report.render(console, full=False)
        if not self.report.ok:
            raise UserError(self.report.error_line())
        self.data = self.task.load_data()
        for s in (self.data.train, self.data.validation, self.data.test):
            skipped = f", {s.skipped} bad rows skipped" if s.skipped else ""
            console.print(f"data: {s.name:<10} {len(s):>6} rows from {s.source}{skipped}")
        labels = self.data.labels
        if labels:
            console.print(f"labels: {len(labels)} ({', '.join(labels[:10])}{' ...' if len(labels) > 10 else ''})"
                          f"{', multi-label' if self.data.multi_label else ''}")
        self.replay = self.task.load_replay(cfg.strategy.replay.file) if cfg.strategy.replay else None
        if self.replay is not None:
            console.print(f"replay: {len(self.replay)} rows from {self.replay.source}, "
                          f"{cfg.strategy.replay.fraction:.0%} of every batch")

    def prepare_model(self) -> None:
        """The pre-trained backbone with a new head sized to the labels; `auto` settled; tokenized once."""
        cfg, console = self.cfg, self.console
        model, head, discarded = self.task.load_model(self.resolved)
        console.print(f"model: {cfg.model} ({self.resolved.source}, {self.resolved.path})")
        if head:
            console.print(f"head: {self.task.head_kept or f'new {len(self.data.labels)}-way head'} ({', '.join(head)})" + (
                f"; discarded pre-trained {', '.join(discarded[:6])}{' ...' if len(discarded) > 6 else ''}" if discarded else ""))
        self.parts = ModelParts(model, head)
        chosen = STRATEGIES.get(cfg.strategy.name).choose(cfg.strategy, self.parts, len(self.data.train), self.device,
                                                          self.task.smallest_class(self.data.train))
        if chosen is not cfg.strategy:  # `auto`: decided now that the model and the data are known
            console.print(f"strategy: {cfg.strategy.name} -> {chosen.name}: {chosen.reason}")
            cfg.strategy = chosen
        self.strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy)
        self.enc = {s.name: self.task.encode(s) for s in (self.data.train, self.data.validation, self.data.test)}
        for line in self.task.describe(self.enc):
            console.print(line)
        self.precision, why = resolve_precision(cfg.train.precision, self.device, self.parts.model)
        amp = autocast_dtype(self.precision)
        console.print(f"device: {self.device.type}, {self.world} process(es), precision {self.precision}" + (f" ({why})" if why else ""))
        from accelerate.utils import gather_object

        self.rt = Runtime(self.device, amp, cfg.eval.batch_size, self.rank, self.world,
                          gather_object if self.world > 1 else (lambda x: x), self.console,
                          self.out if self.main else None, cfg.train.seed)

    # -- a stage: the strategy applied, what the loop trains on --------------------------------------
    def begin_stage(self, stage: Stage, lr_find_png: Path | None = None) -> None:
        cfg, strategy = self.cfg, stage.strategy
        self.stage = stage
        self.groups = strategy.apply(self.parts)
        model = self.parts.model  # LoRA wraps the model
        self.may_train = {id(p) for g in self.groups for _, p in g.params}
        self.lr = stage.lr or cfg.optim.fixed_lr() or self.task.strategy_lr.get(strategy.name) or strategy.default_lr
        trainable, frozen = self.stage_counts = count_params(model)
        self.console.print(f"strategy: {strategy.name}; parameters: {trainable:,} trainable, {frozen:,} frozen")
        self.console.print(param_table(self.groups, self.lr, self.head_rate()))
        if trainable == 0:
            raise UserError(f"strategy '{strategy.name}' leaves no trainable parameters")
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
            self.console.print("gradient checkpointing: on (activations recomputed in the backward pass)")
        model.to(self.device)
        self.clip = self.accelerator.clip_grad_norm_
        if cfg.train.fast_cpu_ops:
            sped = speed_up(model, self.device, self.world)
            if self.device.type == "cpu" and self.world == 1:
                self.clip = clip_grad_norm_
                sped.append("gradient clipping")
            if sped and not self.fast_ops_said:
                self.console.print(f"fast CPU paths: {', '.join(sped)} (train.fast_cpu_ops=false: the plain modules)")
                self.fast_ops_said = True
        self.task.before_training(model, self.enc, self.rt)  # once: a task keeps what it computed (a resumed run: the starting weights)
        self.anchor = None  # the starting values of the pre-trained weights that may train: L2-SP, the moved report
        if strategy.trains_backbone:
            self.anchor = anchor_for(self.parts, self.may_train, bool(cfg.strategy.l2sp), self.resolved.path)
        self.view = strategy.training_view(self.task, model, self.enc, self.rt)
        if self.view.info is not None:
            self.ev["features"] = self.view.info
        self.train_enc = self.view.enc["train"]
        if self.replay is not None:  # replay rows sit after the training rows
            self.train_enc = self.train_enc.concat(self.task.encode(self.replay))
        self.train_lengths = self.train_enc.lengths  # computed once: token counts per step come from here
        self.choose_lr(lr_find_png)

    def choose_lr(self, lr_find_png: Path | None) -> None:
        """The stage's rate: fixed, the one a resumed run started with, or from the range test."""
        self.found = None
        if self.stage.lr is not None:  # the stage sets its own
            return
        if self.resume_from is not None:
            self.lr, self.found = self.saved["lr"], self.saved.get("lr_find")
        elif self.cfg.optim.lr == "find" or lr_find_png is not None:
            from tunesmith.lr_find import lr_find

            png = lr_find_png if lr_find_png is not None else (self.out / "lr_find.png" if self.main else None)
            found = lr_find(self.view.task, self.view.model, self.groups, self.train_enc, self.cfg, self.device,
                            self.rt.amp, png, self.console, fallback=self.stage.strategy.default_lr)
            self.console.print(f"lr-find: suggested lr {found['suggested_lr']:.2e} (loss lowest at {found['min_loss_lr']:.2e}, "
                               f"steepest descent at {found['steepest_lr']:.2e}); plot: {png}")
            self.found = {k: v for k, v in found.items() if k not in ("lrs", "losses", "smoothed")}
            self.lr = found["suggested_lr"]
        if self.found is not None:
            self.ev["lr_find"] = self.found

    def open_run_dir(self) -> None:
        """The run directory: lock, room on disk, config.yaml as resolved, metrics.jsonl, the observers."""
        out, cfg, main = self.out, self.cfg, self.main
        out.mkdir(parents=True, exist_ok=True)
        self.lock = runlock.acquire(out) if main else None
        if main:  # model/ (LoRA: and its adapter) plus tokenizer files; checkpoints: weights, 2 AdamW moments, best copy
            weights = sum(t.numel() * t.element_size() for t in self.parts.model.state_dict().values())
            per_ckpt = 4 * sum(p.numel() * p.element_size() for g in self.groups for _, p in g.params)
            ckpts = (cfg.train.keep_checkpoints + 2) * per_ckpt if (cfg.train.checkpoint_every or cfg.train.checkpoint_epochs) else 0
            runlock.check_disk(out, int(weights * 1.2) + ckpts + 50 * 2**20, "the model and checkpoints this run writes")
        if main:
            (out / runlock.FAILED).unlink(missing_ok=True)  # this run replaces the record of one that failed here
        if cfg.overwrite and main and self.resume_from is None:
            for stale in ("eval.json", "metrics.jsonl", "model", checkpoint.DIR, "report.html", "report", "samples.md", "samples.jsonl",
                          "tensorboard", "mlflow.db", "mlflow-artifacts", "trackers.json", "wandb"):
                p = out / stale
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        if main:  # with the rate actually used (a strategy's default, a found one), not null
            save_config(cfg, out / "config.yaml", lr=float(self.lr))
        self.opened = True  # config.yaml written: from here on a failure is recorded in failed.json
        self.metrics_log = MetricsLog(out / "metrics.jsonl" if main else None,
                                      self.saved["step"] if self.resume_from is not None else None)
        self.events = Observers([
            ConsoleProgress(self.console, self.task.unit, show=not (self.quiet or not main)),
            self.metrics_log,
            Checkpointer(cfg.train.checkpoint_every, cfg.train.checkpoint_epochs, cfg.train.checkpoint_minutes),
            EarlyStopping(cfg.train.early_stopping),
            ReportPage(),
            *([Trackers(cfg.train.report_to, out, self.user_config)] if cfg.train.report_to and main else []),
            *self.extra_observers,
        ])

    def baselines(self) -> None:
        """The starting model on the held-out test set, plus what the task compares against (linear probe)."""
        if self.cfg.eval.before:
            self.ev.update(self.view.task.baseline(self.view.model, self.view.enc, self.rt))

    def start_stage_state(self, i: int) -> None:
        """Counters that belong to one stage start afresh (the step count runs on across stages)."""
        s = self.state
        # a later stage must beat the one before on validation to be kept: remember where it starts
        comparable = i > 0 and s.best_metric is not None and self.stage.compare_previous
        # a stage that is only the next one's start (LP-FT's probe stage) is not kept instead of it: the logistic
        # regression fitted on the same features stands in for it (the fallback), where there is one
        score = None if i > 0 and self.stages[i - 1].start_only and self.fallback_head() else s.best_metric
        self.previous = (score, s.best_step, self.snapshot() if comparable else None)
        s.stage, s.member, s.member_scores = i, 0, []
        self.start_fit_state()

    def start_fit_state(self) -> None:
        """What one fit of a stage counts starts afresh: its epochs, best weights and early stopping."""
        s = self.state
        s.epoch, s.window, s.replay = 1, 0, None
        s.best_metric, s.best_step, s.evals_without_gain, s.stop, s.stopped_early = None, 0, 0, False, False
        self.best_state = None

    def build_optimizer(self) -> None:
        """AdamW and the schedule from the strategy's groups; a resumed run gets its saved state back."""
        cfg = self.cfg
        self.epochs, self.total_steps = self.budget()
        self.optimizer = build_optimizer(self.groups, cfg.optim, self.lr, self.head_rate())
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.ev.setdefault("optimizer", []).append({
            "stage": self.state.stage, "strategy": self.stage.strategy.name, "lr": self.lr, "steps": self.total_steps,
            "groups": [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in self.optimizer.param_groups]})
        self.train_model, self.optimizer = self.accelerator.prepare(self.view.model, self.optimizer)
        # every weight that may ever train (gradual unfreezing adds some later): checkpoints and the best copy
        self.trainable_params = [(n, p) for n, p in self.accelerator.unwrap_model(self.train_model).named_parameters()
                                 if id(p) in self.may_train]
        self.replay_rng = np.random.default_rng(cfg.train.seed + 1)
        self.replay_order: list[int] = []
        self.replay_seen = 0
        self.running_loss = torch.zeros((), device=self.device)
        self.window_loss = torch.zeros((), device=self.device)
        self.window_n = 0
        self.stage.first_step = self.state.step
        self.restore_checkpoint()
        self.last_step = self.stage.first_step + self.total_steps  # the step count runs on across stages

    def head_rate(self) -> float | None:
        """A new head beside pre-trained weights gets its own, higher rate; alone, it has the stage's rate (None)."""
        beside = any(g.params for g in self.groups if g.name != "head")
        return (self.cfg.optim.head_lr or max(self.task.head_lr or 0.0, self.lr)) if beside else None

    def batch_size(self) -> int:
        """This stage's global batch: optim.batch_size, unless the stage's rows are another unit (contrastive's pairs)."""
        return self.stage.batch_size or self.cfg.optim.batch_size

    def budget(self) -> tuple[int, int]:
        """(epochs, optimizer steps) of this stage: on small data, exactly optim.min_steps steps (the last epoch
        partial), the schedule spanning them."""
        o, rows = self.cfg.optim, len(self.view.enc["train"])
        steps_per_epoch = math.ceil(math.ceil(rows / self.batch_size()) / o.grad_accum)
        epochs = self.stage.epochs or o.epochs
        total = steps_per_epoch * epochs
        self.budget_notes = []  # printed by fit() once it knows gradient steps follow (not for a closed-form head)
        if self.stage.batch_size is None and 0 < rows < o.batch_size:
            self.budget_notes.append(f"note: optim.batch_size {o.batch_size} is more than the {rows} training rows: every step "
                                     f"sees all of them (one step an epoch); set optim.batch_size to {rows} or less to take several")
        if not self.stage.epochs and o.min_steps and total < o.min_steps:
            total, epochs = o.min_steps, math.ceil(o.min_steps / steps_per_epoch)
            self.budget_notes.append(f"budget: {self.stage.epochs or o.epochs} epoch(s) x {steps_per_epoch} steps < "
                                     f"optim.min_steps={o.min_steps}: {total} steps ({total / steps_per_epoch:.1f} epochs), "
                                     "the best validation weights kept (optim.min_steps=0: as configured)")
        return epochs, min(total, o.max_steps) if o.max_steps else total

    def restore_checkpoint(self) -> None:
        if self.resume_from is None or self.restored or self.saved.get("stage", 0) != self.state.stage:
            return
        self.restored = True  # a soup's later members start afresh
        resumed = checkpoint.load(self.resume_from, self.rank)
        st = resumed["state"]
        if resumed["rng_world"] != self.world:
            self.console.print(f"note: the checkpoint was written by {resumed['rng_world']} process(es), this run has "
                               f"{self.world}: random streams (dropout) do not continue exactly")
        with torch.no_grad():
            named = self.state_tensors(moving=True)
            for n, t in resumed["weights"].items():
                named[n].copy_(t.to(named[n].device))
        self.best_state = resumed["best"]
        self.soup_sum = resumed["soup"]
        if resumed["stage_start"] is not None:  # this stage must still beat the one before it
            self.previous = (*st["previous"], resumed["stage_start"])
        self.optimizer.load_state_dict(resumed["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.state = RunState(**{k: st[k] for k in asdict(RunState()) if k in st})
        self.running_loss.fill_(st["running_loss"])
        self.stage.first_step = st.get("stage_first_step", 0)
        self.rng_to_restore = (resumed["rng_tensors"], st["rng"])
        self.pending_replay = st["replay"]
        self.console.print(f"resumed from {self.resume_from} (step {self.state.step}, epoch {self.state.epoch})")

    # -- fit: epochs, windows, micro-batches ------------------------------------------------------
    def fit(self) -> None:
        s = self.state
        set_train_mode(self.train_model)
        peak_rss_reset()
        self.events.fit_start(self, self.stage)
        fitted = self.validate_start()  # a head fitted in closed form is the stage's result: no steps follow
        if not fitted:
            for note in self.budget_notes:
                if note not in self.shown_notes:  # once a run (the stages of LP-FT, a soup's runs)
                    self.shown_notes.add(note)
                    self.console.print(note)
            self.events.steps_start(self, self.stage)
        if self.rng_to_restore is not None:
            checkpoint.set_rng_state(*self.rng_to_restore)
            self.rng_to_restore = None
        start_epoch, start_window = s.epoch, s.window
        if fitted:
            self.last_epoch = 0
        for epoch in range(start_epoch, 0 if fitted else self.epochs + 1):
            s.epoch = self.last_epoch = epoch
            self.train_epoch(epoch, start_window if epoch == start_epoch else 0)
            if s.stop:
                break
            if self.cfg.eval.every_epoch and not self.cfg.train.eval_every:
                self.validate()
                if s.stop:
                    s.stopped_early = True
                    break
            s.epoch, s.window = epoch + 1, 0
            self.events.epoch_end(self)
            if s.step >= self.last_step:
                break
        self.events.fit_end(self)
        self.train_peak = peak_rss_mb()

    def train_epoch(self, epoch: int, first_window: int) -> None:
        s, cfg = self.state, self.cfg
        batches = self.epoch_batches(epoch)
        self.t0 = time.perf_counter()
        for w in range(first_window, len(batches), cfg.optim.grad_accum):
            # gradual unfreezing: more blocks join, counted from this stage's first step (LP-FT's probe stage came before)
            changed = self.stage.strategy.update(s.step - self.stage.first_step, epoch)
            if changed:
                if self.world > 1:  # DDP registers the trainable set when it wraps: wrap again
                    self.train_model = self.accelerator.prepare_model(self.accelerator.unwrap_model(self.train_model))
                set_train_mode(self.train_model)
                self.events.message(self, changed)
            window = batches[w : w + cfg.optim.grad_accum]
            self.train_window(window)
            s.window = w + cfg.optim.grad_accum
            if self.finish_step(window, epoch):  # validation is due (train.eval_every): not timed as training
                self.end_segment()
                self.validate()
                self.t0 = time.perf_counter()
                if s.stop:
                    s.stopped_early = True
                    break
            self.events.step_end(self)
            self.check_interrupt()
            if s.step >= self.last_step:  # optim.max_steps reached mid-epoch
                break
        self.end_segment()

    def end_segment(self) -> None:
        """Add the timed segment in progress to the training time."""
        if self.t0 is not None:
            self.state.train_time += time.perf_counter() - self.t0
            self.t0 = None

    def training_continues(self) -> bool:
        """Whether optimizer steps remain after this point: a later stage, a later run of a soup, or steps left in this one."""
        s = self.state
        return s.stage < self.n_stages - 1 or s.member < self.soup_size() - 1 or not (s.stop or s.step >= self.last_step)

    def stages_time_now(self) -> float:
        """The stages' wall time so far, the running stretch included."""
        running = time.perf_counter() - self.stages_mark if self.stages_mark is not None else 0.0
        return self.state.stages_time + running

    def start_stages_clock(self) -> None:
        self.stages_mark = time.perf_counter()

    def pause_stages_clock(self) -> None:
        """Stop counting the stages' wall time (the baselines, the final evaluation are not training)."""
        self.state.stages_time = self.stages_time_now()
        self.stages_mark = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This epoch's global batches (seeded by epoch), with replay rows added to each."""
        cfg, s = self.cfg, self.state
        if self.pending_replay is not None:  # resumed: the replay sampler as it was when these batches were drawn
            self.replay_rng.bit_generator.state = self.pending_replay["rng"]
            self.replay_order, self.replay_seen = list(self.pending_replay["order"]), self.pending_replay["seen"]
            self.pending_replay = None
        s.replay = {"rng": self.replay_rng.bit_generator.state, "order": list(self.replay_order), "seen": self.replay_seen}
        n_train = len(self.view.enc["train"])
        # a model soup's later runs (strategy.soup) draw other batch orders
        batches = make_batches(self.view.enc["train"].lengths, self.batch_size(), seed=cfg.train.seed + SOUP_SEED_STEP * s.member,
                               epoch=epoch, group_by_length=cfg.train.group_by_length)
        if self.world > 1:  # every process must step together: drop a final batch too small to split
            batches = [b for b in batches if len(b) >= self.world]
        if self.replay is None:
            return batches
        share, out = cfg.strategy.replay.fraction, []
        for b in batches:
            k = max(1, round(len(b) * share / (1 - share)))
            while len(self.replay_order) < k:
                self.replay_order.extend((n_train + self.replay_rng.permutation(len(self.train_enc) - n_train)).tolist())
            out.append(b + self.replay_order[:k])
            self.replay_seen += k
            del self.replay_order[:k]
        return out

    def train_window(self, window: list[list[int]]) -> None:
        """Forward and backward over one accumulation window; gradients all-reduced once, at its end."""
        task, enc, cfg = self.view.task, self.train_enc, self.cfg
        # each micro-batch's loss is a mean over its units (rows; trained tokens for causal-lm): weighted
        # by its share of the window's units, the step is the exact mean over the window
        window_units = sum(task.weight(enc, b) for b in window) or 1.0
        amp = self.rt.amp
        for j, global_batch in enumerate(window):
            idx = shard(global_batch, self.rank, self.world)
            micro = cfg.train.micro_batch_size or len(idx) or 1
            chunks = [idx[c : c + micro] for c in range(0, len(idx), micro)] or [idx]
            for c, chunk in enumerate(chunks):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in task.collate(enc, chunk).items()}
                sync = j == len(window) - 1 and c == len(chunks) - 1
                with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.train_model):
                    with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                        loss = task.step(self.train_model, batch)["loss"]
                    self.accelerator.backward(loss * (task.weight(enc, chunk) * self.world / window_units))
                self.window_loss += loss.detach() * len(chunk)  # counted once the step is known to be finite
                self.window_n += len(chunk)
            self.state.tokens += sum(self.train_lengths[i] for i in global_batch)  # host-side: no device sync

    def finish_step(self, window: list[list[int]], epoch: int) -> bool:
        """Clip, check, step; log. Returns True when validation is due now (train.eval_every)."""
        s, cfg = self.state, self.cfg
        if cfg.strategy.l2sp and self.anchor is not None:  # after the all-reduce: the same on every process
            self.anchor.add_l2sp_grad_(cfg.strategy.l2sp)
        if cfg.optim.max_grad_norm:
            norm = self.clip(self.train_model.parameters(), cfg.optim.max_grad_norm)
        else:
            grads = [p.grad for p in self.train_model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        # A host-device sync per step, on purpose: a NaN/inf gradient must never reach the weights.
        # Gradients are all-reduced, so every process decides the same way.
        if not bool(torch.isfinite(norm)):
            self.skip_step(epoch)
            return False
        s.bad_in_row = 0
        self.running_loss += self.window_loss
        s.running_n += self.window_n
        self.window_loss.zero_()
        self.window_n = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        s.samples += sum(len(b) for b in window)
        if s.step % cfg.train.log_every == 0 or s.step == self.last_step:
            self.log_train(epoch)
        return bool(cfg.eval.every_epoch and cfg.train.eval_every and s.step % cfg.train.eval_every == 0)

    def skip_step(self, epoch: int) -> None:
        s = self.state
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the batch is consumed: the schedule stays aligned with the data
        s.step += 1
        s.skipped_steps += 1
        s.bad_in_row += 1
        self.window_loss.zero_()
        self.window_n = 0
        self.events.log(self, {"type": "skip", "step": s.step, "epoch": epoch, "reason": "non-finite gradient"})
        self.events.message(self, f"step {s.step}: gradient is NaN/inf, step skipped ({s.bad_in_row} in a row)")
        if s.bad_in_row >= self.cfg.train.max_bad_steps:
            self.metrics_log.close()
            raise UserError(
                f"the gradient was NaN/inf for {s.bad_in_row} steps in a row (last at step {s.step}, "
                f"lr {self.scheduler.get_last_lr()[-1]:.1e}); nothing was saved. Lower optim.lr (see "
                "`tunesmith lr-find`) or use train.precision=fp32"
            )

    def log_train(self, epoch: int) -> None:
        s = self.state
        elapsed = s.train_time + time.perf_counter() - self.t0
        mean_loss = self.running_loss.item() / max(s.running_n, 1)  # host-device sync, once per log step
        self.running_loss.zero_()
        s.running_n = 0
        lrs = self.scheduler.get_last_lr()
        record = {"type": "train", "step": s.step, "epoch": epoch, "loss": mean_loss, "lr": lrs[-1],
                  "lr_groups": {g.get("name", str(i)): lr for i, (g, lr) in enumerate(zip(self.optimizer.param_groups, lrs))},
                  "samples_per_s": s.samples / elapsed, "tokens_per_s": s.tokens / elapsed}
        if self.cfg.strategy.l2sp and self.anchor is not None:
            record["l2sp_distance"] = self.anchor.distance()
        self.events.log(self, record)

    def validate_start(self, skipped: bool = False) -> bool:
        """A stage whose head can be fitted in closed form (logistic regression on cached features) takes that fit
        as its result, validated: True, and no gradient steps follow. A fit kept aside instead (LP-FT's probe
        stage, whose own trained head is where fine-tuning starts) becomes the run's fallback, also when a
        resumed run skips the stage. Not on resuming this stage (the checkpoint holds the weights)."""
        resumed_here = self.resume_from is not None and self.saved.get("stage", 0) == self.state.stage
        if self.view.start is None or (resumed_here and not skipped):
            return False
        chosen = self.view.start()
        if chosen is None:
            return False
        self.ev.setdefault("features", {})["probe_start"] = chosen
        if not chosen["installed"]:
            metric = self.cfg.train.metric
            self.fallback = (chosen.get("best_on_validation", chosen[metric]), chosen[metric], self.stage.strategy.fitted_head)
            return False
        if not skipped:
            self.validate()
        return True

    def validate(self) -> None:
        """Evaluate on validation; keep a copy of the best weights."""
        s, metric = self.state, self.cfg.train.metric
        self.share_buffers()
        m, _ = self.view.task.evaluate(self.accelerator.unwrap_model(self.train_model), self.view.enc["validation"], self.rt)
        self.events.log(self, {"type": "eval", "split": "validation", "step": s.step, "epoch": s.epoch,
                               **{k: v for k, v in m.items() if k not in ("per_class", "confusion_matrix")}})
        improved = self.task.better(metric, m[metric], s.best_metric)
        if improved:
            s.best_metric, s.best_step, s.evals_without_gain = m[metric], s.step, 0
            # a CPU copy of what can change (trainable weights, batch-norm statistics): frozen weights cannot. Not in a
            # model soup's stage: its runs keep their last weights and the soup is the result (`restore_best`, `soup`)
            if self.soup_size() < 2:
                self.best_state = {n: t.detach().to("cpu", copy=True) for n, t in self.state_tensors(moving=True).items()}
        else:
            s.evals_without_gain += 1
        self.events.validation_end(self, m, improved)
        set_train_mode(self.train_model)

    # -- checkpoints and interruption ---------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """A collective: every process adds its RNG state; the main process writes."""
        rng = [checkpoint.rng_state()]
        if self.world > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)
        if not self.main:
            return None
        s = self.state
        # mid-epoch: the replay sampler as it was when this epoch's batches were drawn (they are redrawn
        # on resume); at an epoch's end: as it is now, ready for the next epoch
        replay = s.replay if s.window else {"rng": self.replay_rng.bit_generator.state,
                                            "order": list(self.replay_order), "seen": self.replay_seen}
        in_segment = time.perf_counter() - self.t0 if self.t0 is not None else 0.0
        state = {**asdict(s), "train_time": s.train_time + in_segment, "stages_time": self.stages_time_now(),
                 "replay": replay, "running_loss": self.running_loss.item(),
                 "previous": list(self.previous[:2]),
                 "scheduler": self.scheduler.state_dict(), "config": self.user_config, "lr": self.lr,
                 "lr_find": self.found, "stage_first_step": self.stage.first_step}
        path = checkpoint.save(self.out, s.step, self.state_tensors(moving=True), self.best_state, self.optimizer, state,
                               self.cfg.train.keep_checkpoints, s.best_step, rng=rng, stage_start=self.previous[2],
                               soup=self.soup_sum)
        self.events.checkpoint(self, path)
        return path

    @contextlib.contextmanager
    def signals(self) -> Any:
        """Ctrl-C / SIGTERM: finish the step, write a checkpoint, say how to resume. A second Ctrl-C quits at once."""
        handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            def on_signal(signum: int, _frame: Any) -> None:
                if self.interrupted:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    raise KeyboardInterrupt
                self.interrupted["sig"] = signum

            handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def share_buffers(self) -> None:
        """Under DDP every process takes rank 0's buffers, the batch-norm running statistics among them: DDP broadcasts
        rank 0's before each forward, then each process moves them with its own part of the batch, and evaluations
        are sharded across processes (and rank 0's model is the one saved). Training is unchanged: the next forward
        broadcasts rank 0's buffers anyway."""
        if self.world > 1:
            for b in self.accelerator.unwrap_model(self.train_model).buffers():
                torch.distributed.broadcast(b, src=0)

    def process_max(self, value: int) -> int:
        """The largest `value` over the processes (one all-reduce under DDP): for decisions every process must share."""
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def check_interrupt(self) -> None:
        if self.world > 1:  # a signal may reach the processes at different steps: all stop at the same one
            sig = self.process_max(self.interrupted.get("sig", 0))
            if sig:
                self.interrupted.setdefault("sig", sig)
        if not self.interrupted:
            return
        s = self.state
        path = self.save_checkpoint()
        self.metrics_log.close()
        name = signal.Signals(self.interrupted["sig"]).name
        raise Interrupted(
            f"interrupted by {name} after step {s.step}; checkpoint {path}; resume with: tunesmith train CONFIG --resume",
            128 + self.interrupted["sig"],
        )

    # -- after fitting ------------------------------------------------------------------------------
    def restore_best(self) -> None:
        s = self.state
        if self.best_state is None or self.soup_size() > 1:  # a soup's runs keep their last weights (see `soup`)
            return
        self.load_weights(self.best_state, moving=True)
        if s.stopped_early or s.best_step != s.step:
            self.console.print(f"restored the best weights (step {s.best_step}, validation {self.cfg.train.metric} "
                               f"{s.best_metric:.4f})")

    @property
    def n_stages(self) -> int:
        return len(self.stages) or 1  # one before the recipe has set them (the learning-rate range test)

    def soup_size(self) -> int:
        """How many fine-tuning runs of this stage are averaged (strategy.soup; 1: none)."""
        if not self.stage.soup or self.previous[2] is None:  # not a soup's stage (Stage.soup), or no shared start
            return 1
        return self.cfg.strategy.soup_runs(len(self.view.enc["train"]))

    def soup(self) -> None:
        """A uniform model soup (Wortsman et al., ICML 2022): the stage is trained again from the same start,
        each member with its own batch order and dropout (the random streams run on), and the members' weights
        at the end of their schedules are averaged, as the paper averages finished fine-tuning runs. On small
        data one fine-tuning run's outcome swings by points with the seed; the average of runs from one start
        lies in the same basin and beats the runs' mean. Each run's best validation step is scored, not
        restored: on a validation set of a dozen rows those steps lie far apart and their average is worse
        (docs/strategies.md). The soup is the stage's model; against the stage before and the fallback it
        counts as the best of its runs' scores and its own."""
        k, start, s = self.soup_size(), self.previous[2], self.state
        if k < 2:
            return
        while True:
            self.add_member()
            if s.member == k:
                break
            if s.member == 1:
                self.console.print(f"model soup (strategy.soup={self.cfg.strategy.soup}, {len(self.view.enc['train'])} training "
                                   f"rows): {k} fine-tuning runs from the same start, their last weights averaged; 1: one run")
            self.console.print(f"model soup: fine-tuning run {s.member + 1}/{k} from the stage's start, its own batch order")
            self.load_weights(start)
            self.start_fit_state()
            self.build_optimizer()
            self.fit()
            self.restore_best()
        self.load_weights({n: v / k for n, v in self.soup_sum.items()}, moving=True)
        self.soup_sum = None
        remeasured = self.remeasure_batch_norm()
        s.best_metric = None  # the soup is the stage's result, whatever its members scored
        self.validate()
        metric, soup_score = self.cfg.train.metric, s.best_metric
        # Against the stage before and the fallback, the stage counts as its best run, as it would without a soup:
        # each run's score is the best of many validation passes, the soup's is one, so on a small validation set
        # the soup reads lower than its runs while it does better on held-out rows (docs/strategies.md).
        for v in s.member_scores:
            if v is not None and self.task.better(metric, v, s.best_metric):
                s.best_metric = v
        self.ev["soup"] = {"members": k, f"member_{metric}": s.member_scores, metric: soup_score, "stage_score": s.best_metric,
                           "batch_norm_remeasured": remeasured}
        runs = ", ".join("-" if v is None else f"{v:.4f}" for v in s.member_scores)
        self.console.print(f"model soup of {k} fine-tuning runs: validation {metric} {soup_score:.4f} (the runs' best: {runs}; "
                           f"the stage counts as {s.best_metric:.4f} against the probe stage; strategy.soup=1: one run)")

    def remeasure_batch_norm(self) -> int:
        """A soup's batch-norm statistics, measured anew on the training rows (one pass, no gradients; every
        process over all rows, with its own augmentation draws; the saved model is the main process's): the
        averaged running statistics do not describe the averaged weights' activations (models/layers.py).
        Nothing to do for a model without batch norm (transformers)."""
        model, task, enc = self.train_model, self.view.task, self.view.enc["train"]
        set_train_mode(model)
        norms = training_batch_norms(model)
        if not norms:
            return 0
        t0, amp = time.perf_counter(), self.rt.amp

        def forward_all() -> None:
            for b in make_batches(enc.lengths, self.batch_size(), seed=self.cfg.train.seed, epoch=0, shuffle=False):
                batch = {k: v.to(self.device) for k, v in task.collate(enc, b).items()}
                with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                    task.step(model, batch)

        recompute_batch_norm(model, norms, forward_all)
        set_train_mode(model)
        self.console.print(f"model soup: the statistics of {len(norms)} batch-norm layers measured anew on the {len(enc)} "
                           f"training rows ({time.perf_counter() - t0:.1f} s)")
        return len(norms)

    def add_member(self) -> None:
        """The finished member's weights (its last step's) join the soup's sum; its best validation score is kept."""
        s = self.state
        with torch.no_grad():
            moving = {n: t.detach().to("cpu", torch.float32) for n, t in self.state_tensors(moving=True).items()}
            if self.soup_sum is None:
                self.soup_sum = {n: t.clone() for n, t in moving.items()}
            else:
                for n, t in moving.items():
                    self.soup_sum[n].add_(t)
        s.member_scores.append(s.best_metric)
        s.member += 1

    def state_tensors(self, moving: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter and floating buffer (batch-norm statistics move in training too); `moving`: only the
        parameters that may train, with the buffers: what the best copy and checkpoints hold."""
        model = self.view.model  # this stage's model (stage set-up has run; the optimizer may not have)
        params = self.trainable_params if moving else model.named_parameters()
        return {**{n: b for n, b in model.named_buffers() if b.is_floating_point()}, **dict(params)}

    def load_weights(self, weights: dict[str, torch.Tensor], moving: bool = False) -> None:
        """Copy CPU weights (the best step's, the stage's start, a soup's mean) into the model's tensors of those names."""
        with torch.no_grad():
            for n, t in self.state_tensors(moving).items():
                if n in weights:
                    t.copy_(weights[n].to(t.device))

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().to("cpu", copy=True) for n, t in self.state_tensors().items()}

    def keep_better_stage(self) -> None:
        """When a stage ends below the stage before it on validation, the model goes back to where it began."""
        s, metric = self.state, self.cfg.train.metric
        best, step, start = self.previous
        if (start is None or best is None or s.best_metric is None or not self.task.better(metric, best, s.best_metric)
                or best == s.best_metric):
            return
        self.load_weights(start)
        self.console.print(f"kept the previous stage: its validation {metric} {best:.4f} beats this stage's {s.best_metric:.4f}")
        self.ev["kept_stage"] = {"stage": s.stage - 1, metric: best, "instead_of": s.best_metric}
        s.best_metric, s.best_step = best, step

    def keep_fallback(self) -> None:
        """LP-FT: when the fine-tuned model ends below the logistic regression fitted on the probe stage's features
        (on validation), the model becomes that regression: the weights as the fine-tuning stage began, its head set
        to the fit. So a run never ends below the linear probe it could have kept."""
        s, metric = self.state, self.cfg.train.metric
        start = self.previous[2]
        if self.fallback is None or start is None or s.best_metric is None:
            return
        score, own, (weight, bias) = self.fallback
        head = self.fallback_head()
        if not head or not self.task.better(metric, score, s.best_metric) or score == s.best_metric:
            return
        self.load_weights(start)
        with torch.no_grad():
            for p in head:
                p.copy_((weight if p.ndim == 2 else bias).to(p))
        chosen = "" if own == score else f"; the fit kept, chosen on cross-validation, scores {own:.4f}"
        self.console.print(f"kept the logistic regression on the probe stage's features: its validation {metric} {score:.4f} "
                           f"beats fine-tuning's {s.best_metric:.4f}{chosen}")
        self.ev["kept_stage"] = {"stage": "logistic regression", metric: score, "instead_of": s.best_metric, f"fit_{metric}": own}
        self.ev["features"]["probe_start"]["installed"] = True  # the fit is the model's head now
        s.best_metric = own

    def fallback_head(self) -> list[nn.Parameter]:
        """This stage's head, where the fallback's fit can be set on it (one linear layer of the fit's shapes); else []."""
        if self.fallback is None:
            return []
        weight, bias = self.fallback[2]
        head = [p for g in self.groups if g.name == "head" for _, p in g.params]
        return head if sorted(tuple(p.shape) for p in head) == sorted([tuple(weight.shape), tuple(bias.shape)]) else []

    def release_training_state(self) -> None:
        """Training is over: AdamW's moments, the best and previous-stage copies, the gradients and the fast
        paths' kept buffers go before the final evaluation, and the freed heap goes back to the OS (the
        evaluation's activations would otherwise come on top of them: 170 MB of MiniLM's peak RSS)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        self.best_state = None
        self.previous = (*self.previous[:2], None)
        release_buffers(self.parts.model)
        gc.collect()
        return_freed_memory()

    def whole_model(self) -> nn.Module:
        """The model with its head (under feature extraction the loop trained the head alone)."""
        return self.parts.model

    def final_evaluation(self) -> None:
        s, ev = self.state, self.ev
        self.share_buffers()
        trained = self.accelerator.unwrap_model(self.train_model)
        trained.eval()
        self.whole_model().eval()
        ev["validation_best"] = {self.cfg.train.metric: s.best_metric, "step": s.best_step} if s.best_metric is not None else None
        ev.update(self.view.task.final(trained, self.view.enc, self.rt, ev))
        moved = self.stage.strategy.moved() or (self.anchor.moved() if self.anchor is not None else None)
        if moved:
            ev["weights_moved"] = moved
            self.console.print(moved_table(moved))
        train_time = s.train_time
        ev["train"] = {
            "runtime_s": train_time, "stages_s": s.stages_time, "samples_per_s": s.samples / train_time if train_time else 0.0,
            "tokens_per_s": s.tokens / train_time if train_time else 0.0, "peak_rss_mb": self.train_peak,
            "steps": s.step, "epochs_run": self.last_epoch, "stopped_early": s.stopped_early,
            "skipped_steps": s.skipped_steps, "best_step": s.best_step, "precision": self.precision,
            "processes": self.world, "device": self.device.type,
        }
        ev["data_report"] = self.report.to_dict()
        ev["data"] = {x.name: {"rows": len(x), "source": x.source, "skipped": x.skipped, "truncated": self.enc[x.name].truncated}
                      for x in (self.data.train, self.data.validation, self.data.test)}
        if self.replay is not None:
            ev["data"]["replay"] = {"rows": len(self.replay), "source": self.replay.source, "samples_seen": self.replay_seen}
        trainable, frozen = self.stage_counts  # what the strategy chose, before any unfreezing
        ev.update(labels=self.data.labels, task=self.cfg.task, strategy=self.cfg.strategy.name, model=self.cfg.model,
                  strategy_reason=self.cfg.strategy.reason)
        ev["parameters"] = {"trainable": trainable, "frozen": frozen, "trainable_at_end": count_params(trained)[0]}

    def mark_failed(self, e: BaseException, user_error: bool, status: str = "failed") -> None:
        """A run that stops on an error leaves a directory that says so: failed.json with the error, where it
        stopped and whether a checkpoint can resume it. One that fails before writing anything leaves nothing."""
        if not self.main:
            return
        out = self.out
        if not self.opened:  # stopped before writing anything: leave the directory as it was
            if self.lock is not None:
                self.lock.close()
                self.lock = None
                if self.created:
                    shutil.rmtree(out, ignore_errors=True)
            return
        self.events.run_failed(self, e)  # metrics.jsonl closed, trackers finished
        if self.metrics_log is not None:
            self.metrics_log.close()
        ckpt = checkpoint.latest(out)
        record = {
            "status": status, "error": str(e) or type(e).__name__, "type": type(e).__name__,
            "user_error": user_error, "step": self.state.step, "stage": self.state.stage,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(ckpt) if ckpt is not None else None,
            "resume": "tunesmith train CONFIG --resume" if ckpt is not None else None,
        }
        if not user_error:
            record["traceback"] = traceback.format_exc()
        try:
            tmp = out / (runlock.FAILED + ".tmp")
            tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
            os.replace(tmp, out / runlock.FAILED)
        except OSError:
            pass  # the disk that failed the run may refuse this too; the error still reaches the user
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    # -- artifacts ----------------------------------------------------------------------------------
    def save(self) -> None:
        """model/ first (written aside, then renamed), eval.json last: it marks the run finished."""
        out, ev = self.out, self.ev
        self.accelerator.wait_for_everyone()
        if self.main:
            tmp = out / "model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            card = self.task.card()
            card["usage"] = card["usage"].replace("RUN", str(out))
            try:
                saved = self.stage.strategy.save(self.whole_model(), self.task, tmp)
                (tmp / "README.md").write_text(model_card(self.cfg, {**ev, "lr": float(self.lr)}, card), encoding="utf-8")
            except OSError as e:  # a full disk, a quota: the half-written copy goes, an older model/ stays
                shutil.rmtree(tmp, ignore_errors=True)
                raise UserError(f"writing the model to {tmp} failed: {e.strerror or e}; nothing was replaced") from None
            self.parts.model = saved  # LoRA: the merged model
            shutil.rmtree(out / "model", ignore_errors=True)
            os.replace(tmp, out / "model")
            self.metrics_log.close()
            tmp_eval = out / "eval.json.tmp"
            tmp_eval.write_text(json.dumps(ev, indent=2), encoding="utf-8")
            os.replace(tmp_eval, out / "eval.json")
            shutil.rmtree(out / checkpoint.DIR, ignore_errors=True)  # a finished run does not resume: model/ has the result
            if self.lock is not None:
                self.lock.close()
            self.print_summary()
        self.events.run_end(self, ev)
        self.accelerator.wait_for_everyone()

    def print_summary(self) -> None:
        ev, console = self.ev, self.console
        console.print(results_table(ev))
        for item in self.task.summary(ev):
            console.print(item)
        t = ev["train"]
        speed = f"{t['tokens_per_s']:.1f} tokens/s" if self.task.unit == "tokens" else f"{t['samples_per_s']:.1f} samples/s"
        steps = f"{t['runtime_s']:.1f} s of optimizer steps, {speed}" if t.get("steps") else "no optimizer steps"
        console.print(f"train: {t['stages_s']:.1f} s ({steps}), peak RSS "
                      f"{t['peak_rss_mb']:.0f} MB; run directory: {self.out}")


def run(cfg: Config, quiet: bool = False, lr_find_only: Path | None = None,
        observers: list[Observer] | None = None) -> RunResult | dict[str, Any]:
    """Train as `cfg` says; with `lr_find_only` (a PNG path), run the range test and return its result."""
    recipe = Recipe(cfg, quiet=quiet, observers=observers)
    if lr_find_only is not None:
        return recipe.find_lr(lr_find_only)
    return recipe.run()
