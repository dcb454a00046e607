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


class MaskedMeanPooler(nn.Module):
    """In place of a BERT-style pooler: the attention-masked mean of the last hidden states, what a
    sentence-transformers model was trained to produce (its CLS pooler never was). The mask comes
    from a pre-hook on the encoder, so the model keeps its class, parameter names, LoRA targets and
    layer groups; only the pooler's two tensors are gone."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask if self.mask is not None else torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        return mean_pool(hidden_states, mask)


def mean_pooled_in_model(model: nn.Module) -> bool:
    """Whether `use_mean_pooling` made this model's own pooler the masked mean."""
    spec = getattr(getattr(model, "config", None), "tunesmith_head", None) or {}
    return spec.get("pooler") == "masked-mean"


def use_mean_pooling(model: nn.Module) -> bool:
    """Make a sequence classifier whose head reads the encoder's pooler read the mean of the last
    hidden states instead (recorded in config.tunesmith_head); False when the model has no such pooler."""
    base = getattr(model, "base_model", None)
    if base is None or not isinstance(getattr(base, "pooler", None), nn.Module):
        return False
    pooler = MaskedMeanPooler()
    base.pooler = pooler

    def keep_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    base.register_forward_pre_hook(keep_mask, with_kwargs=True)
    model.config.tunesmith_head = {**(getattr(model.config, "tunesmith_head", None) or {}), "pooling": "mean", "pooler": "masked-mean"}
    return True


def checkpoint_label_names(model_dir: Path) -> list[str] | None:
    """The class names a checkpoint's head was trained on, in its output order, from its config.json: `label_names`
    (timm's folders, tunesmith's image runs) or `id2label` (transformers); None when it names none or only
    transformers' placeholders (LABEL_0, LABEL_1, ...)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        names = cfg.get("label_names")
        if not isinstance(names, list):
            id2label = cfg.get("id2label") or {}
            names = [id2label[k] for k in sorted(id2label, key=int)]
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    names = [str(n) for n in names]
    return None if not names or names == [f"LABEL_{i}" for i in range(len(names))] else names


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
    in_model = mean_pooled_in_model(model)
    if in_model:  # the model mean-pools itself (every strategy on a sentence-transformers model)
        use_mean_pooling(model)
    if "module" not in spec:
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
    return MeanPooled(model, mlp) if spec.get("pooling") == "mean" and not in_model else model


class MeanPooled(nn.Module):
    """A backbone's mean-pooled last hidden states through a head, with the HF output shape."""

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        self.model, self.head = model, head
        self.config = model.config

    def forward(self, attention_mask: torch.Tensor, **batch: torch.Tensor) -> SimpleNamespace:
        hidden = self.model.base_model(attention_mask=attention_mask, **batch).last_hidden_state
        return SimpleNamespace(logits=self.head(mean_pool(hidden.float(), attention_mask)))
