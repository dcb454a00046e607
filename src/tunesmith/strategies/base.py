"""The strategy contract, parameter groups and the helpers strategies share.

A strategy freezes what must not train and returns named parameter groups, each with an lr
scale. The optimizer is built from these groups in one place (`tunesmith.optim`). Strategies may
also change the trainable set during training (`update`), wrap the model (LoRA), or replace what
the loop trains on (`training_view`: feature extraction trains the head on cached features); the
hooks have no-op defaults in `BaseStrategy`.

A strategy declares, as class attributes, what the config checks when it is read: its own keys
under `strategy:` (`Options`, a pydantic model), whether it needs a freshly initialised head
(`needs_new_head`), which forgetting guards make sense with it (`guards`). Adding a strategy is
one file: subclass `BaseStrategy`, register it (`STRATEGIES.register("name")` for a plugin, a line
in `tunesmith.registry` for a built-in).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tunesmith.errors import UserError
from tunesmith.models.layers import LayerGroups, layer_groups


@dataclass
class ParamGroup:
    name: str
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    lr_scale: float = 1.0

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    @property
    def trainable(self) -> int:
        return sum(p.numel() for _, p in self.params if p.requires_grad)


@dataclass
class ModelParts:
    """A model split into the pre-trained backbone and the newly initialised head."""

    model: nn.Module
    head: list[str]  # parameter names of the new head

    def named(self, which: str) -> list[tuple[str, nn.Parameter]]:
        head = set(self.head)
        return [(n, p) for n, p in self.model.named_parameters() if (n in head) == (which == "head")]

    @cached_property
    def layers(self) -> LayerGroups:
        return layer_groups(self.model, self.head)

    def group_of(self) -> dict[str, str]:
        """Parameter name -> layer group name; empty for a family whose blocks are unknown."""
        try:
            return {n: g for g, names, _ in self.layers.ordered() for n in names}
        except UserError:
            return {}

    def params(self, names: list[str]) -> list[tuple[str, nn.Parameter]]:
        named = dict(self.model.named_parameters())
        return [(n, named[n]) for n in names]


class StrategyOptions(BaseModel):
    """A strategy's own keys under `strategy:` (besides name, l2sp, replay and reason)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LayerDecayOptions(StrategyOptions):
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="Discriminative learning rates: each block's lr is the head's lr times layer_decay^(distance from the head)."
    )


@dataclass
class TrainingView:
    """What the loop trains and evaluates: the task, the model and the encoded splits, as a strategy
    presents them (feature extraction: a head on cached features). `info` goes into eval.json."""

    task: Any
    model: nn.Module
    enc: dict[str, Any]
    info: dict[str, Any] | None = None
    # a head fitted in closed form (logistic regression): set on the model as the stage's result, or kept aside
    # as the run's fallback; returns what it chose, or None. Called once the baselines are measured
    start: Callable[[], dict[str, Any] | None] | None = None


@dataclass
class Stage:
    """One strategy trained for a share of the run. A strategy that trains in stages (a head on cached
    features, then everything: LP-FT) returns several from `BaseStrategy.stages`; the loop runs them
    in order, each with its own optimizer, schedule and best-weights restore."""

    strategy: "BaseStrategy"
    epochs: int | None = None  # None: optim.epochs
    lr: float | None = None  # None: optim.lr, else the strategy's default_lr
    role: str = ""  # what the stage is for, shown when there are several
    first_step: int = 0  # set by the loop: the run's step count when this stage began
    compare_previous: bool = True  # kept only if it beats the stage before on validation (False: that stage's
    # model cannot stand alone, e.g. a body tuned on pairs whose head this stage trains first)
    batch_size: int | None = None  # None: optim.batch_size; a stage whose rows are another unit sets its own
    # (contrastive's pairs: SetFit's 16 pairs a step)
    start_only: bool = False  # only the next stage's start, never kept instead of it where the run has a fitted
    # fallback (LP-FT's probe stage: its head's best validation step, on a few validation rows a class, is noise; the
    # logistic regression on the same features, C chosen on validation (and cross-validation), is the linear model
    # the next stage must beat)
    soup: bool = False  # may train as a model soup (strategy.soup): several runs from the stage's start, averaged
    # (LP-FT's fine-tuning stage of a strategy whose weights average; a plugin's stage opts in here)


