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
from typing import Any, Literal

import torch
from torch import nn

from pydantic import Field

from tunesmith.errors import UserError
from tunesmith.models.fastops import keep_mask
from tunesmith.strategies.base import BaseStrategy, ModelParts, ParamGroup, StrategyOptions
from tunesmith.strategies.guards import relative_l2

# Families PEFT's default table lacks.
EXTRA_TARGETS = {
    "distilbert": ["q_lin", "v_lin"],
    "modernbert": ["Wqkv"],
    "vit": ["query", "value"],
}


class _DropoutLinear(torch.autograd.Function):
    """linear(dropout(x), weight) that keeps x and a bool mask for the backward pass, not the dropped copy:
    the q/k/v (and gate/up) branches of a block read the same x, so it is stored once, not once per branch."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float, scale: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p)
        ctx.save_for_backward(x, keep, weight)
        ctx.scale = scale
        return nn.functional.linear(torch.where(keep, x * scale, 0.0), weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, keep, weight = ctx.saved_tensors
        gx = gw = None
        # under autocast (bf16) the forward's matmul ran in the gradient's dtype: so do these, then
        # hand each gradient back in its input's dtype
        if ctx.needs_input_grad[0]:
            gx = torch.where(keep, (grad @ weight.to(grad.dtype)) * ctx.scale, 0.0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = torch.where(keep, x * ctx.scale, 0.0).to(grad.dtype)
            gw = (grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return gx, gw, None, None


class DropoutLinear(nn.Linear):
    """A LoRA `A` projection with its input dropout fused in (CPU; elsewhere plain dropout + linear).

    PEFT puts a dropout on the input of every LoRA branch. On a CPU, torch's Bernoulli sampling
    took 16% of a SmolLM2 LoRA step (7 adapted layers x 30 blocks, inputs 2,048 x 576..1,536), and
    each branch kept its own dropped copy of the input for the backward pass. Here one 64-bit draw
    gives four 16-bit lanes, each kept when at or above p * 65536 (p rounded to 1/65536): the
    same Bernoulli(1 - p) mask and 1 / (1 - p) scaling as `nn.Dropout`, from torch's seeded
    generator (runs repeat and resume exactly), at about a third of the time; and the backward
    pass keeps x (shared by the branches that read it) plus a one-byte mask. The module stays an
    `nn.Linear` with the same weight, so PEFT's saving, merging and loading are unchanged.
    """

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(x)
        if x.device.type != "cpu" or self.bias is not None:
            return super().forward(nn.functional.dropout(x, self.p, True))
        return _DropoutLinear.apply(x, self.weight, self.p, 1.0 / (1.0 - self.p))


def use_fused_dropout(model: nn.Module) -> int:
    """Fold each LoRA branch's nn.Dropout into its A projection (DropoutLinear); returns how many."""
    n = 0
    for m in model.modules():
        drops, a = getattr(m, "lora_dropout", None), getattr(m, "lora_A", None)
        if not (isinstance(drops, nn.ModuleDict) and isinstance(a, nn.ModuleDict)):
            continue
        for k, d in list(drops.items()):
            lin = a[k] if k in a else None
            if isinstance(d, nn.Dropout) and d.p > 0 and type(lin) is nn.Linear:
                lin.__class__ = DropoutLinear
                lin.p = d.p
                drops[k] = nn.Identity()
                n += 1
    return n


def default_targets(model: nn.Module) -> list[str] | None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = PEFT_TARGETS.get(model_type) or EXTRA_TARGETS.get(model_type)
    return list(targets) if targets else None


def all_linear(model: nn.Module, head_modules: list[str]) -> list[str]:
    """Every Linear layer of the backbone, by full name: not the new head, not a language model's output layer."""
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not out_layer
             and not any(n == h or n.startswith(h + ".") for h in head_modules)]
    if not names:
        raise UserError("strategy.lora.target_modules: all-linear found no Linear layer outside the head")
    return names


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


class LoraSettings(StrategyOptions):
    r: int = Field(8, gt=0, description="LoRA rank: size of the low-rank update of each target weight.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch input.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Module names to adapt (a name matches itself and any '*.name'), or 'all-linear' (every Linear layer "
        "of the backbone, QLoRA's choice: Dettmers et al. 2023); default: per architecture, e.g. BERT query,value."
    )
    use_dora: bool = Field(
        False, description="DoRA (Liu et al. 2024, PEFT's use_dora): each adapted weight as a magnitude and a direction, LoRA on "
        "the direction; closer to full fine-tuning at the same rank, slower per step. Merged into plain weights on export."
    )


class LoraOptions(StrategyOptions):
    lora: LoraSettings = Field(default_factory=LoraSettings)


class Lora(BaseStrategy):
    name = "lora"
    default_lr = 5e-4
    description = "low-rank adapters (PEFT) + the new head; base weights frozen; merged and adapter exports"
    Options = LoraOptions
    trains_backbone = False
    guards = frozenset({"replay"})
    probe_first = True
    averages = False  # the mean of B and of A is not the mean of B @ A: no model soup
    no_guard_reason = "LoRA leaves the pre-trained weights unchanged"

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        from peft import LoraConfig, get_peft_model

        cfg = self.config.lora
        model = parts.model
        family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        module_names = [n for n, _ in model.named_modules()]
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        head_modules = sorted({n.rsplit(".", 1)[0] for n in parts.head})
        targets = all_linear(model, head_modules) if cfg.target_modules == "all-linear" else cfg.target_modules or default_targets(model)
        if not targets:
            raise UserError(
                f"no default LoRA target modules for model family '{family}'; set strategy.lora.target_modules "
                f"(its Linear/Conv layers are named: {', '.join(linear_names[:12])})"
            )
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
            modules_to_save=head_modules, bias="none", use_dora=cfg.use_dora,
        )
        try:
            with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
                warnings.simplefilter("ignore", FutureWarning)
                peft_model = get_peft_model(model, lcfg)
        except (ValueError, TypeError) as e:
            raise UserError(f"strategy.lora: PEFT cannot adapt this model: {str(e).splitlines()[0]}") from None
        if not cfg.use_dora:  # DoRA's forward reads the dropout module itself
            use_fused_dropout(peft_model)
        parts.model = peft_model
        self.model = peft_model
        adapters = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]  # DoRA's lora_magnitude_vector too
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
