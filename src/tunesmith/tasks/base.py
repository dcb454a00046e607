"""The task contract: what the training loop may ask of a task, declared once.

A task says what the model learns: how data is read, checked and batched, which head the model
gets, what one step's loss is, which metrics count and which way each improves. The loop
(`tunesmith.loop`) talks to every task through `Task` alone; it never asks which task runs.

Adding a task is one file: subclass `Task`, fill in the abstract methods, register the class
(`TASKS.register("my-task")` for a plugin, or a line in `tunesmith.registry` for a built-in).

Evaluation goes through an `Accumulator` the task owns: each process fills the rows it ran
(`update`), `merge` sums the disjoint parts across processes, `compute` turns the rows into the
task's metrics. A row may hold class logits (classifiers), a summed token loss and a token count
(language models), or the scores of a chosen/rejected pair: the loop does not look inside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from tunesmith.errors import UserError
from tunesmith.models.resolve import position_limit, resolve_model

if TYPE_CHECKING:  # type hints only: tasks never import config at run time (config imports tasks by name)
    from tunesmith.config import Config
    from tunesmith.models.resolve import ResolvedModel
    from tunesmith.validate import DataReport


@dataclass
class Runtime:
    """Where and how this process computes: what evaluation and the task's extras need to know."""

    device: torch.device
    amp: torch.dtype | None = None  # autocast dtype, None: full precision
    batch_size: int = 64  # evaluation batch size
    rank: int = 0
    world: int = 1
    gather: Callable[[list[Any]], list[Any]] = lambda x: x  # all processes' items, in rank order
    console: Any = None
    out_dir: Path | None = None  # the run directory (files a task writes beside eval.json)
    seed: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def alone(self) -> "Runtime":
        """This process computing every row by itself (no sharding, nothing to gather)."""
        return replace(self, rank=0, world=1, gather=lambda x: x)

    def print(self, *args: Any) -> None:
        if self.console is not None:
            self.console.print(*args)


@dataclass
class Accumulator:
    """Per-row outputs of one evaluation pass, then the metrics they give."""

    n_rows: int
    width: int
    compute_fn: Callable[[np.ndarray], dict[str, Any]]
    dtype: Any = np.float32
    rows: np.ndarray = field(init=False)
    features: np.ndarray | None = None  # pooled features per row, when asked for (the linear probe)

    def __post_init__(self) -> None:
        self.rows = np.zeros((self.n_rows, self.width), dtype=self.dtype)

    def update(self, idx: list[int], values: np.ndarray, features: np.ndarray | None = None) -> None:
        self.rows[idx] = values
        if features is not None:
            if self.features is None:
                self.features = np.zeros((self.n_rows, features.shape[-1]), dtype=np.float32)
            self.features[idx] = features

    def merge(self, gather: Callable[[list[Any]], list[Any]]) -> None:
        """Each process filled its own rows (zeros elsewhere): the sum over processes is every row.
        A collective: every process calls it."""
        parts = gather([(self.rows, self.features)])
        if len(parts) > 1:
            self.rows = np.sum([r for r, _ in parts], axis=0)
            if self.features is not None:
                self.features = np.sum([f for _, f in parts], axis=0)

    def compute(self) -> dict[str, Any]:
        return self.compute_fn(self.rows)


@dataclass
class Prepared:
    """The data a task read and checked: the three splits and, for classifiers, the label names."""

    train: Any
    validation: Any
    test: Any
    labels: list[str] = field(default_factory=list)
    multi_label: bool = False


@dataclass
class TokenView:
    """One example's tokens: (text piece, id, whether the loss covers it; None when no token is a target)."""

    where: str
    tokens: list[tuple[str, int, bool | None]]
    note: str = ""