class BaseStrategy:
    """Defaults for the optional hooks; a strategy overrides `apply` and what it needs."""

    name = "base"
    default_lr = 2e-5
    description = ""
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions  # the strategy.* keys this strategy reads
    trains_backbone = True  # False: pre-trained weights never move (no l2sp, no weight-moved report)
    needs_new_head = False  # True: only for tasks whose model gets a new head (Task.new_head)
    probe_first = False  # True: with strategy.lp_ft, a linear-probe stage on cached features comes first
    averages = True  # its trained weights average into a working model (strategy.soup); False: LoRA's factors
    guards: ClassVar[frozenset[str]] = frozenset({"l2sp", "replay"})  # forgetting guards that make sense here
    no_guard_reason = ""  # why a guard not in `guards` does nothing with this strategy

    def __init__(self, config: Any = None):
        self.config = config

    @classmethod
    def choose(cls, config: Any, parts: "ModelParts", n_train: int, device: torch.device, smallest_class: int | None = None) -> Any:
        """The strategy config to train with, once model and data are known (`smallest_class`: the training
        rows of a classifier's rarest class); `auto` decides here."""
        return config

    @classmethod
    def check(cls, config: Any) -> None:
        """Combinations of this strategy's own options that make no sense (raise ValueError)."""

    def stages(self, task: Any) -> list[Stage]:
        """What the loop trains, in order: this strategy for the whole budget, after a linear-probe stage
        (the new head alone, on cached features) where its options say lp_ft and the task has a new head."""
        if not (self.probe_first and self.config is not None and self.config.lp_ft and task.new_head):
            return [Stage(self)]
        from tunesmith.registry import STRATEGIES

        probe = STRATEGIES.get("feature-extraction")
        # pooling "head": the head's own input, which the next stage's forward feeds it too
        options = type(self.config).model_validate({"name": "feature-extraction", "pooling": "head"})
        first = probe(options)
        first.probe_role = "fallback"  # a head fitted by logistic regression is not where fine-tuning starts (measured:
        # on standardized features its weights are large enough to make the first steps diverge); it is kept aside
        return [Stage(first, lr=probe.default_lr, role="linear probe", start_only=True),
                Stage(self, role="fine-tune", soup=self.averages)]

    def training_view(self, task: Any, model: nn.Module, enc: dict[str, Any], rt: Any) -> TrainingView:
        """What the loop trains on; by default the task, the model and the data as they are."""
        return TrainingView(task, model, enc)

    def moved(self) -> dict[str, float] | None:
        """How far each layer group moved, if the strategy measures it itself (LoRA); None: the loop's anchor."""
        return None

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        """Freeze what does not train (requires_grad=False); return the groups the optimizer gets."""
        raise NotImplementedError

    def update(self, step: int, epoch: int) -> str | None:
        """Called before each optimizer step with the optimizer steps this stage has taken and its epoch (from 1);
        returns a message when the trainable set changed."""
        return None

    def save(self, model: nn.Module, task: Any, directory: Path) -> nn.Module:
        """Write the model in plain Hugging Face format; returns the model that stays valid."""
        task.save(model, directory)
        return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total - trainable


def freeze(params: list[tuple[str, torch.nn.Parameter]]) -> None:
    for _, p in params:
        p.requires_grad_(False)


def unfreeze(params: list[tuple[str, torch.nn.Parameter]]) -> None:
    for _, p in params:
        p.requires_grad_(True)


def layer_param_groups(parts: ModelParts, layer_decay: float | None) -> list[ParamGroup]:
    """One group per layer group, bottom to top; lr scale layer_decay^(distance from the head).

    Without layer_decay every group has scale 1 (the groups still show where parameters sit).
    """
    decay = layer_decay or 1.0
    return [ParamGroup(name, parts.params(names), decay**dist) for name, names, dist in parts.layers.ordered() if names]


def match_patterns(names: list[str], patterns: list[str]) -> dict[str, list[str]]:
    """Pattern -> matching parameter names (glob, `fnmatch` rules); an unmatched pattern is an error."""
    out = {}
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            example = names[len(names) // 2] if names else ""
            raise UserError(
                f"strategy.freeze_patterns: '{pat}' matches no parameter; names look like '{example}' "
                "(glob: '*' matches any run of characters, e.g. '*.attention.*')"
            )
        out[pat] = hits
    return out
