"""Heads that plain `from_pretrained` cannot rebuild, and the pooling they read.

`feature-extraction` may put an MLP in place of a model's linear head, or train a head on the
mean of the last hidden states (sentence-transformers models). The saved config describes such a
head in `tunesmith_head`; `restore_custom_head` rebuilds it when a run is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


def make_mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, out_features))


def make_head(spec: dict[str, Any]) -> nn.Module:
    if spec["type"] == "mlp":
        return make_mlp(spec["in_features"], spec["hidden"], spec["out_features"])
    return nn.Linear(spec["in_features"], spec["out_features"])


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def sentence_transformers_pooling(model_dir: Path) -> str | None:
    """'mean' when the directory's sentence-transformers pooling config says mean tokens."""
    cfg = Path(model_dir) / "1_Pooling" / "config.json"
    try:
        pooling = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "mean" if pooling.get("pooling_mode_mean_tokens") else None


def restore_custom_head(model: nn.Module, model_dir: Path) -> nn.Module:
    """Rebuild a head that `feature-extraction` replaced (config `tunesmith_head`) and load its
    weights; a head on mean-pooled features comes back wrapped so that `model(**batch).logits`
    is right. Other models come back as they are."""
    spec = getattr(model.config, "tunesmith_head", None)
    if not spec:
        return model
    from safetensors.torch import load_file

    old = model.get_submodule(spec["module"])
    mlp = make_head(spec)
    parent_name, _, child = spec["module"].rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, mlp)
    state = load_file(str(model_dir / "model.safetensors"))
    prefix = spec["module"] + "."
    mlp.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    mlp.train(old.training)
    del old
    return MeanPooled(model, mlp) if spec.get("pooling") == "mean" else model


class MeanPooled(nn.Module):
    """A backbone's mean-pooled last hidden states through a head, with the HF output shape."""

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        self.model, self.head = model, head
        self.config = model.config

    def forward(self, attention_mask: torch.Tensor, **batch: torch.Tensor) -> SimpleNamespace:
        hidden = self.model.base_model(attention_mask=attention_mask, **batch).last_hidden_state
        return SimpleNamespace(logits=self.head(mean_pool(hidden.float(), attention_mask)))
