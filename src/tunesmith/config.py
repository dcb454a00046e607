"""The run configuration: typed, documented, checked before any model loads.

A config is YAML plus dotted command-line overrides (``optim.lr=3e-5``). Unknown keys are errors
that suggest the nearest valid key; bad values name the key, what was given and what is allowed,
and, for a YAML file, the line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import UserError, did_you_mean


class _Section(BaseModel):
    # nan and inf are never a rate, a size or a fraction: refused where they are read
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    train: str = Field(description="Training file: .csv, .tsv, .jsonl or .parquet.")
    validation: str | None = Field(None, description="Validation file; if absent, split from train (stratified, seeded).")
    test: str | None = Field(None, description="Held-out test file; if absent, split from train (stratified, seeded).")
    text_column: str = Field("text", description="Column (or JSON key) holding the text.")
    image_column: str = Field("path", description="image-classification with a CSV/JSONL listing: the column holding image paths (relative to that file).")
    text_pair_column: str | None = Field(None, description="Optional second text column (sentence-pair tasks such as NLI).")
    label_column: str = Field("label", description="Column holding the label: a string, an integer, or a list (multi-label).")
    label_separator: str | None = Field(
        None, description="Multi-label in CSV/TSV: split the label cell on this string, e.g. '|'. JSONL/Parquet use lists."
    )
    validation_size: float = Field(0.1, gt=0, lt=1, description="Fraction of train held out for validation when no validation file is given.")
    test_size: float = Field(0.1, gt=0, lt=1, description="Fraction of train held out for testing when no test file is given.")
    bad_rows: Literal["error", "skip"] = Field(
        "error", description="Unusable rows (a malformed line, empty or non-string text, no label): 'error' lists them and stops; 'skip' drops and counts them."
    )
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows of each file (quick experiments).")


class ReplayConfig(_Section):
    file: str = Field(description="General-domain examples to mix into training, in the training data's format (same columns, known labels).")
    fraction: float = Field(0.1, gt=0, lt=1, description="Share of every training batch taken from the replay file.")


GUARDS = ("l2sp", "replay")


# strategy.soup: auto: 3 runs from 100 up to 2,000 training rows (measured in docs/strategies.md)
SOUP_AUTO_RUNS, SOUP_AUTO_MIN_ROWS, SOUP_AUTO_MAX_ROWS = 3, 100, 2000


class StrategyConfig(_Section):
    """The `strategy:` section. Besides the keys below, each strategy reads keys of its own, declared
    as its `Options` model (`tunesmith strategies` lists them): `train_last_n` for freeze, `lora.r`
    for lora, `pooling` for feature-extraction, ... They are checked against the chosen strategy here."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    name: str = Field("full", description="Which weights train (see `tunesmith strategies`); default: the task's own (full; lora for causal-lm).")
    l2sp: float = Field(
        0.0, ge=0, description="Forgetting guard: add l2sp/2 * ||w - w_pretrained||^2 to the loss for every pre-trained weight that trains."
    )
    replay: ReplayConfig | None = Field(None, description="Forgetting guard: mix general-domain examples into every batch.")
    reason: str | None = Field(None, description="Set by `auto`: why it chose this strategy (recorded in the run's config.yaml).")
    lp_ft: bool = Field(
        True, description="Classifiers with full, freeze, gradual-unfreeze or lora: fit the new head on cached frozen features first, "
        "then train as the strategy says (LP-FT, Kumar et al. 2022: a random head distorts the features it is trained with); "
        "the fine-tuned stage is kept only if it beats the probe stage on validation, and the logistic regression fitted on the probe "
        "stage's features is kept instead where it beats both."
    )
    soup: int | Literal["auto"] = Field(
        "auto", description="LP-FT's fine-tuning stage trained this many times from the same start (each with its own data "
        "order and dropout), the runs' weights at the end of their schedules averaged into one model (a uniform model soup, "
        "Wortsman et al. 2022), validated as the stage's result, which counts as its best run against the probe stage and the "
        "fallback. auto: 3 from 100 up to 2,000 training rows, where fine-tuning is the 150-step floor and its outcome varies "
        "most from run to run; else 1 (under 100 rows auto does not move the backbone; from 2,000 one run varies less). Not for "
        "lora (its two factors do not average) or gradual-unfreeze (a later run would start with every block unfrozen)."
    )

    def soup_runs(self, n_train: int) -> int:
        """`soup` as a number of fine-tuning runs: auto is 3 from 100 up to 2,000 training rows (docs/strategies.md), else 1."""
        if self.soup == "auto":
            return SOUP_AUTO_RUNS if SOUP_AUTO_MIN_ROWS <= n_train < SOUP_AUTO_MAX_ROWS else 1
        return self.soup

    @field_validator("soup", mode="before")
    @classmethod
    def _soup(cls, v: Any) -> Any:
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{v!r}: must be a whole number of fine-tuning runs, 1 or more (1: no soup), or auto")
        return v

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from tunesmith.registry import STRATEGIES

        try:
            STRATEGIES.get(v)  # unknown names list the known ones
        except UserError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _options(self) -> "StrategyConfig":
        """The chosen strategy's own keys, validated by its Options model; the guards it allows."""
        from tunesmith.registry import STRATEGIES

        strategy = STRATEGIES.get(self.name)
        given = dict(self.__pydantic_extra__ or {})
        owners = _option_owners()
        for key, value in given.items():
            if key not in owners:
                valid = sorted(set(owners) | set(StrategyConfig.model_fields))
                raise ValueError(f"unknown key 'strategy.{key}'{did_you_mean(key, valid)}; valid keys here: {', '.join(valid)}")
        if self.name == "auto":  # any strategy's keys: auto keeps those of the one it chooses
            options = {k: _validate_option(owners[k][0], k, v) for k, v in given.items()}
        else:
            for key, value in given.items():
                if key not in strategy.Options.model_fields:
                    _refuse_option(key, value, owners[key], self.name)
            own = {k: v for k, v in given.items() if k in strategy.Options.model_fields}
            opts = _validated(strategy.Options, own)
            options = {k: getattr(opts, k) for k in strategy.Options.model_fields}
        self.__pydantic_extra__ = options
        for guard in GUARDS:
            if getattr(self, guard) and guard not in strategy.guards and self.name != "auto":
                raise ValueError(f"strategy.{guard} does nothing with strategy '{self.name}': {strategy.no_guard_reason}")
        strategy.check(self)
        return self


