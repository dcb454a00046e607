"""The one training loop, top to bottom: data, model, strategy, baseline, train, evaluate, save.

Runs unchanged on one CPU, one GPU, or many processes under `accelerate launch` / `torchrun`
(DDP). Batches are global (see `tunesmith.data.batching`): each process takes its slice, so the
same config gives the same optimisation trajectory whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tunesmith.config import Config, save_config
from tunesmith.data.batching import make_batches, shard
from tunesmith import checkpoint, runlock
from tunesmith.errors import Interrupted, UserError
from tunesmith.metrics import linear_probe
from tunesmith.models import resolve_model
from tunesmith.optim import build_optimizer, build_scheduler
from tunesmith.precision import autocast_dtype, resolve_precision
from tunesmith.registry import STRATEGIES, TASKS
from tunesmith.report import (
    make_console,
    moved_table,
    param_table,
    peak_rss_mb,
    peak_rss_reset,
    per_class_table,
    results_table,
)
from tunesmith.strategies.base import ModelParts, count_params
from tunesmith.strategies.guards import Anchor

PROBE_MAX_ROWS = 4000  # the linear-probe baseline fits on at most this many training rows


@dataclass
class RunResult:
    run_dir: Path
    config: Config
    eval: dict[str, Any]
    model: Any = None  # the trained model, in memory (the saved copy is run_dir/model)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.eval["after"]


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if (out / "eval.json").exists() and not overwrite:
        raise UserError(f"{out} holds a finished run; pass --overwrite (overwrite: true) or choose another output_dir")
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a directory")


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


def _metric_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if metric in ("loss", "perplexity") else new > best


def run(cfg: Config, quiet: bool = False, lr_find_only: Path | None = None) -> RunResult | dict[str, Any]:
    """Train as `cfg` says; with `lr_find_only` (a PNG path), run the range test and return its result."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    console = make_console(quiet or not main)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    out = Path(cfg.output_dir)
    user_config = cfg.to_dict()  # as written (before `auto` and `lr: find` resolve): what resume compares
    resume_from, resumed = None, None
    if lr_find_only is None:
        _check_output_dir(out, cfg.overwrite)
        if cfg.resume:
            resume_from = checkpoint.latest(out) if out.is_dir() else None
            if resume_from is None and cfg.resume is True:
                raise UserError(f"nothing to resume: {out / checkpoint.DIR} holds no complete checkpoint; run without --resume")
            if resume_from is not None:
                saved = json.loads((resume_from / "state.json").read_text(encoding="utf-8"))
                checkpoint.check_config_change(saved["config"], user_config, resume_from)
    set_seed(cfg.train.seed)

    # 1. Task and strategy by name; every data file read and checked (the pre-flight report of
    # `tunesmith validate`) before any model weights load.
    task = TASKS.get(cfg.task)(cfg)
    strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy)
    resolved = task.resolve() if hasattr(task, "resolve") else resolve_model(cfg.model)
    report = task.validate(task.load_tokenizer(resolved))
    report.render(console, full=False)
    if not report.ok:
        raise UserError(report.error_line())
    data = task.load_data()
    for s in (data.train, data.validation, data.test):
        skipped = f", {s.skipped} bad rows skipped" if s.skipped else ""
        console.print(f"data: {s.name:<10} {len(s):>6} rows from {s.source}{skipped}")
    if data.labels:
        console.print(f"labels: {len(data.labels)} ({', '.join(data.labels[:10])}{' ...' if len(data.labels) > 10 else ''})"
                      f"{', multi-label' if data.multi_label else ''}")
    replay = task.load_replay(cfg.strategy.replay.file) if cfg.strategy.replay else None
    if replay is not None:
        console.print(f"replay: {len(replay)} rows from {replay.source}, {cfg.strategy.replay.fraction:.0%} of every batch")

    # 2. Model: the pre-trained backbone with a new head sized to the labels.
    model, head, discarded = task.load_model(resolved)
    console.print(f"model: {cfg.model} ({resolved.source}, {resolved.path})")
    if head:
        console.print(
            f"head: new {len(data.labels)}-way head ({', '.join(head)})"
            + (f"; discarded pre-trained {', '.join(discarded[:6])}{' ...' if len(discarded) > 6 else ''}" if discarded else "")
        )

    # 3. Strategy: freeze (or wrap), then parameter groups with lr scales. `auto` picks one first.
    parts = ModelParts(model, head)
    if cfg.strategy.name == "auto":
        from tunesmith.strategies.auto import choose

        cfg.strategy = choose(cfg.strategy, parts, n_train=len(data.train), device=device)
        console.print(f"strategy: auto -> {cfg.strategy.name}: {cfg.strategy.reason}")
        strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy)
    groups = strategy.apply(parts)
    model = parts.model  # LoRA wraps the model
    may_train = {id(p) for g in groups for _, p in g.params}
    lr_fixed = cfg.optim.lr if isinstance(cfg.optim.lr, float) else strategy.default_lr
    trainable, frozen = count_params(model)
    console.print(f"strategy: {strategy.name}; parameters: {trainable:,} trainable, {frozen:,} frozen")
    console.print(param_table(groups, lr_fixed))
    if trainable == 0:
        raise UserError(f"strategy '{strategy.name}' leaves no trainable parameters")
    if cfg.train.gradient_checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not getattr(inner, "supports_gradient_checkpointing", False):
            raise UserError(f"train.gradient_checkpointing: {type(inner).__name__} does not support it")
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        console.print("gradient checkpointing: on (activations recomputed in the backward pass)")

    # 4. Tokenize once; every epoch reuses the ids.
    enc = {s.name: task.encode(s) for s in (data.train, data.validation, data.test)}
    for name, e in enc.items():
        if e.truncated:
            console.print(f"truncated: {e.truncated} of {getattr(e, 'examples', len(e))} {name} rows exceed "
                          f"train.max_length={cfg.train.max_length}")
    for line in task.describe(enc) if hasattr(task, "describe") else []:
        console.print(line)
    unit = getattr(task, "unit", "samples")

    precision = resolve_precision(cfg.train.precision, device)
    amp = autocast_dtype(precision)
    console.print(f"device: {device.type}, {world} process(es), precision {precision}")
    model.to(device)
    # Starting values of the pre-trained weights that may train: for L2-SP and the moved report.
    anchor = None
    if strategy.trains_backbone:
        head_ids = {id(p) for _, p in parts.params(parts.head)}
        anchored = [(n, p) for n, p in model.named_parameters() if id(p) in may_train and id(p) not in head_ids]
        if anchored:
            anchor = Anchor(anchored, parts.group_of(), on_device=bool(cfg.strategy.l2sp), checkpoint_dir=resolved.path,
                            prefix=getattr(model, "base_model_prefix", ""))

    # feature-extraction: the frozen backbone runs once (or its cached output is read back) and
    # from here on the loop trains the head alone on those features.
    train_model = model
    feature_info: dict[str, Any] | None = None
    if hasattr(strategy, "extract"):
        train_model, enc, feature_info = strategy.extract(task, model, enc, device, amp, cfg.eval.batch_size, console)
    train_enc = enc["train"]
    if replay is not None:
        train_enc = enc["train"].concat(task.encode(replay))
    train_lengths = train_enc.lengths

    # Learning rate: fixed, or from the range test (weights and RNG restored after it).
    lr, found = lr_fixed, None
    if resume_from is not None:  # the rate the run started with, found or fixed
        lr, found = saved["lr"], saved.get("lr_find")
    elif cfg.optim.lr == "find" or lr_find_only is not None:
        from tunesmith.lr_find import lr_find

        png = lr_find_only if lr_find_only is not None else (out / "lr_find.png" if main else None)
        found = lr_find(task, train_model, groups, train_enc, cfg, device, amp, png, console, fallback=strategy.default_lr)
        console.print(f"lr-find: suggested lr {found['suggested_lr']:.2e} (loss lowest at {found['min_loss_lr']:.2e}, "
                      f"steepest descent at {found['steepest_lr']:.2e}); plot: {png}")
        if lr_find_only is not None:
            return found
        lr = found["suggested_lr"]

    out.mkdir(parents=True, exist_ok=True)
    lock = runlock.acquire(out) if main else None
    if main:  # model/ (LoRA: and its adapter) plus tokenizer files; checkpoints: weights, 2 AdamW moments, best copy
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        per_ckpt = 4 * sum(p.numel() * p.element_size() for g in groups for _, p in g.params)
        ckpts = (cfg.train.keep_checkpoints + 2) * per_ckpt if (cfg.train.checkpoint_every or cfg.train.checkpoint_epochs) else 0
        runlock.check_disk(out, int(weights * 1.2) + ckpts + 50 * 2**20, "the model and checkpoints this run writes")
    if cfg.overwrite and main and resume_from is None:
        for stale in ("eval.json", "metrics.jsonl", "model", checkpoint.DIR):
            p = out / stale
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if main:
        save_config(cfg, out / "config.yaml")
    if resume_from is not None and main and (out / "metrics.jsonl").exists():
        # keep what the checkpointed part of the run logged; what came after it will be redone
        kept = [l for l in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
                if l.strip() and json.loads(l).get("step", 0) <= saved["step"]]
        (out / "metrics.jsonl").write_text("".join(l + "\n" for l in kept), encoding="utf-8")
    log = open(out / "metrics.jsonl", "a" if resume_from is not None else "w", encoding="utf-8") if main else None

    def write(record: dict[str, Any]) -> None:
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def evaluate(split: str, features: bool = False) -> tuple[dict[str, Any], np.ndarray | None]:
        e = enc[split]
        logits, feats = task.predict_logits(
            accelerator.unwrap_model(train_model), e, cfg.eval.batch_size, device,
            autocast=amp, rank=rank, world=world, want_features=features,
        )
        if world > 1:  # each process filled its own rows; sum the disjoint parts
            logits = np.sum(gather_object([logits]), axis=0)
            feats = np.sum(gather_object([feats]), axis=0) if features else None
        return task.metrics(logits, e.labels), feats

    # 5. Baselines on the held-out test set: the starting model and a linear probe.
    ev: dict[str, Any] = {}
    if cfg.eval.before:
        probe = cfg.eval.linear_probe and getattr(task, "linear_probe", True)
        ev["before"], test_feats = evaluate("test", features=probe)
        if hasattr(task, "extra_eval") and main:
            ev["before"].update(task.extra_eval(accelerator.unwrap_model(train_model), "before", device, amp, out, console))
        if probe:
            sub = list(range(len(enc["train"])))
            if len(sub) > PROBE_MAX_ROWS:
                sub = sorted(np.random.default_rng(cfg.train.seed).choice(len(sub), PROBE_MAX_ROWS, replace=False).tolist())
            train_sub = enc["train"].subset(sub)
            _, train_feats = task.predict_logits(
                accelerator.unwrap_model(train_model), train_sub, cfg.eval.batch_size, device, autocast=amp, want_features=True
            )
            ev["linear_probe"] = linear_probe(
                train_feats, train_sub.labels.numpy(), test_feats, enc["test"].labels.numpy(),
                data.labels, data.multi_label, cfg.train.seed,
            )
            ev["linear_probe"]["train_rows"] = len(sub)

    # 6. Optimizer and schedule from the strategy's groups.
    if found is not None:
        found = ev["lr_find"] = {k: v for k, v in found.items() if k not in ("lrs", "losses", "smoothed")}
    batches_per_epoch = math.ceil(len(enc["train"]) / cfg.optim.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.optim.grad_accum)
    total_steps = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total_steps = min(total_steps, cfg.optim.max_steps)
    optimizer = build_optimizer(groups, cfg.optim, lr)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    train_model, optimizer = accelerator.prepare(train_model, optimizer)
    # every weight that may ever train (gradual unfreezing adds some later): the best-weights copy
    trainable_params = [(n, p) for n, p in accelerator.unwrap_model(train_model).named_parameters() if id(p) in may_train]
    replay_rng = np.random.default_rng(cfg.train.seed + 1)
    replay_order: list[int] = []
    replay_seen = 0

    # 7. Train.
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} " + unit + "/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )
    bar = progress.add_task("train", total=total_steps, epoch=1, loss="-", speed="-")
    best_metric: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_step, evals_without_gain, stopped_early = 0, 0, False
    step, samples, tokens, train_time = 0, 0, 0, 0.0
    running_loss = torch.zeros((), device=device)
    window_loss = torch.zeros((), device=device)
    running_n = window_n = 0
    skipped_steps = bad_in_row = 0
    start_epoch, start_window = 1, 0
    epoch_replay: dict[str, Any] | None = None  # the replay sampler as it was when an epoch's batches were drawn
    if resume_from is not None:
        resumed = checkpoint.load(resume_from, rank)
        st = resumed["state"]
        if resumed["rng_world"] != world:
            console.print(f"note: the checkpoint was written by {resumed['rng_world']} process(es), this run has {world}: "
                          "random streams (dropout) do not continue exactly")
        with torch.no_grad():
            named = dict(trainable_params)
            for n, t in resumed["weights"].items():
                named[n].copy_(t.to(named[n].device))
        best_state = resumed["best"]
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        step, samples, tokens, train_time = st["step"], st["samples"], st["tokens"], st["train_time"]
        best_metric, best_step, evals_without_gain = st["best_metric"], st["best_step"], st["evals_without_gain"]
        skipped_steps, bad_in_row = st["skipped_steps"], st["bad_in_row"]
        running_loss.fill_(st["running_loss"])
        running_n = st["running_n"]
        start_epoch, start_window, epoch_replay = st["epoch"], st["window"], st["replay"]
        progress.update(bar, completed=step)
        console.print(f"resumed from {resume_from} (step {step}, epoch {start_epoch})")

    def save_checkpoint(next_epoch: int, next_window: int, t0: float) -> Path | None:
        # every process calls this at the same step: each one's RNG state goes into the checkpoint
        rng = [checkpoint.rng_state()]
        if world > 1:
            rng = gather_object(rng)
        if not main:
            return None
        # mid-epoch: the sampler as it was when this epoch's batches were drawn (they are redrawn on
        # resume); at an epoch's end: as it is now, ready for the next epoch
        replay_state = epoch_replay if next_window else {
            "rng": replay_rng.bit_generator.state, "order": list(replay_order), "seen": replay_seen}
        state = {
            "step": step, "epoch": next_epoch, "window": next_window, "samples": samples, "tokens": tokens,
            "train_time": train_time + time.perf_counter() - t0, "best_metric": best_metric, "best_step": best_step,
            "evals_without_gain": evals_without_gain, "skipped_steps": skipped_steps, "bad_in_row": bad_in_row,
            "running_loss": running_loss.item(), "running_n": running_n, "replay": replay_state,
            "scheduler": scheduler.state_dict(), "config": user_config, "lr": lr, "lr_find": found,
        }
        return checkpoint.save(out, step, dict(trainable_params), best_state, optimizer, state,
                               cfg.train.keep_checkpoints, best_step, rng=rng)

    # Ctrl-C / SIGTERM: finish the step, write a checkpoint, say how to resume. A second Ctrl-C quits at once.
    interrupted: dict[str, int] = {}
    handlers: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def _on_signal(signum: int, _frame: Any) -> None:
            if interrupted:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            interrupted["sig"] = signum

        handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def stop_if_interrupted(next_epoch: int, next_window: int, t0: float) -> None:
        if world > 1:  # a signal may reach the processes at different steps: all stop at the same one
            flag = torch.tensor([interrupted.get("sig", 0)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item():
                interrupted.setdefault("sig", int(flag.item()))
        if not interrupted:
            return
        path = save_checkpoint(next_epoch, next_window, t0)
        if log:
            log.close()
        name = signal.Signals(interrupted["sig"]).name
        raise Interrupted(
            f"interrupted by {name} after step {step}; checkpoint {path}; resume with: tunesmith train CONFIG --resume",
            128 + interrupted["sig"],
        )

    set_train_mode(train_model)
    peak_rss_reset()
    if resumed is not None:
        checkpoint.set_rng_state(resumed["rng_tensors"], resumed["state"]["rng"])

    def validate(epoch: int) -> bool:
        """Evaluate on validation, keep the best weights; True when early stopping says stop."""
        nonlocal best_metric, best_state, best_step, evals_without_gain
        m, _ = evaluate("validation")
        write({"type": "eval", "split": "validation", "step": step, "epoch": epoch,
               **{k: v for k, v in m.items() if k not in ("per_class", "confusion_matrix")}})
        value = m[cfg.train.metric]
        if _metric_better(cfg.train.metric, value, best_metric):
            best_metric, best_step, evals_without_gain = value, step, 0
            # a CPU copy of the trainable weights only: frozen ones cannot change
            best_state = {n: p.detach().to("cpu", copy=True) for n, p in trainable_params}
        else:
            evals_without_gain += 1
        progress.console.print(f"step {step}: validation {cfg.train.metric} {value:.4f} (best {best_metric:.4f} at step {best_step})")
        set_train_mode(train_model)
        return bool(cfg.train.early_stopping) and evals_without_gain >= cfg.train.early_stopping

    try:
        with progress if not (quiet or not main) else contextlib.nullcontext():
            for epoch in range(start_epoch, cfg.optim.epochs + 1):
                progress.update(bar, epoch=epoch)
                if epoch == start_epoch and epoch_replay is not None:  # resuming inside this epoch
                    replay_rng.bit_generator.state = epoch_replay["rng"]
                    replay_order, replay_seen = list(epoch_replay["order"]), epoch_replay["seen"]
                epoch_replay = {"rng": replay_rng.bit_generator.state, "order": list(replay_order), "seen": replay_seen}
                batches = make_batches(enc["train"].lengths, cfg.optim.batch_size, seed=cfg.train.seed, epoch=epoch,
                                       group_by_length=cfg.train.group_by_length)
                if world > 1:  # every process must step together: drop a final batch too small to split
                    batches = [b for b in batches if len(b) >= world]
                t0 = time.perf_counter()
                if replay is not None:  # replay rows sit after the training rows in train_enc
                    n_train = len(enc["train"])
                    share = cfg.strategy.replay.fraction
                    with_replay = []
                    for b in batches:
                        k = max(1, round(len(b) * share / (1 - share)))
                        while len(replay_order) < k:
                            replay_order.extend((n_train + replay_rng.permutation(len(train_enc) - n_train)).tolist())
                        with_replay.append(b + replay_order[:k])
                        replay_seen += k
                        del replay_order[:k]
                    batches = with_replay
                t0 = time.perf_counter()
                first = start_window if epoch == start_epoch else 0
                for w in range(first, len(batches), cfg.optim.grad_accum):
                    changed = strategy.update(step, epoch)  # gradual unfreezing: more blocks join
                    if changed:
                        if world > 1:  # DDP registers the trainable set when it wraps: wrap again
                            train_model = accelerator.prepare_model(accelerator.unwrap_model(train_model))
                        set_train_mode(train_model)
                        progress.console.print(changed)
                    window = batches[w : w + cfg.optim.grad_accum]
                    window_size = sum(len(b) for b in window)
                    # each micro-batch's loss is a mean over its units (examples; trained tokens for causal-lm):
                    # weighted by its share of the window's units, the step is the exact mean over the window
                    weigh = getattr(task, "weight", lambda e, ids: float(len(ids)))
                    window_units = sum(weigh(train_enc, b) for b in window) or 1.0
                    for j, global_batch in enumerate(window):
                        idx = shard(global_batch, rank, world)
                        micro = cfg.train.micro_batch_size or len(idx) or 1
                        chunks = [idx[c : c + micro] for c in range(0, len(idx), micro)] or [idx]
                        for c, chunk in enumerate(chunks):
                            batch = {k: v.to(device, non_blocking=True) for k, v in task.collate(train_enc, chunk).items()}
                            # Gradients are all-reduced only on the last micro-batch of the window.
                            sync = j == len(window) - 1 and c == len(chunks) - 1
                            with contextlib.nullcontext() if sync else accelerator.no_sync(train_model):
                                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                                    loss = task.step(train_model, batch)["loss"]
                                # weight by this chunk's share of the window: exact mean over all its examples
                                accelerator.backward(loss * (weigh(train_enc, chunk) * world / window_units))
                            window_loss += loss.detach() * len(chunk)  # counted once the step is known to be finite
                            window_n += len(chunk)
                        tokens += sum(train_lengths[i] for i in global_batch)  # host-side: no device sync
                    if cfg.strategy.l2sp and anchor is not None:  # after the all-reduce: the same on every process
                        anchor.add_l2sp_grad_(cfg.strategy.l2sp)
                    if cfg.optim.max_grad_norm:
                        norm = accelerator.clip_grad_norm_(train_model.parameters(), cfg.optim.max_grad_norm)
                    else:
                        grads = [p.grad for p in train_model.parameters() if p.grad is not None]
                        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
                    # A host-device sync per step, on purpose: a NaN/inf gradient must never reach the
                    # weights. Gradients are all-reduced, so every process decides the same way.
                    if not bool(torch.isfinite(norm)):
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()  # the batch is consumed: the schedule stays aligned with the data
                        step += 1
                        skipped_steps += 1
                        bad_in_row += 1
                        window_loss.zero_()
                        window_n = 0
                        write({"type": "skip", "step": step, "epoch": epoch, "reason": "non-finite gradient"})
                        progress.console.print(f"step {step}: gradient is NaN/inf, step skipped ({bad_in_row} in a row)")
                        if bad_in_row >= cfg.train.max_bad_steps:
                            if log:
                                log.close()
                            raise UserError(
                                f"the gradient was NaN/inf for {bad_in_row} steps in a row (last at step {step}, "
                                f"lr {scheduler.get_last_lr()[-1]:.1e}); nothing was saved. Lower optim.lr (see "
                                "`tunesmith lr-find`) or use train.precision=fp32"
                            )
                        progress.advance(bar)
                        stop_if_interrupted(epoch, w + cfg.optim.grad_accum, t0)
                        continue
                    bad_in_row = 0
                    running_loss += window_loss
                    running_n += window_n
                    window_loss.zero_()
                    window_n = 0
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    samples += window_size
                    progress.advance(bar)
                    if step % cfg.train.log_every == 0 or step == total_steps:
                        elapsed = train_time + time.perf_counter() - t0
                        mean_loss = running_loss.item() / max(running_n, 1)  # host-device sync, once per log step
                        running_loss.zero_()
                        running_n = 0
                        speed = samples / elapsed
                        shown = tokens / elapsed if unit == "tokens" else speed
                        progress.update(bar, loss=f"{mean_loss:.4f}", speed=f"{shown:.1f}")
                        record = {"type": "train", "step": step, "epoch": epoch, "loss": mean_loss,
                                  "lr": scheduler.get_last_lr()[-1], "samples_per_s": speed, "tokens_per_s": tokens / elapsed}
                        if cfg.strategy.l2sp and anchor is not None:
                            record["l2sp_distance"] = anchor.distance()
                        write(record)
                    if cfg.eval.every_epoch and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                        train_time += time.perf_counter() - t0
                        stop = validate(epoch)
                        t0 = time.perf_counter()
                        if stop:
                            stopped_early = True
                            break
                    if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                        save_checkpoint(epoch, w + cfg.optim.grad_accum, t0)
                    stop_if_interrupted(epoch, w + cfg.optim.grad_accum, t0)
                    if step >= total_steps:  # optim.max_steps reached mid-epoch
                        break
                train_time += time.perf_counter() - t0
                if stopped_early:
                    break
                if cfg.eval.every_epoch and not cfg.train.eval_every and validate(epoch):
                    stopped_early = True
                    break
                if cfg.train.checkpoint_epochs:
                    save_checkpoint(epoch + 1, 0, time.perf_counter())
                if step >= total_steps:
                    break
    finally:
        for s_, h in handlers.items():
            signal.signal(s_, h)
    train_peak = peak_rss_mb()

    # 8. Best weights back, final evaluation on the held-out test set.
    unwrapped_train = accelerator.unwrap_model(train_model)
    if best_state is not None:
        with torch.no_grad():
            for n, p in unwrapped_train.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n].to(p.device))
        if stopped_early or best_step != step:
            console.print(f"restored the best weights (step {best_step}, validation {cfg.train.metric} {best_metric:.4f})")
    unwrapped = model if train_model is not model else unwrapped_train  # the whole model, head included
    unwrapped.eval()
    ev["after"], _ = evaluate("test")
    if hasattr(task, "extra_eval") and main:
        ev["after"].update(task.extra_eval(unwrapped, "after", device, amp, out, console))
        gb, ga = ev.get("before", {}).get("general_text"), ev["after"].get("general_text")
        if gb and ga:
            ev["forgetting"] = {"source": ga["source"], "perplexity_before": gb["perplexity"],
                                "perplexity_after": ga["perplexity"],
                                "change_pct": 100.0 * (ga["perplexity"] / gb["perplexity"] - 1.0)}
    moved = strategy.moved() if hasattr(strategy, "moved") else anchor.moved() if anchor is not None else None
    if moved:
        ev["weights_moved"] = moved
        console.print(moved_table(moved))
    ev["train"] = {
        "runtime_s": train_time,
        "samples_per_s": samples / train_time if train_time else 0.0,
        "tokens_per_s": tokens / train_time if train_time else 0.0,
        "peak_rss_mb": train_peak,
        "steps": step,
        "epochs_run": epoch,
        "stopped_early": stopped_early,
        "skipped_steps": skipped_steps,
        "best_step": best_step,
        "precision": precision,
        "processes": world,
        "device": device.type,
    }
    ev["data_report"] = report.to_dict()
    ev["data"] = {
        s.name: {"rows": len(s), "source": s.source, "skipped": s.skipped, "truncated": enc[s.name].truncated}
        for s in (data.train, data.validation, data.test)
    }
    ev["labels"] = data.labels
    ev["task"] = cfg.task
    ev["strategy"] = strategy.name
    ev["parameters"] = {"trainable": trainable, "frozen": frozen,
                        "trainable_at_end": count_params(accelerator.unwrap_model(train_model))[0]}
    if replay is not None:
        ev["data"]["replay"] = {"rows": len(replay), "source": replay.source, "samples_seen": replay_seen}
    if feature_info is not None:
        ev["features"] = feature_info
    ev["model"] = cfg.model
    ev["validation_best"] = {cfg.train.metric: best_metric, "step": best_step} if best_metric is not None else None

    # 9. Artifacts: model/ first (written aside, then renamed), eval.json last marks the run finished.
    accelerator.wait_for_everyone()
    if main:
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            unwrapped = strategy.save(unwrapped, task, tmp)
        except OSError as e:  # a full disk, a quota: the half-written copy goes, an older model/ stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"writing the model to {tmp} failed: {e.strerror or e}; nothing was replaced") from None
        shutil.rmtree(out / "model", ignore_errors=True)
        os.replace(tmp, out / "model")
        log.close()
        tmp_eval = out / "eval.json.tmp"
        tmp_eval.write_text(json.dumps(ev, indent=2), encoding="utf-8")
        os.replace(tmp_eval, out / "eval.json")
        shutil.rmtree(out / checkpoint.DIR, ignore_errors=True)  # a finished run does not resume: model/ has the result
        if lock is not None:
            lock.close()
        console.print(results_table(ev))
        if data.labels and len(data.labels) <= 30:
            console.print(per_class_table(ev["after"]))
        if "forgetting" in ev:
            fg = ev["forgetting"]
            console.print(f"forgetting: perplexity on {fg['source']} {fg['perplexity_before']:.2f} -> "
                          f"{fg['perplexity_after']:.2f} ({fg['change_pct']:+.1f}%)")
        if (out / "samples.md").exists():
            console.print(f"base vs tuned answers: {out / 'samples.md'}")
        speed = (f"{ev['train']['tokens_per_s']:.1f} tokens/s" if unit == "tokens"
                 else f"{ev['train']['samples_per_s']:.1f} samples/s")
        console.print(f"train: {ev['train']['runtime_s']:.1f} s, {speed}, peak RSS {train_peak:.0f} MB; run directory: {out}")
    accelerator.wait_for_everyone()
    return RunResult(out, cfg, ev, unwrapped)