class Task:
    """Base of every task. Class attributes are the declarations the config and the loop read."""

    name: ClassVar[str] = "task"
    model_task: ClassVar[str | None] = None  # which task's models this one tunes (packaged models, hub checks); None: its own
    # validation metrics by name -> "max" or "min" (which way is better); the first is the default
    metrics_better: ClassVar[dict[str, str]] = {}
    unit: ClassVar[str] = "samples"  # what the progress bar counts per second: samples | tokens
    default_strategy: ClassVar[str] = "full"  # when the config names none
    # `auto` for this task needs no measurement: (strategy, reason); None: decided from the model and data
    auto_choice: ClassVar[tuple[str, str] | None] = None
    new_head: ClassVar[bool] = True  # the model gets a freshly initialised head (strategies may need one)
    head_lr: ClassVar[float | None] = None  # the new head's rate when more than the head trains (optim.head_lr)
    strategy_lr: ClassVar[dict[str, float]] = {}  # this task's default rates by strategy, where they differ from the strategy's
    default_epochs: ClassVar[int] = 3  # optim.epochs when the config leaves it null
    refuses: ClassVar[dict[str, str]] = {}  # strategy name -> the whole error message

    def __init__(self, config: "Config"):
        self.config = config
        self.tokenizer: Any = None
        self.labels: list[str] = []
        self.multi_label = False
        self.head_kept: str | None = None  # load_model kept the checkpoint's own head: how, for the console

    # -- declarations the config reads --------------------------------------------------------
    @classmethod
    def configure(cls, cfg: "Config") -> None:
        """Task defaults and refusals of config values, when the config is read (raise ValueError)."""

    @classmethod
    def better(cls, metric: str, new: float, best: float | None) -> bool:
        if best is None:
            return True
        return new < best if cls.metrics_better.get(metric, "max") == "min" else new > best

    # -- model and data -----------------------------------------------------------------------
    def resolve(self) -> "ResolvedModel":

        return resolve_model(self.config.model, self.model_task or self.name)

    def load_tokenizer(self, resolved: "ResolvedModel") -> Any:
        return None

    def check_limits(self, resolved: "ResolvedModel", tokenizer: Any) -> list[str]:
        """Limits the model sets, checked before any data is read: a config value past one is lowered to it
        (a warning for the report, returned) or refused (UserError). Text models: positions."""
        limit = position_limit(resolved.path, tokenizer) if tokenizer is not None else None
        train = self.config.train
        if limit is None or train.max_length <= limit[0]:
            return []
        asked, train.max_length = train.max_length, limit[0]
        return [f"train.max_length {asked} is more than model '{resolved.spec}' takes ({limit[0]} tokens: {limit[1]}); "
                f"using {limit[0]}"]

    def card(self) -> dict[str, str]:
        """What the exported model's card says about loading it: library_name, pipeline_tag (the hub's
        names) and usage (Markdown, with code)."""
        return {"library_name": "transformers", "pipeline_tag": "", "usage": "`tunesmith eval RUN --data FILE`"}

    def token_preview(self, n: int) -> tuple[list[TokenView], list[str]]:
        """The first `n` training examples as the model sees them (after `validate`), and lines on how
        rows are laid out (packing); `tunesmith validate --show-tokens N`. Text tasks only."""
        raise UserError(f"--show-tokens applies to text tasks; {self.name} has no tokens")

    def validate(self, tokenizer: Any = None) -> "DataReport":
        """Read every data file once and report on it; never raises for bad data."""
        raise NotImplementedError

    def load_data(self) -> Prepared:
        raise NotImplementedError

    def load_replay(self, path: str) -> Any:
        from tunesmith.errors import UserError

        raise UserError(f"strategy.replay is not available for {self.name}")

    def load_model(self, resolved: "ResolvedModel") -> tuple[nn.Module, list[str], list[str]]:
        """(model with its new head, head parameter names, discarded pre-trained keys)."""
        raise NotImplementedError

    def encode(self, s: Any) -> Any:
        """A read set -> what batches are cut from (token ids, decoded images); has `lengths`, `len()`."""
        raise NotImplementedError

    def describe(self, enc: dict[str, Any]) -> list[str]:
        """Lines printed after encoding."""
        max_length = self.config.train.max_length
        return [f"truncated: {e.truncated} of {len(e)} {name} rows exceed train.max_length={max_length}"
                for name, e in enc.items() if e.truncated]

    def before_training(self, model: nn.Module, enc: dict[str, Any], rt: Runtime) -> None:
        """What the task computes from the starting model before any weight moves, once per run (preference:
        the reference model's log-probabilities). The model is on its device, with the strategy applied."""

    # -- one step -----------------------------------------------------------------------------
    def collate(self, enc: Any, idx: list[int], train: bool = True) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def weight(self, enc: Any, idx: list[int]) -> float:
        """What a batch's loss is a mean over (rows; trained tokens for language models): micro-batches
        and accumulation windows are weighted by it, so a step is the exact mean over its window."""
        return float(len(idx))

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward pass: a dict with the required `loss` (other keys feed logs)."""
        raise NotImplementedError

    # -- evaluation ---------------------------------------------------------------------------
    def accumulator(self, enc: Any) -> Accumulator:
        raise NotImplementedError

    def predict(self, model: nn.Module, enc: Any, acc: Accumulator, rt: Runtime, features: bool = False) -> None:
        """Fill `acc` with this process's rows of `enc` (rows rt.rank::rt.world of each batch)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, enc: Any, rt: Runtime, features: bool = False) -> tuple[dict[str, Any], np.ndarray | None]:
        """Metrics on one set (and pooled features per row, if asked); a collective under DDP."""
        acc = self.accumulator(enc)
        self.predict(model, enc, acc, rt, features)
        acc.merge(rt.gather)
        return acc.compute(), acc.features

    def smallest_class(self, train: Any) -> int | None:
        """Training rows of the rarest class (`auto` reads it); None for tasks without classes."""
        return None

    def probe_head(self, train: Any, validation: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
        """A linear head fitted in closed form on frozen features (weight, bias, what was chosen); None where the
        task has none (feature-extraction then trains the head by gradient steps)."""
        return None

    def baseline(self, model: nn.Module, enc: dict[str, Any], rt: Runtime) -> dict[str, Any]:
        """eval.json entries before training: `before` (the starting model on test) and the task's extras."""
        return {"before": self.evaluate(model, enc["test"], rt)[0]}

    def final(self, model: nn.Module, enc: dict[str, Any], rt: Runtime, ev: dict[str, Any]) -> dict[str, Any]:
        """eval.json entries after training: `after` and the task's extras (given what `baseline` found)."""
        return {"after": self.evaluate(model, enc["test"], rt)[0]}

    def summary(self, ev: dict[str, Any]) -> list[Any]:
        """What the console shows at the end beyond the results table (rich renderables or strings)."""
        return []

    # -- a finished run ------------------------------------------------------------------------
    def load_trained(self, model_dir: Path) -> nn.Module:
        """The model a finished run exported (its model/), with the task's labels and tokenizer set from it."""
        raise NotImplementedError

    def read_eval_set(self, path: str) -> Any:
        """A labelled file read with the run's data settings and encoded (`tunesmith eval`); labels the
        model does not know are an error."""
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