def _option_owners() -> dict[str, list[Any]]:
    """Option key -> the strategy classes that read it, in registration order."""
    from tunesmith.registry import STRATEGIES

    owners: dict[str, list[Any]] = {}
    for name in STRATEGIES.in_order():
        cls = STRATEGIES.get(name)
        for key in cls.Options.model_fields:
            owners.setdefault(key, []).append(cls)
    return owners


def _validated(options: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    try:
        return options.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _plain_loc(err["loc"])
        if err["type"] == "extra_forbidden":
            valid = _field_names(options, loc[:-1])
            raise ValueError(f"unknown key 'strategy.{'.'.join(loc)}'{did_you_mean(loc[-1], valid)}; "
                             f"valid keys here: {', '.join(valid)}") from None
        raise ValueError(f"strategy.{'.'.join(loc)}: {err['msg']}{_got(err.get('input'))}") from None


def _validate_option(owner: Any, key: str, value: Any) -> Any:
    return getattr(_validated(owner.Options, {key: value}), key)


def _refuse_option(key: str, value: Any, owners: list[Any], name: str) -> None:
    """A key another strategy reads: an error when it is set away from that strategy's default."""
    default = owners[0].Options.model_fields[key].get_default(call_default_factory=True)
    if _validate_option(owners[0], key, value) == default:
        return
    names = [o.name for o in owners]
    if len(names) == 1:
        raise ValueError(f"strategy.{key} applies to strategy '{names[0]}', not '{name}'")
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    raise ValueError(f"strategy.{key} combines with {listed}, not '{name}'")


class OptimConfig(_Section):
    lr: float | Literal["find"] | None = Field(
        None, description="Peak learning rate (the head's, with layer_decay); 'find' runs the range test first; default depends on the strategy."
    )
    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and v <= 0:
            raise ValueError(f"optim.lr must be > 0 or 'find' (got {v})")
        return v

    def fixed_lr(self) -> float | None:
        """The rate the config sets, or None when a strategy's default or the range test decides it."""
        return self.lr if isinstance(self.lr, float) else None

    batch_size: int = Field(32, gt=0, description="Global batch size (all processes together, before accumulation).")
    epochs: int | None = Field(
        None, gt=0, description="Passes over the training data (raised on small data to reach optim.min_steps); null: the task's "
        "default (text-classification 1, measured in docs/strategies.md; image-classification and causal-lm 3).")
    min_steps: int = Field(
        150, ge=0, description="Train at least this many optimizer steps: on small data the steps are raised to it, the last epoch partial (few-sample "
        "fine-tuning fails from too few updates: Mosbach et al. 2021, Zhang et al. 2021); the best validation weights are kept. 0 = off."
    )
    head_lr: float | None = Field(
        None, gt=0, description="Learning rate of the new head when more than the head trains (full, freeze, gradual-unfreeze, lora); "
        "null: the task's default (classifiers: 1e-3) or optim.lr if higher. A fresh head at the backbone's 2e-5 barely leaves its random start."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (not applied to biases and norms).")
    warmup: float = Field(0.06, ge=0, description="Linear warmup: a fraction of all steps if < 1, else a number of steps.")
    scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"] = Field(
        "linear", description="Learning-rate schedule after warmup, by its transformers name (get_scheduler); constant keeps the warmup."
    )
    grad_accum: int = Field(1, gt=0, description="Accumulate gradients over this many batches per optimizer step.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (the schedule spans them), even mid-epoch.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this value; null turns clipping off.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"optim.betas must each be in [0, 1) (got {list(v)}); the default is [0.9, 0.999]")
        return v
    lr_find_steps: int = Field(100, ge=10, description="Learning-rate range test: number of steps of the sweep (stops early when the loss explodes).")
    lr_find_range: tuple[float, float] = Field((1e-7, 1.0), description="Learning-rate range test: first and last rate of the exponential sweep.")

    @field_validator("lr_find_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < v[1]:
            raise ValueError(f"optim.lr_find_range must be two rates, 0 < first < last (got {list(v)})")
        return v


class TrainConfig(_Section):
    max_length: int = Field(128, gt=1, description="Truncate texts to this many tokens.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware runs it fast (CUDA, CPUs with AMX/AVX-512 BF16), else fp32; on a CPU "
        "fp32 for convolutional networks (measured faster than bf16 even with AMX)."
    )
    seed: int = Field(0, description="Seeds data splits, shuffling, head initialisation and dropout.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N optimizer steps; 0 = at the end of every epoch.")
    log_every: int = Field(10, gt=0, description="Write a metrics.jsonl line every N optimizer steps.")
    early_stopping: int = Field(0, ge=0, description="Stop after N evaluations without improvement; 0 = never stop early.")
    metric: str = Field("macro_f1", description="Validation metric that picks the best weights (restored at the end).")
    group_by_length: bool = Field(True, description="Batch examples of similar length together (less padding, faster).")
    checkpoint_every: int = Field(0, ge=0, description="Write a checkpoint every N optimizer steps (0: only at the end of each epoch).")
    checkpoint_epochs: bool = Field(True, description="Write a checkpoint at the end of every epoch but the run's last (a finished run keeps none).")
    checkpoint_minutes: float = Field(
        5.0, ge=0, description="End-of-epoch checkpoints only once this many minutes of training have passed since the run "
        "started, resumed or wrote its last checkpoint (a killed run loses at most that; Ctrl-C and SIGTERM always write "
        "one). 0: at every epoch's end. Writing one takes seconds (MiniLM: about 2.5 s) where short runs' epochs take as long.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers (Accelerate's) that get metrics.jsonl's numbers: tensorboard "
        "(event files in RUN/tensorboard), mlflow (RUN/mlflow.db, SQLite, unless MLFLOW_TRACKING_URI is set), wandb (offline "
        "unless WANDB_MODE is set).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest N checkpoints (plus the one at the best validation step).")
    micro_batch_size: int | None = Field(
        None, gt=0, description="Run each batch as micro-batches of at most this many rows (per process), gradients accumulated: "
        "the same optimisation as optim.batch_size, less activation memory. null = the whole batch at once."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass instead of storing them: less memory, about a third slower."
    )
    fast_cpu_ops: bool = Field(
        True, description="On a CPU: dropout masks from 16-bit lanes of 64-bit draws, a float32-softmax attention path when "
        "attention dropout is on, one kept embedding-gradient buffer, and a first-token classifier's last layer computed "
        "for the first token alone (tunesmith.models.fastops): the same mathematics, a faster step. false = the plain modules."
    )
    class_weights: Literal["auto", "balanced", "none"] = Field(
        "auto", description="Single-label classifiers: 'balanced' weighs each class's loss by n_rows / (n_classes * class_rows) "
        "(scikit-learn's rule); 'auto' does so when the largest training class has 3x the rows of the smallest or more."
    )
    max_bad_steps: int = Field(
        5, ge=1, description="A step whose gradient is NaN/inf is skipped and counted; this many in a row stop the run."
    )


class SweepParam(_Section):
    """One searched key of `sweep:` (tunesmith sweep): a range (`low`, `high`, `log`, `step`; integers when
    both ends are) or `choices`."""

    low: int | float | None = Field(None, description="Lower end of the range.")
    high: int | float | None = Field(None, description="Upper end of the range.")
    log: bool = Field(False, description="Sample the range on a log scale (learning rates, weight decay).")
    step: int | float | None = Field(None, gt=0, description="Sample only multiples of step from low.")
    choices: list[Any] | None = Field(None, min_length=1, description="The values to choose among (strategies, schedulers).")

    @model_validator(mode="after")
    def _range_or_choices(self) -> "SweepParam":
        ranged = self.low is not None or self.high is not None
        if self.choices is not None and ranged:
            raise ValueError("give either low/high or choices, not both")
        if self.choices is None and (self.low is None or self.high is None):
            raise ValueError("give low and high (a range) or choices (a list)")
        if ranged and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be less than high ({self.high})")
        if self.log and ranged and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step do not go together (Optuna samples one or the other)")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and (self.step is None or isinstance(self.step, int))


class EvalConfig(_Section):
    before: bool = Field(True, description="Evaluate the starting model (its fresh head) on the test set before training.")
    linear_probe: bool = Field(True, description="Baseline: logistic regression on frozen mean-pooled features.")
    every_epoch: bool = Field(True, description="Evaluate on validation during training (needed for best-weights and early stopping).")
    batch_size: int = Field(64, gt=0, description="Batch size for evaluation and prediction.")
    report: bool = Field(True, description="Write report.html (curves, baselines, confusion matrix, mistakes) at the end of the run.")


class ImageConfig(_Section):
    size: int | None = Field(None, gt=15, description="Input size in pixels; default: the model's own (224 for EfficientNet-Lite0).")
    scale: tuple[float, float] = Field((0.35, 1.0), description="Random resized crop: the share of the image area each training crop covers (min, max).")
    hflip: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip in training; 0 for digits, text and other handed images.")
    color_jitter: float = Field(0.0, ge=0, description="Brightness/contrast/saturation jitter strength in training; 0 = off.")
    randaugment: bool = Field(False, description="RandAugment (2 ops, magnitude 9) in training.")
    mixup: float = Field(0.0, ge=0, description="Mixup alpha; 0 = off.")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha; 0 = off.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the training loss.")
    top_k: int = Field(5, gt=0, description="Top-k accuracy in the metrics and k for predictions.")


class LMConfig(_Section):
    format: Literal["auto", "chat", "sharegpt", "conversational", "prompt-completion", "alpaca", "text"] = Field(
        "auto", description="causal-lm data format; auto decides per file from its fields: messages (OpenAI chat, tools too) | "
        "conversations (ShareGPT) | prompt+completion as strings (prompt-completion) or message lists (TRL conversational) | "
        "instruction+output (Alpaca) | text, or .txt."
    )
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens the loss covers: assistant turns (completions for prompt/completion data) with their end-of-turn token, or all tokens."
    )
    packing: bool = Field(
        True, description="Pack short examples into rows of train.max_length tokens (position ids restart per example: no attention across examples); false: one example per row, dynamic padding."
    )
    chat_template: str | None = Field(
        None, description="Chat template: null = the model's own (or the documented default if it has none), 'default', a .jinja file, or the template text."
    )
    system_prompt: str | None = Field(None, description="A system message added to every conversation that has none (training, samples, generate).")
    too_long: Literal["error", "skip"] = Field(
        "error", description="An example whose last answer does not fit in train.max_length even with its prompt cut: 'error' names it by file:line, 'skip' drops and counts it."
    )
    prompts: list[str] | None = Field(
        None, description="Prompts answered by the base and the tuned model side by side (samples.md); default: the first 5 test conversations."
    )
    samples: int = Field(5, ge=0, description="Without lm.prompts: how many test conversations the base and tuned models answer; 0 = none.")
    max_new_tokens: int = Field(128, gt=0, description="Tokens generated per sample prompt (greedy).")
    forgetting: str | None = Field(
        "guardian", description="General text for the forgetting check (perplexity before/after): 'guardian' (headlines in scattertext), a .txt/.jsonl file, or null."
    )
    forgetting_rows: int = Field(1000, gt=0, description="At most this many documents of the forgetting text are scored.")


class PreferenceConfig(_Section):
    format: Literal["auto", "paired", "openai", "unpaired"] = Field(
        "auto", description="preference data format; auto decides per file from its fields: prompt+chosen+rejected (TRL, strings "
        "or message lists) | input+preferred_output+non_preferred_output (OpenAI) | prompt+completion+label (TRL's unpaired, for kto)."
    )
    loss: Literal["dpo", "ipo", "simpo", "orpo", "kto"] = Field(
        "dpo", description="dpo (Rafailov et al. 2023) | ipo (Azar et al. 2024) | simpo, orpo: no reference model (Meng et al. 2024; "
        "Hong et al. 2024) | kto: good/bad answers, paired or not (Ethayarajh et al. 2024)."
    )
    beta: float | None = Field(
        None, gt=0, description="Strength of the loss: dpo/ipo/kto 0.1 (how far from the reference the policy may go, smaller = further), "
        "simpo 2.0 (reward scale), orpo 0.1 (weight of the odds-ratio term); null = that default."
    )
    gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin (TRL's simpo_gamma).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: the share of pairs assumed mislabelled (conservative DPO).")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the good answers' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the bad answers' loss.")
    cut_prompt: bool = Field(
        False, description="A pair whose prompt and longer answer exceed train.max_length: false = an error naming it (lm.too_long=skip "
        "drops and counts it); true = cut the prompt from the left until it fits (TRL's keep_end)."
    )


class Config(_Section):
    task: str = Field(description="What the model learns: text-classification, image-classification, causal-lm or preference.")
    model: str = Field(description="A packaged model name (see `tunesmith models`), a local Hugging Face or timm directory, a timm architecture name, or a hub id.")
    model_file: str | None = Field(None, description="image-classification: weights (.safetensors; .pth with allow_pickle) for a timm architecture named by `model`.")
    image: ImageConfig = Field(default_factory=ImageConfig)
    lm: LMConfig = Field(default_factory=LMConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    data: DataConfig
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = Field("runs/run", description="Where the run directory is written.")
    sweep: dict[str, SweepParam] = Field(
        default_factory=dict, description="tunesmith sweep: the search space, dotted config key -> {low, high, log} or {choices}."
    )
    overwrite: bool = Field(False, description="Replace a finished run in output_dir.")
    resume: bool | Literal["auto"] = Field(
        False, description="Continue from the newest checkpoint in output_dir: true (it must exist), auto (if there is one), false."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped inside a model repository (needed by some hub models). Off: it runs arbitrary code."
    )
    allow_pickle: bool = Field(
        False, description="Accept pickle-based weights (.bin/.pt/.pth) when a model has no safetensors; loaded with torch.load(weights_only=True)."
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from tunesmith.registry import TASKS

        TASKS.get(v)  # raises with the list of known tasks
        return v

    @model_validator(mode="before")
    @classmethod
    def _task_strategy(cls, raw: Any) -> Any:
        """The task's default strategy when none is named; `auto` settled where the task fixes it."""
        from tunesmith.registry import STRATEGIES, TASKS

        if not isinstance(raw, dict) or not isinstance(raw.get("task"), str) or raw["task"] not in TASKS:
            return raw
        strategy = raw.get("strategy") if raw.get("strategy") is not None else {}
        if not isinstance(strategy, dict):
            return raw
        task = TASKS.get(raw["task"])
        strategy = STRATEGIES.get("auto").settle({"name": task.default_strategy, **strategy}, task)
        return {**raw, "strategy": strategy}

    @model_validator(mode="after")
    def _check(self) -> "Config":
        """Task defaults, then what the task and strategy declare about each other; checked once, here."""
        from tunesmith.registry import STRATEGIES, TASKS

        task = TASKS.get(self.task)
        metrics = list(task.metrics_better)
        if "metric" not in self.train.model_fields_set and self.train.metric not in metrics:
            self.train.metric = metrics[0]  # the task's own default (causal-lm: loss)
        task.configure(self)
        name = self.strategy.name
        if name in task.refuses:
            raise ValueError(task.refuses[name])
        if STRATEGIES.get(name).needs_new_head and not task.new_head:
            usable = [n for n in STRATEGIES.in_order() if n != "auto" and n not in task.refuses
                      and not STRATEGIES.get(n).needs_new_head]
            raise ValueError(f"strategy '{name}' does not apply to task {self.task}: it trains a new head, and this task's "
                             f"model keeps its pre-trained output layer; use {', '.join(usable)}")
        micro = self.train.micro_batch_size
        if micro is not None and micro > self.optim.batch_size:
            raise ValueError(f"train.micro_batch_size ({micro}) is larger than optim.batch_size ({self.optim.batch_size}): "
                             f"a micro-batch is a slice of a batch; lower it to {self.optim.batch_size} or less, or leave it unset")
        if self.train.metric not in metrics:
            raise ValueError(
                f"train.metric: '{self.train.metric}' is not a validation metric{did_you_mean(self.train.metric, metrics)}; "
                f"choose one of {', '.join(metrics)}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Reading and overriding


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping (first on line {seen[key]}); keep one",
                    key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (str(k.value),)
                lines[p] = k.start_mark.line + 1
                walk(v, p)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"override '{item}' is not key=value (for example optim.lr=3e-5)")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{item}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        set_key(raw, parts, value, f"override '{item}'")
    return raw


def dotted(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"optim.lr": 3e-5, ...}: the keys the command line and sweeps use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_key(raw: dict[str, Any], parts: list[str], value: Any, what: str) -> None:
    """raw[a][b][c] = value for the dotted key a.b.c, making sections on the way."""
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"{what}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at a location, for 'did you mean' and 'allowed keys' messages."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


_UNION_TAGS = ("float", "str", "int", "bool", "none", "list", "dict", "tuple")


def _plain_loc(loc: tuple[Any, ...]) -> tuple[str, ...]:
    """A pydantic error location without the tags a union type adds ('optim.lr.float' -> 'optim.lr')."""
    parts = [str(p) for p in loc]
    return tuple(p for i, p in enumerate(parts) if i == 0 or not (
        p in _UNION_TAGS or p.startswith(("literal[", "function-", "lax-", "constrained-"))))


def _got(value: Any) -> str:
    """' (got ...)' for a bad value, short."""
    text = repr(value)
    return f" (got {text[:60] + '...' if len(text) > 60 else text})"


def _format_error(err: dict[str, Any], source: str | None, lines: dict[tuple[str, ...], int]) -> str:
    loc = _plain_loc(err["loc"])
    key = ".".join(loc)
    where = ""
    if source:
        line = lines.get(loc) or lines.get(loc[:-1])
        where = f"{source}:{line}: " if line else f"{source}: "
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _field_names(Config, loc[:-1])
        hint = did_you_mean(loc[-1], valid)
        return f"{where}unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}"
    if kind == "missing" and loc[-1].isdigit():  # a list too short for a fixed-size value such as optim.betas
        return f"{where}{'.'.join(loc[:-1])}: needs more values (item {int(loc[-1]) + 1} is missing)"
    if kind == "missing":
        return f"{where}missing required key '{key}'"
    if kind == "value_error":  # a validator's own words; the key named when they do not name it
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        return f"{where}{key}: {msg}" if key and key not in msg else f"{where}{msg}"
    return f"{where}{key}: {err['msg']}{_got(err.get('input'))}"


def load_config(
    source: str | Path | dict[str, Any], overrides: list[str] | None = None, **kwargs: Any
) -> Config:
    """Read a config from a YAML path or a dict, apply dotted overrides, validate."""
    name: str | None = None
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        path = Path(source)
        name = str(source)
        if not path.exists():
            raise UserError(f"config file {path} does not exist")
        if path.is_dir():
            raise UserError(f"config file {path} is a directory; give the YAML file (for example {path / 'run.yaml'})")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = e.object[: e.start].count(b"\n") + 1
            raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); a config is a YAML file saved as UTF-8") from None
        except OSError as e:
            raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
        try:
            raw = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"{path}{line}: not valid YAML: {problem}") from None
        raw = raw if raw is not None else {}
        if not isinstance(raw, dict):
            raise UserError(f"{path}: a config is a mapping of keys (task:, model:, data:, ...), not a {type(raw).__name__}")
        lines = _key_lines(text)
        base = path.resolve().parent
        raw = _resolve_data_paths(raw, base)
    overrides = list(overrides or [])
    for key, value in kwargs.items():  # Python API: train(cfg, optim__lr=3e-5) or train(cfg, **{"optim.lr": 3e-5})
        overrides.append(f"{key.replace('__', '.')}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    raw = apply_overrides(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(_format_error(e.errors()[0], name, lines)) from None
    except UserError as e:
        raise UserError(f"{name}: {e}" if name else str(e)) from None


def _resolve_data_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Data paths in a config file are relative to the file, unless they exist from the cwd."""
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "validation", "test"):
            value = data.get(key)
            if isinstance(value, str) and not Path(value).is_absolute() and not Path(value).exists():
                candidate = base / value
                if candidate.exists():
                    data[key] = str(candidate)
    replay = (raw.get("strategy") or {}).get("replay") if isinstance(raw.get("strategy"), dict) else None
    if isinstance(replay, dict) and isinstance(replay.get("file"), str):
        value = replay["file"]
        if not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
            replay["file"] = str(base / value)
    return raw


def save_config(config: Config, path: Path, lr: float | None = None) -> None:
    """The resolved config as YAML; `lr`: the learning rate the run used, where the config left it to a default."""
    raw = config.to_dict()
    if lr is not None:
        raw["optim"]["lr"] = lr
    if not raw.get("sweep"):
        raw.pop("sweep", None)  # only a sweep's own config has a search space
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
