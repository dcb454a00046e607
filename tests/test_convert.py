"""`tunesmith config convert`: Axolotl, LLaMA-Factory and HF Trainer configs to tunesmith's, exact
mappings only; the result validates; what does not map is listed, never guessed."""

from __future__ import annotations

import json

import pytest
import yaml

from tunesmith.cli import main
from tunesmith.config import load_config

# Axolotl's examples/*/lora.yml, shortened
AXOLOTL = """
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
load_in_8bit: false
strict: false
datasets:
  - path: data/chat.jsonl
    type: chat_template
chat_template: tokenizer_default
dataset_prepared_path: last_run_prepared
val_set_size: 0.05
output_dir: ./outputs/lora-out
sequence_len: 2048
sample_packing: true
pad_to_sequence_len: true
adapter: lora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
wandb_project:
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
bf16: auto
gradient_checkpointing: true
warmup_steps: 10
"""
# LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, with a local dataset
FACTORY = """
model_name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
dataset: support
dataset_dir: {dir}
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
val_size: 0.1
"""


def _convert(tmp_path, capsys, name, text):
    src = tmp_path / name
    src.write_text(text)
    out = tmp_path / f"{name}.tunesmith.yaml"
    assert main(["config", "convert", str(src), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    return yaml.safe_load(out.read_text()), out.read_text(), err


def test_axolotl_lora_config(tmp_path, capsys):
    cfg, text, err = _convert(tmp_path, capsys, "lora.yml", AXOLOTL)
    assert cfg["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg["task"] == "causal-lm"
    assert cfg["data"] == {"train": "data/chat.jsonl", "validation_size": 0.05}
    assert cfg["strategy"] == {"name": "lora", "lora": {"r": 32, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear"}}
    # micro_batch_size 2 x gradient_accumulation_steps 4 = a global batch of 8 on one device, run as micro-batches of 2
    assert cfg["optim"]["batch_size"] == 8 and cfg["train"]["micro_batch_size"] == 2
    assert cfg["train"]["max_length"] == 2048 and cfg["train"]["precision"] == "auto" and cfg["train"]["gradient_checkpointing"]
    assert cfg["lm"] == {"format": "chat", "packing": True, "loss_on": "assistant"}
    assert cfg["optim"]["scheduler"] == "cosine" and cfg["optim"]["warmup"] == 10 and cfg["optim"]["lr"] == 2e-4
    assert "#   optimizer: tunesmith always uses AdamW" in text and "#   pad_to_sequence_len:" in text
    assert "tunesmith: not mapped: optimizer" in err and "wandb_project" not in text  # an empty key is not set
    load_config(cfg)  # every mapped key is a valid tunesmith key and value


def test_llama_factory_config_with_its_dataset_info(tmp_path, capsys):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"support": {"file_name": "support.json", "formatting": "sharegpt"}}))
    cfg, text, err = _convert(tmp_path, capsys, "sft.yaml", FACTORY.format(dir=tmp_path))
    assert cfg["data"] == {"train": str(tmp_path / "support.json"), "max_rows": 1000, "validation_size": 0.1}
    assert cfg["lm"]["format"] == "sharegpt" and cfg["strategy"]["lora"] == {"r": 8, "target_modules": "all-linear"}
    assert cfg["optim"]["batch_size"] == 8 and cfg["train"]["micro_batch_size"] == 1 and cfg["optim"]["epochs"] == 3
    assert cfg["optim"]["warmup"] == 0.1 and cfg["train"]["precision"] == "bf16" and cfg["overwrite"] is True
    assert "#   template: template 'llama3'" in text and "#   plot_loss:" in text and "tunesmith: not mapped: template" in err
    load_config(cfg)


def test_trainer_arguments_and_bad_input(tmp_path, capsys):
    args = {"learning_rate": 5e-5, "num_train_epochs": 3, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2,
            "warmup_ratio": 0.06, "lr_scheduler_type": "linear", "weight_decay": 0.01, "seed": 42, "optim": "adamw_torch_fused"}
    cfg, text, _ = _convert(tmp_path, capsys, "args.json", json.dumps(args))
    assert cfg["optim"] == {"lr": 5e-5, "epochs": 3, "batch_size": 32, "warmup": 0.06, "scheduler": "linear", "weight_decay": 0.01}
    assert cfg["train"] == {"micro_batch_size": 16, "seed": 42} and "#   optim: tunesmith always uses AdamW" in text
    for strategy, train in (("epoch", {"checkpoint_minutes": 0}), ("no", {"checkpoint_epochs": False}), ("steps", {})):
        src = {"per_device_train_batch_size": 8, "save_strategy": strategy}
        cfg, _, _ = _convert(tmp_path, capsys, f"save-{strategy}.json", json.dumps(src))
        assert cfg["train"] == {"micro_batch_size": 8, **train}
    src = {"per_device_train_batch_size": 8, "save_strategy": "best"}
    cfg, text, err = _convert(tmp_path, capsys, "save-best.json", json.dumps(src))
    assert "#   save_strategy: save_strategy 'best' is not one of epoch, steps, no" in text and "not mapped: save_strategy" in err
    (tmp_path / "x.yaml").write_text("foo: 1\n")
    for argv, fragment in ((["config", "convert", str(tmp_path / "x.yaml")], "cannot tell the config's tool"),
                           (["config", "convert", str(tmp_path / "nope.yaml")], "does not exist"),
                           (["config", "convert", str(tmp_path / "args.json"), "--output", str(tmp_path / "args.json")], "exists"),
                           (["config"], "required: ACTION")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tunesmith: error: ") and fragment in err[0], err


@pytest.mark.parametrize("bad", ["adapter: qlora", "lora_target_modules: 3", "lr_scheduler: one_cycle"])
def test_values_without_an_exact_mapping_are_listed(tmp_path, capsys, bad):
    cfg, text, err = _convert(tmp_path, capsys, "a.yml", "base_model: m\nsequence_len: 64\n" + bad + "\n")
    key = bad.split(":")[0]
    assert f"#   {key}:" in text and f"not mapped: {key}" in err
