"""`lora`: low-rank adapters through PEFT; the pre-trained weights stay frozen.

Target modules default per architecture (PEFT's table, plus a few families it lacks) and can be
set in `strategy.lora.target_modules`. The new head is always in PEFT's `modules_to_save`, so it
trains and is saved with the adapter: an adapter without its head is the classic way to lose a
LoRA classifier. The run's `model/` holds the merged model in plain Hugging Face format and
`model/adapter/` the adapter alone (PEFT format, `PeftModel.from_pretrained(base, path)`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.errors import UserError
from tunesmith.registry import STRATEGIES
from tunesmith.strategies.base import BaseStrategy, ModelParts, ParamGroup
from tunesmith.strategies.guards import relative_l2

# Families PEFT's default table lacks.
EXTRA_TARGETS = {
    "distilbert": ["q_lin", "v_lin"],
    "modernbert": ["Wqkv"],
    "vit": ["query", "value"],
}


def default_targets(model: nn.Module) -> list[str] | None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = PEFT_TARGETS.get(model_type) or EXTRA_TARGETS.get(model_type)
    return list(targets) if targets else None


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


@STRATEGIES.register("lora")
class Lora(BaseStrategy):
    name = "lora"
    default_lr = 5e-4
    description = "low-rank adapters (PEFT) + the new head; base weights frozen; merged and adapter exports"
    trains_backbone = False

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        from peft import LoraConfig, get_peft_model

        cfg = self.config.lora
        model = parts.model
        family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        module_names = [n for n, _ in model.named_modules()]
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        targets = cfg.target_modules or default_targets(model)
        if not targets:
            raise UserError(
                f"no default LoRA target modules for model family '{family}'; set strategy.lora.target_modules "
                f"(its Linear/Conv layers are named: {', '.join(linear_names[:12])})"
            )
        head_modules = sorted({n.rsplit(".", 1)[0] for n in parts.head})
        for t in targets:
            hits = [n for n in module_names if _matches(n, t)]
            if not hits:
                raise UserError(
                    f"strategy.lora.target_modules: '{t}' matches no module of this {family} model; "
                    f"its Linear/Conv layers are named: {', '.join(linear_names[:12])}"
                )
            if all(any(h == m or h.startswith(m + ".") for m in head_modules) for h in hits):
                raise UserError(f"strategy.lora.target_modules: '{t}' only matches the new head, which trains fully anyway")
        self.group_of = parts.group_of()
        lcfg = LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(targets),
            modules_to_save=head_modules, bias="none",
        )
        try:
            with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
                warnings.simplefilter("ignore", FutureWarning)
                peft_model = get_peft_model(model, lcfg)
        except (ValueError, TypeError) as e:
            raise UserError(f"strategy.lora: PEFT cannot adapt this model: {str(e).splitlines()[0]}") from None
        parts.model = peft_model
        self.model = peft_model
        adapters = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
        head = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
        return [ParamGroup("lora adapters", adapters), ParamGroup("head", head)]

    @torch.no_grad()
    def moved(self) -> dict[str, float]:
        """Relative size of the merged update, ||scale * B @ A|| / ||W||, per layer group."""
        from peft.tuners.lora import LoraLayer

        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for name, m in self.model.named_modules():
            if isinstance(m, LoraLayer) and "default" in m.lora_A:
                base_name = name.removeprefix("base_model.model.") + ".weight"
                g = self.group_of.get(base_name, "backbone")
                delta = m.get_delta_weight("default").float()
                w = m.get_base_layer().weight.float()
                num[g] = num.get(g, 0.0) + float(delta.pow(2).sum())
                den[g] = den.get(g, 0.0) + float(w.pow(2).sum())
        return relative_l2(num, den)

    def save(self, model: nn.Module, task: Any, directory: Path) -> nn.Module:
        """The adapter (with its head) into directory/adapter, then the merged plain model."""
        task.save(model, directory / "adapter")
        merged = model.merge_and_unload()
        task.save(merged, directory)
        return merged
