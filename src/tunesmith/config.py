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
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class LoraConfig(_Section):
    r: int = Field(8, gt=0, description="LoRA rank: size of the low-rank update of each target weight.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt (a name matches itself and any '*.name'); default: per architecture, e.g. BERT query,value."
    )


class ReplayConfig(_Section):
    file: str = Field(description="General-domain examples to mix into training, in the training data's format (same columns, known labels).")
    fraction: float = Field(0.1, gt=0, lt=1, description="Share of every training batch taken from the replay file.")


STRATEGY_NAMES = "full | head-only | feature-extraction | freeze | gradual-unfreeze | lora | auto"


class StrategyConfig(_Section):
    name: str = Field("full", description=f"Which weights train: {STRATEGY_NAMES} (see `tunesmith strategies`).")
    train_last_n: int | None = Field(
        None, ge=0, description="freeze: train the last N blocks (plus the layers above them and the head); the rest stays frozen."
    )
    freeze_patterns: list[str] = Field(
        default_factory=list, description="freeze: also freeze parameters whose names match these glob patterns, e.g. '*.attention.*'."
    )
    freeze_embeddings: bool = Field(True, description="freeze / gradual-unfreeze: keep the embeddings frozen.")
    unfreeze_every: int = Field(
        0, ge=0, description="gradual-unfreeze: unfreeze one more block every N optimizer steps; 0 = one more block each epoch."
    )
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="Discriminative learning rates: each block's lr is the head's lr times layer_decay^(distance from the head)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    head: Literal["linear", "mlp"] = Field("linear", description="feature-extraction: the model's own linear head, or an MLP in its place.")
    head_hidden: int = Field(256, gt=0, description="feature-extraction with head: mlp: hidden units.")
    pooling: Literal["auto", "head", "mean"] = Field(
        "auto", description="feature-extraction: 'head' caches what the model's own head reads (plain HF export); 'mean' the mean of "
        "the last hidden states (sentence-transformers models); auto: mean when the model's pooling config says so."
    )
    cache_dir: str | None = Field(
        None, description="feature-extraction: where cached features live; default $TUNESMITH_CACHE or ~/.cache/tunesmith."
    )
    l2sp: float = Field(
        0.0, ge=0, description="Forgetting guard: add l2sp/2 * ||w - w_pretrained||^2 to the loss for every pre-trained weight that trains."
    )
    replay: ReplayConfig | None = Field(None, description="Forgetting guard: mix general-domain examples into every batch.")
    reason: str | None = Field(None, description="Set by `auto`: why it chose this strategy (recorded in the run's config.yaml).")

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
    def _combinations(self) -> "StrategyConfig":
        name = self.name
        if name == "auto":
            return self
        if self.train_last_n is not None and name != "freeze":
            raise ValueError(f"strategy.train_last_n applies to strategy 'freeze', not '{name}'")
        if self.freeze_patterns and name != "freeze":
            raise ValueError(f"strategy.freeze_patterns applies to strategy 'freeze', not '{name}'")
        if name == "freeze" and self.train_last_n is None and not self.freeze_patterns:
            raise ValueError("strategy 'freeze' needs strategy.train_last_n (e.g. 2) or strategy.freeze_patterns")
        if self.layer_decay is not None and name not in ("full", "freeze", "gradual-unfreeze"):
            raise ValueError(f"strategy.layer_decay combines with full, freeze and gradual-unfreeze, not '{name}'")
        if self.unfreeze_every and name != "gradual-unfreeze":
            raise ValueError(f"strategy.unfreeze_every applies to strategy 'gradual-unfreeze', not '{name}'")
        if self.pooling != "auto" and name != "feature-extraction":
            raise ValueError(f"strategy.pooling applies to strategy 'feature-extraction', not '{name}'")
        if self.head != "linear" and name != "feature-extraction":
            raise ValueError(f"strategy.head: {self.head} applies to strategy 'feature-extraction', not '{name}'")
        frozen_backbone = name in ("head-only", "feature-extraction")
        if self.l2sp and (frozen_backbone or name == "lora"):
            why = "the pre-trained weights do not move" if frozen_backbone else "LoRA leaves the pre-trained weights unchanged"
            raise ValueError(f"strategy.l2sp does nothing with strategy '{name}': {why}")
        if self.replay is not None and frozen_backbone:
            raise ValueError(f"strategy.replay does nothing with strategy '{name}': the backbone is frozen, nothing can be forgotten")
        return self


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

    batch_size: int = Field(32, gt=0, description="Global batch size (all processes together, before accumulation).")
    epochs: int = Field(3, gt=0, description="Passes over the training data.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (not applied to biases and norms).")
    warmup: float = Field(0.06, ge=0, description="Linear warmup: a fraction of all steps if < 1, else a number of steps.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate decay after warmup.")
    grad_accum: int = Field(1, gt=0, description="Accumulate gradients over this many batches per optimizer step.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (the schedule spans them), even mid-epoch.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this value; null turns clipping off.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    lr_find_steps: int = Field(100, ge=10, description="Learning-rate range test: number of steps of the sweep (stops early when the loss explodes).")
    lr_find_range: tuple[float, float] = Field((1e-7, 1.0), description="Learning-rate range test: first and last rate of the exponential sweep.")


class TrainConfig(_Section):
    max_length: int = Field(128, gt=1, description="Truncate texts to this many tokens.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware runs it fast (CUDA, CPUs with AMX/AVX-512 BF16), else fp32."
    )
    seed: int = Field(0, description="Seeds data splits, shuffling, head initialisation and dropout.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N optimizer steps; 0 = at the end of every epoch.")
    log_every: int = Field(10, gt=0, description="Write a metrics.jsonl line every N optimizer steps.")
    early_stopping: int = Field(0, ge=0, description="Stop after N evaluations without improvement; 0 = never stop early.")
    metric: str = Field("macro_f1", description="Validation metric that picks the best weights (restored at the end).")
    group_by_length: bool = Field(True, description="Batch examples of similar length together (less padding, faster).")
    checkpoint_every: int = Field(0, ge=0, description="Write a checkpoint every N optimizer steps (0: only at the end of each epoch).")
    checkpoint_epochs: bool = Field(True, description="Write a checkpoint at the end of every epoch.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest N checkpoints (plus the one at the best validation step).")
    micro_batch_size: int | None = Field(
        None, gt=0, description="Run each batch as micro-batches of at most this many rows (per process), gradients accumulated: "
        "the same optimisation as optim.batch_size, less activation memory. null = the whole batch at once."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass instead of storing them: less memory, about a third slower."
    )
    max_bad_steps: int = Field(
        5, ge=1, description="A step whose gradient is NaN/inf is skipped and counted; this many in a row stop the run."
    )


class EvalConfig(_Section):
    before: bool = Field(True, description="Evaluate the starting model (its fresh head) on the test set before training.")
    linear_probe: bool = Field(True, description="Baseline: logistic regression on frozen mean-pooled features.")
    every_epoch: bool = Field(True, description="Evaluate on validation during training (needed for best-weights and early stopping).")
    batch_size: int = Field(64, gt=0, description="Batch size for evaluation and prediction.")


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
    format: Literal["auto", "chat", "prompt-completion", "alpaca", "text"] = Field(
        "auto", description="causal-lm data format; auto decides per file from its fields (messages | prompt+completion | instruction+output | text) or .txt."
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


class Config(_Section):
    task: str = Field(description="What the model learns: text-classification, image-classification or causal-lm.")
    model: str = Field(description="A packaged model name (see `tunesmith models`), a local Hugging Face or timm directory, a timm architecture name, or a hub id.")
    model_file: str | None = Field(None, description="image-classification: weights (.safetensors; .pth with allow_pickle) for a timm architecture named by `model`.")
    image: ImageConfig = Field(default_factory=ImageConfig)
    lm: LMConfig = Field(default_factory=LMConfig)
    data: DataConfig
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = Field("runs/run", description="Where the run directory is written.")
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

    @model_validator(mode="after")
    def _check(self) -> "Config":
        from tunesmith.registry import TASKS
        from tunesmith.tasks.text_classification import METRICS

        task = TASKS.get(self.task)
        METRICS = getattr(task, "metrics_names", METRICS)
        if "metric" not in self.train.model_fields_set and self.train.metric not in METRICS:
            self.train.metric = METRICS[0]  # the task's own default (causal-lm: loss)
        if hasattr(task, "check_config"):
            task.check_config(self)  # combinations the task refuses, and its defaults
        if self.train.metric not in METRICS:
            raise ValueError(
                f"train.metric: '{self.train.metric}' is not a validation metric{did_you_mean(self.train.metric, METRICS)}; "
                f"choose one of {', '.join(METRICS)}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Reading and overriding


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
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at a location, for 'did you mean' and 'allowed keys' messages."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_error(err: dict[str, Any], source: str | None, lines: dict[tuple[str, ...], int]) -> str:
    loc = tuple(str(p) for p in err["loc"])
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
    if kind == "missing":
        return f"{where}missing required key '{key}'"
    if kind == "value_error":
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        return f"{where}{msg}"
    got = err.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
    return f"{where}{key}: {err['msg']}{got_s}"


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
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read config file {path}: {e}") from None
        try:
            raw = yaml.safe_load(text)
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


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
