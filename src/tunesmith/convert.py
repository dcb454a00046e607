"""`tunesmith config convert FILE`: an Axolotl, LLaMA-Factory or Hugging Face Trainer config as a
tunesmith config, where the mapping is exact; everything else is listed, not guessed.

Each source key maps to tunesmith keys by a rule below. Batch sizes need care: Axolotl's
`micro_batch_size` and LLaMA-Factory's / the Trainer's `per_device_train_batch_size` are per
device, before accumulation; tunesmith's `optim.batch_size` is the global batch of one optimizer
step. On one device the product of the per-device size and the accumulation steps is exact
(`optim.batch_size`), and the per-device size becomes `train.micro_batch_size` (same arithmetic,
same memory); on several devices multiply by their number (said in the output).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import UserError

Rule = Callable[[Any, dict[str, Any]], dict[str, Any]]


class Unmapped(Exception):
    """This key (or this value of it) has no exact tunesmith equivalent; the message says why."""


def to(key: str, fn: Callable[[Any], Any] = lambda v: v) -> Rule:
    return lambda v, src: {key: fn(v)}


def skip(reason: str) -> Rule:
    def rule(v: Any, src: dict[str, Any]) -> dict[str, Any]:
        raise Unmapped(reason)
    return rule


def _raise(reason: str) -> dict[str, Any]:
    raise Unmapped(reason)


def ignore(v: Any, src: dict[str, Any]) -> dict[str, Any]:
    return {}


def _precision(name: str) -> Rule:
    def rule(v: Any, src: dict[str, Any]) -> dict[str, Any]:
        if v == "auto":  # Axolotl: bf16 where the hardware has it, which is tunesmith's own auto
            return {"train.precision": "auto"}
        return {"train.precision": name} if v in (True, "true") else {}
    return rule


def _warmup_ratio(v: Any, src: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise Unmapped("a warmup ratio is a fraction below 1")
    return {"optim.warmup": float(v)}


def _warmup_steps(v: Any, src: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(v, int) or v < 1:
        if v in (0, None):
            return {}
        raise Unmapped("warmup steps are a whole number")
    return {"optim.warmup": v}


SCHEDULERS = {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"}


def _scheduler(v: Any, src: dict[str, Any]) -> dict[str, Any]:
    if v not in SCHEDULERS:
        raise Unmapped(f"schedule '{v}' is not one of {', '.join(sorted(SCHEDULERS))}")
    return {"optim.scheduler": v}


def _save_strategy(v: Any, src: dict[str, Any]) -> dict[str, Any]:
    """The Trainer's save_strategy: "epoch" saves at every epoch's end (tunesmith's default waits 5 minutes of
    training between those), "no" saves nothing, "steps" is save_steps' (train.checkpoint_every)."""
    rules = {"epoch": {"train.checkpoint_minutes": 0}, "no": {"train.checkpoint_epochs": False}, "steps": {}}
    if v not in rules:
        raise Unmapped(f"save_strategy '{v}' is not one of epoch, steps, no")
    return rules[v]


def _batch(per_device_key: str, accum_key: str) -> Rule:
    def rule(v: Any, src: dict[str, Any]) -> dict[str, Any]:
        accum = src.get(accum_key) or 1
        return {"optim.batch_size": int(v) * int(accum), "train.micro_batch_size": int(v)}
    return rule


def _targets(v: Any, src: dict[str, Any]) -> dict[str, Any]:
    if v in ("all", "all-linear") or v == ["all"]:
        return {"strategy.lora.target_modules": "all-linear"}
    names = [t.strip() for t in v.split(",")] if isinstance(v, str) else list(v)
    return {"strategy.lora.target_modules": names}


def _betas(index: int) -> Rule:
    def rule(v: Any, src: dict[str, Any]) -> dict[str, Any]:
        b = [src.get("adam_beta1", 0.9), src.get("adam_beta2", 0.999)]
        b[index] = v
        return {"optim.betas": b}
    return rule


