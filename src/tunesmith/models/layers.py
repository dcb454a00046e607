"""Layer groups: a model's parameters as embeddings, blocks bottom to top, neck, head.

Strategies that treat depth differently (freeze the last N blocks, gradual unfreezing,
layer-wise learning-rate decay) all read the same groups, computed here. Where the blocks live
is one entry per model family in `FAMILY_BLOCKS` (the path of the block list inside the model);
families without an entry fall back to the longest list of identical sub-modules, which is what
the families below would give too.

- embeddings: pre-trained parameters before the first block (token/position embeddings, a
  CNN stem);
- blocks: one group per transformer layer or CNN stage, bottom to top;
- neck: pre-trained parameters above the last block (BERT's pooler, a final norm, a conv head);
- head: the newly initialised parameters (sized to the user's labels).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tunesmith.errors import UserError

# model_type (Hugging Face config) or timm architecture prefix -> path of the block list.
FAMILY_BLOCKS: dict[str, str] = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "xlm-roberta": "encoder.layer",
    "electra": "encoder.layer",
    "deberta": "encoder.layer",
    "deberta-v2": "encoder.layer",
    "mpnet": "encoder.layer",
    "albert": "encoder.albert_layer_groups",
    "modernbert": "layers",
    "distilbert": "transformer.layer",
    "llama": "layers",
    "mistral": "layers",
    "qwen2": "layers",
    "qwen3": "layers",
    "gemma": "layers",
    "phi3": "layers",
    "gpt2": "h",
    "gpt_neox": "layers",
    "vit": "encoder.layer",
    # timm
    "efficientnet": "blocks",
    "mobilenetv3": "blocks",
    "vision_transformer": "blocks",
    "convnext": "stages",
}


@dataclass
class LayerGroups:
    embeddings: list[str] = field(default_factory=list)
    blocks: list[list[str]] = field(default_factory=list)
    neck: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)

    def ordered(self) -> list[tuple[str, list[str], int]]:
        """(group name, parameter names, distance from the head) from the bottom up.

        The head is at distance 0, the neck and the top block at 1, each block below one more,
        the embeddings one more than the lowest block.
        """
        n = len(self.blocks)
        out = [("embeddings", self.embeddings, n + 1)] if self.embeddings else []
        out += [(f"block {i}", names, n - i) for i, names in enumerate(self.blocks)]
        if self.neck:
            out.append(("neck", self.neck, 1))
        out.append(("head", self.head, 0))
        return out


def _family(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type:
        return model_type
    arch = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", None) or {}
    name = arch.get("architecture", "") if isinstance(arch, dict) else ""
    for family in FAMILY_BLOCKS:
        if name.startswith(family):
            return family
    return type(model).__name__.lower()


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    family = _family(model)
    path = FAMILY_BLOCKS.get(family)
    modules = dict(model.named_modules())
    if path:
        for name, m in modules.items():  # the path sits under the base model prefix (bert., model., ...)
            if (name == path or name.endswith("." + path)) and isinstance(m, (nn.ModuleList, nn.Sequential)):
                return name, m
    # Fallback: the longest list of sub-modules that are all of one class.
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in modules.items():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2:
            kinds = {type(c) for c in m}
            if len(kinds) == 1 and any(True for _ in m.parameters()):
                if best is None or len(m) > len(best[1]):
                    best = (name, m)
    return best


def layer_groups(model: nn.Module, head: list[str]) -> LayerGroups:
    """Split `model`'s parameters into embeddings, blocks, neck and head (see the module doc)."""
    found = _block_list(model)
    if found is None:
        raise UserError(
            f"cannot find the layer blocks of model family '{_family(model)}'; use strategy full, head-only or lora, "
            "or freeze by name with strategy.freeze_patterns"
        )
    prefix, blocks = found
    head_set = set(head)
    groups = LayerGroups(blocks=[[] for _ in blocks], head=list(head))
    index = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.") if prefix else re.compile(r"^(\d+)\.")
    seen_block = False
    for name, _ in model.named_parameters():
        if name in head_set:
            continue
        m = index.match(name)
        if m:
            groups.blocks[int(m.group(1))].append(name)
            seen_block = True
        elif seen_block:
            groups.neck.append(name)
        else:
            groups.embeddings.append(name)
    groups.blocks = [b for b in groups.blocks if b]  # blocks without parameters of their own
    return groups


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (transformers models, under a PEFT wrapper too)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise UserError(f"train.gradient_checkpointing: {type(inner).__name__} does not support it")
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def training_batch_norms(model: nn.Module) -> list[nn.Module]:
    """The batch-norm layers that update their running statistics as the model trains (in training mode and
    tracking statistics: the loop keeps frozen ones in eval mode)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training]


def recompute_batch_norm(model: nn.Module, norms: list[nn.Module], forward_all: Callable[[], None]) -> None:
    """Measure `norms`' running statistics anew, as the plain average over the batches `forward_all` runs
    (momentum None), with every other module in eval mode (no dropout): what averaged weights need, because
    their activations' statistics are not the average of the averaged models' (SWA's `update_bn`, Izmailov et
    al. 2018; REPAIR, Jordan et al., ICLR 2023). The caller restores the modes it wants afterwards."""
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            forward_all()
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