COMMON: dict[str, Rule] = {
    "learning_rate": to("optim.lr", float), "weight_decay": to("optim.weight_decay", float),
    "warmup_ratio": _warmup_ratio, "warmup_steps": _warmup_steps, "lr_scheduler_type": _scheduler,
    "max_grad_norm": to("optim.max_grad_norm", float), "max_steps": lambda v, s: {"optim.max_steps": v} if v and v > 0 else {},
    "seed": to("train.seed", int), "output_dir": to("output_dir", str), "bf16": _precision("bf16"), "fp16": _precision("fp16"),
    "gradient_checkpointing": to("train.gradient_checkpointing", bool), "adam_beta1": _betas(0), "adam_beta2": _betas(1),
    "gradient_accumulation_steps": ignore,  # folded into optim.batch_size with the per-device batch
}

TRAINER: dict[str, Rule] = {
    **COMMON,
    "num_train_epochs": to("optim.epochs", lambda v: max(1, round(float(v)))),
    "per_device_train_batch_size": _batch("per_device_train_batch_size", "gradient_accumulation_steps"),
    "per_device_eval_batch_size": to("eval.batch_size", int),
    "eval_steps": to("train.eval_every", int), "logging_steps": to("train.log_every", int),
    "save_steps": to("train.checkpoint_every", int), "save_total_limit": to("train.keep_checkpoints", int),
    "metric_for_best_model": lambda v, s: {"train.metric": v.removeprefix("eval_")},
    "group_by_length": to("train.group_by_length", bool), "resume_from_checkpoint": lambda v, s: {"resume": True} if v else {},
    "overwrite_output_dir": to("overwrite", bool),
    "load_best_model_at_end": ignore, "do_train": ignore, "do_eval": ignore, "eval_strategy": ignore,
    "evaluation_strategy": ignore, "save_strategy": _save_strategy, "logging_strategy": ignore,
    "report_to": skip("trackers are not available yet"), "optim": skip("tunesmith always uses AdamW (torch's fused when it can)"),
}

AXOLOTL: dict[str, Rule] = {
    **COMMON,
    "base_model": to("model", str), "sequence_len": to("train.max_length", int), "sample_packing": to("lm.packing", bool),
    "micro_batch_size": _batch("micro_batch_size", "gradient_accumulation_steps"),
    "num_epochs": to("optim.epochs", lambda v: max(1, round(float(v)))), "lr_scheduler": _scheduler,
    "train_on_inputs": lambda v, s: {"lm.loss_on": "all" if v else "assistant"},
    "adapter": lambda v, s: {"strategy.name": "lora"} if v == "lora" else _raise("QLoRA (4-bit base weights) is not available; adapter: lora is"),
    "lora_r": to("strategy.lora.r", int), "lora_alpha": to("strategy.lora.alpha", float),
    "lora_dropout": to("strategy.lora.dropout", float), "lora_target_modules": _targets,
    "lora_target_linear": lambda v, s: {"strategy.lora.target_modules": "all-linear"} if v else {},
    "peft_use_dora": to("strategy.lora.use_dora", bool), "val_set_size": to("data.validation_size", float),
    "eval_steps": to("train.eval_every", int), "logging_steps": to("train.log_every", int),
    "save_steps": to("train.checkpoint_every", int), "save_total_limit": to("train.keep_checkpoints", int),
    "eval_batch_size": to("eval.batch_size", int), "optimizer": skip("tunesmith always uses AdamW"),
    "datasets": lambda v, s: _axolotl_datasets(v), "chat_template": lambda v, s: _template(v),
    "load_in_8bit": lambda v, s: {} if not v else _raise("8-bit loading is not available"),
    "load_in_4bit": lambda v, s: {} if not v else _raise("4-bit loading is not available"),
    "strict": ignore, "tf32": ignore, "model_type": ignore, "tokenizer_type": ignore, "dataset_prepared_path": ignore,
    "pad_to_sequence_len": skip("tunesmith pads each batch to its own longest row (packed rows are full anyway)"),
    "flash_attention": skip("attention kernels are the model's own (SDPA)"),
}

LLAMA_FACTORY: dict[str, Rule] = {
    **COMMON,
    "model_name_or_path": to("model", str), "cutoff_len": to("train.max_length", int),
    "stage": lambda v, s: {"task": "causal-lm"} if v in ("sft", "pt") else _raise(f"stage '{v}' is not available (sft and pt are)"),
    "finetuning_type": lambda v, s: {"strategy.name": {"lora": "lora", "full": "full", "freeze": "freeze"}[v]}
    if v in ("lora", "full", "freeze") else _raise(f"finetuning_type '{v}'"),
    "lora_rank": to("strategy.lora.r", int), "lora_alpha": to("strategy.lora.alpha", float),
    "lora_dropout": to("strategy.lora.dropout", float), "lora_target": _targets, "use_dora": to("strategy.lora.use_dora", bool),
    "freeze_trainable_layers": lambda v, s: {"strategy.train_last_n": int(v)} if int(v) > 0 else _raise("negative freeze_trainable_layers (the first N layers) has no equivalent"),
    "per_device_train_batch_size": _batch("per_device_train_batch_size", "gradient_accumulation_steps"),
    "per_device_eval_batch_size": to("eval.batch_size", int),
    "num_train_epochs": to("optim.epochs", lambda v: max(1, round(float(v)))),
    "val_size": to("data.validation_size", float), "packing": to("lm.packing", bool),
    "train_on_prompt": lambda v, s: {"lm.loss_on": "all" if v else "assistant"},
    "max_samples": to("data.max_rows", int), "logging_steps": to("train.log_every", int),
    "save_steps": to("train.checkpoint_every", int), "eval_steps": to("train.eval_every", int),
    "overwrite_output_dir": to("overwrite", bool), "resume_from_checkpoint": lambda v, s: {"resume": True} if v else {},
    "dataset": lambda v, s: _factory_dataset(v, s), "dataset_dir": ignore, "eval_dataset": lambda v, s: _factory_dataset(v, s, "validation"),
    "template": lambda v, s: _template(v), "do_train": ignore, "plot_loss": skip("report plots are not available yet"),
    "report_to": skip("trackers are not available yet"), "trust_remote_code": to("trust_remote_code", bool),
    "preprocessing_num_workers": ignore, "overwrite_cache": ignore, "ddp_timeout": ignore,
    "quantization_bit": lambda v, s: {} if not v else _raise("quantized base weights are not available"),
}

FORMATS = {"chat_template": "chat", "sharegpt": "sharegpt", "alpaca": "alpaca", "completion": "text"}


def _template(v: Any) -> dict[str, Any]:
    if v in ("tokenizer_default", "default", "empty", None):
        return {}
    raise Unmapped(f"template '{v}': tunesmith renders with the model's own chat template (lm.chat_template takes a "
                   "Jinja file or text, not a name)")


def _axolotl_datasets(v: Any) -> dict[str, Any]:
    if not isinstance(v, list) or len(v) != 1 or not isinstance(v[0], dict) or "path" not in v[0]:
        raise Unmapped("only one dataset with a path maps (data.train is one file)")
    d = v[0]
    if not Path(str(d["path"])).suffix:
        raise Unmapped(f"dataset '{d['path']}' is a hub name; tunesmith reads local files")
    out: dict[str, Any] = {"data.train": str(d["path"])}
    kind = d.get("type")
    if kind is not None:
        if kind not in FORMATS:
            raise Unmapped(f"dataset type '{kind}' (known: {', '.join(FORMATS)})")
        out["lm.format"] = FORMATS[kind]
    return out


def _factory_dataset(v: Any, src: dict[str, Any], split: str = "train") -> dict[str, Any]:
    """A LLaMA-Factory dataset name, through dataset_dir/dataset_info.json, to its local file."""
    names = [n.strip() for n in v.split(",")] if isinstance(v, str) else list(v)
    if len(names) != 1:
        raise Unmapped("only one dataset maps (data.train is one file)")
    info_file = Path(str(src.get("dataset_dir", "data"))) / "dataset_info.json"
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))[names[0]]
    except (OSError, ValueError, KeyError):
        raise Unmapped(f"dataset '{names[0]}' is not described in {info_file}") from None
    if "file_name" not in info:
        raise Unmapped(f"dataset '{names[0]}' is a hub dataset; tunesmith reads local files")
    out: dict[str, Any] = {f"data.{split}": str(info_file.parent / info["file_name"])}
    fmt = info.get("formatting", "alpaca")
    if fmt not in ("alpaca", "sharegpt"):
        raise Unmapped(f"dataset formatting '{fmt}'")
    out["lm.format"] = fmt
    return out


def detect(src: dict[str, Any]) -> str:
    if "base_model" in src and ("datasets" in src or "sequence_len" in src or "micro_batch_size" in src):
        return "axolotl"
    if "model_name_or_path" in src or "finetuning_type" in src or "cutoff_len" in src:
        return "llama-factory"
    if "per_device_train_batch_size" in src or "num_train_epochs" in src:
        return "trainer"
    raise UserError("cannot tell the config's tool: expected Axolotl (base_model, datasets, sequence_len), LLaMA-Factory "
                    "(model_name_or_path, finetuning_type, cutoff_len) or Hugging Face Trainer keys (per_device_train_batch_size)")


def convert(path: str | Path) -> tuple[dict[str, Any], list[tuple[str, str]], str]:
    """(the tunesmith config as nested dict, [(source key, why it did not map)], the source tool)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p} does not exist" if not p.exists() else f"{p} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
        src = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"{p}: not a readable YAML/JSON config ({str(e).splitlines()[0]})") from None
    if not isinstance(src, dict):
        raise UserError(f"{p}: a config is a mapping of keys, not a {type(src).__name__}")
    tool = detect(src)
    rules = {"axolotl": AXOLOTL, "llama-factory": LLAMA_FACTORY, "trainer": TRAINER}[tool]
    flat: dict[str, Any] = {"task": "causal-lm"} if tool != "trainer" else {}
    unmapped: list[tuple[str, str]] = []
    for key, value in src.items():
        if value is None or value == "":  # a key left empty is a key not set
            continue
        rule = rules.get(key)
        if rule is None:
            unmapped.append((key, "no tunesmith equivalent"))
            continue
        try:
            for k, v in rule(value, src).items():
                if k in flat and k == "optim.betas":
                    v = [src.get("adam_beta1", 0.9), src.get("adam_beta2", 0.999)]
                flat[k] = v
        except Unmapped as e:
            unmapped.append((key, str(e)))
        except (TypeError, ValueError, AttributeError):
            unmapped.append((key, f"value {value!r} is not of the expected kind"))
    nested: dict[str, Any] = {}
    for k, v in flat.items():
        node = nested
        parts = k.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = v
    return nested, unmapped, tool


def render(nested: dict[str, Any], unmapped: list[tuple[str, str]], tool: str, source: str) -> str:
    """The YAML, with what did not map as comments at the top."""
    head = [f"# converted from {source} ({tool}) by `tunesmith config convert`; check it with `tunesmith validate`"]
    if "optim" in nested and "batch_size" in nested["optim"]:
        head.append("# optim.batch_size is the global batch: on N devices, multiply it by N to match the source run")
    if unmapped:
        head.append(f"# not mapped ({len(unmapped)}):")
        head += [f"#   {k}: {why}" for k, why in unmapped]
    order = ["task", "model", "data", "strategy", "optim", "train", "lm", "preference", "eval", "output_dir"]
    ordered = {k: nested[k] for k in order if k in nested} | {k: v for k, v in nested.items() if k not in order}
    return "\n".join(head) + "\n" + yaml.safe_dump(ordered, sort_keys=False)
