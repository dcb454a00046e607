"""`feature-extraction`: run the frozen backbone once, cache its output on disk, train the head
on the cache.

The cached feature of a row is exactly what the model's own head receives (captured with a
forward pre-hook on the head module, backbone in eval mode: no dropout, batch-norm statistics
fixed), so the trained head drops back into the full model and `model/` is a plain Hugging Face
model that gives the same predictions. Heads whose input is the whole sequence and that read the
first token themselves (RoBERTa, ELECTRA) get the first token's vector cached.

The cache key covers the model (its path, files' sizes and times, config), the tokenized data
(so a changed file, tokenizer or `max_length` gives a new key), the head module and the
precision. A second run on the same data skips the backbone entirely.

`head: mlp` puts a one-hidden-layer MLP in place of a linear head; the saved config records it
(`tunesmith_head`) and `tunesmith.load` rebuilds it (plain `from_pretrained` would not).

`pooling: mean` caches the attention-masked mean of the last hidden states instead and trains a
new head on it: what sentence-transformers models (the packaged MiniLM among them) were trained
to produce, where the CLS pooler that Hugging Face's classification head reads was not.
`pooling: auto` (the default) takes mean when the model ships a sentence-transformers pooling
config that says mean, else the model's own head input. A mean-pooled head is recorded in
`tunesmith_head` too: `tunesmith.load` predicts with it; plain `from_pretrained` cannot.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Literal

import torch
from pydantic import Field
from torch import nn

from tunesmith.errors import UserError
from tunesmith.models.cache import cache_root, model_identity
from tunesmith.models.heads import make_head, mean_pool, mean_pooled_in_model, sentence_transformers_pooling
from tunesmith.precision import linear_weights_cast
from tunesmith.strategies.base import (
    BaseStrategy,
    ModelParts,
    ParamGroup,
    StrategyOptions,
    TrainingView,
    freeze,
    unfreeze,
)

CACHE_VERSION = "tunesmith-features-1"


class FeatureHead(nn.Module):
    """The model's head applied to cached features; returns an object with `.logits` like HF models."""

    def __init__(self, head: nn.Module, first_token: bool):
        super().__init__()
        self.head = head
        self.first_token = first_token

    def forward(self, features: torch.Tensor, **_: Any) -> SimpleNamespace:
        x = features.unsqueeze(1) if self.first_token else features
        return SimpleNamespace(logits=self.head(x))


def _head_module(model: nn.Module, head: list[str]) -> str:
    """The one module that holds every new head parameter."""
    modules = {n.rsplit(".", 1)[0] for n in head}
    common = os.path.commonprefix([m + "." for m in modules]).rsplit(".", 1)[0]
    try:
        model.get_submodule(common)
    except AttributeError:
        common = ""
    if not common or any(not (m == common or m.startswith(common + ".")) for m in modules):
        raise UserError(
            f"feature-extraction needs the new head to be one module; this model's head is spread over "
            f"{', '.join(sorted(modules))}: use strategy head-only"
        )
    return common


class Features:
    """Cached backbone features standing in for an encoded set: same `lengths`, `labels`, `subset`
    and `len()`; its batches are `{"features": ...}` for the head alone. With `load` instead of
    `features`, they are computed when first read (the test split: by the baselines or the final
    evaluation, not by the training stages)."""

    def __init__(self, features: torch.Tensor | None, labels: torch.Tensor | None, rows: int | None = None,
                 load: Callable[[], torch.Tensor] | None = None):
        self._features, self._load = features, load  # (N, D) float32, the input of the model's head
        self.labels = labels
        self.rows = rows if rows is not None else features.shape[0]
        self.truncated = 0

    @property
    def features(self) -> torch.Tensor:
        if self._features is None:
            self._features, self._load = self._load(), None
        return self._features

    @property
    def lengths(self) -> list[int]:
        return [1] * len(self)

    def __len__(self) -> int:
        return self.rows

    def subset(self, idx: list[int]) -> "Features":
        return Features(self.features[idx], self.labels[idx] if self.labels is not None else None)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = {"features": self.features[idx]}
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch


class _OnFeatures:
    """Mixed in before a task's class: batches come from cached features, the model is the head alone.
    Loss, metrics, baselines and everything else stay the task's own."""

    def collate(self, enc: Features, idx: list[int], train: bool = True) -> dict[str, torch.Tensor]:
        return enc.collate(idx)

    def weight(self, enc: Features, idx: list[int]) -> float:
        return float(len(idx))

    @torch.no_grad()
    def predict(self, model: nn.Module, enc: Features, acc: Any, rt: Any, features: bool = False) -> None:
        if rt.rank != 0:  # the head is cheap: one process computes every row (the merge sums over processes)
            return
        was_training = model.training
        model.eval()
        for i in range(0, len(enc), rt.batch_size):
            x = enc.features[i : i + rt.batch_size]
            rows = list(range(i, i + len(x)))
            acc.update(rows, model(features=x.to(rt.device)).logits.float().cpu().numpy(), x.numpy() if features else None)
        model.train(was_training)


_VIEWS: dict[type, type] = {}


def on_features(task: Any) -> Any:
    """The task as the loop sees it while the head trains on cached features (same state, same object
    for everything but batching and prediction)."""
    cls = type(task)
    if cls not in _VIEWS:
        _VIEWS[cls] = type(f"{cls.__name__}OnFeatures", (_OnFeatures, cls), {})
    view = object.__new__(_VIEWS[cls])
    view.__dict__ = task.__dict__  # shared, not copied: labels, tokenizer and config are the task's
    return view


class FeatureExtractionOptions(StrategyOptions):
    head: Literal["linear", "mlp"] = Field("linear", description="feature-extraction: the model's own linear head, or an MLP in its place.")
    head_hidden: int = Field(256, gt=0, description="feature-extraction with head: mlp: hidden units.")
    pooling: Literal["auto", "head", "mean"] = Field(
        "auto", description="feature-extraction: 'head' caches what the model's own head reads (plain HF export); 'mean' the mean of "
        "the last hidden states (sentence-transformers models); auto: mean when the model's pooling config says so."
    )
    cache_dir: str | None = Field(
        None, description="feature-extraction: where cached features live; default $TUNESMITH_CACHE or ~/.cache/tunesmith."
    )
    probe_start: bool = Field(
        True, description="feature-extraction: a linear head is the logistic regression best on validation (the linear probe among the "
        "candidates; under 200 validation rows, on 5-fold cross-validation over the training rows with them), fitted in closed form; "
        "no gradient steps follow. false: the head trains from a random start at optim.lr. "
        "(LP-FT's probe stage keeps the fit aside as the run's fallback.)"
    )


class FeatureExtraction(BaseStrategy):
    name = "feature-extraction"
    default_lr = 1e-2
    description = "frozen backbone run once, features cached on disk; only the head trains on them"
    Options = FeatureExtractionOptions
    trains_backbone = False
    needs_new_head = True
    guards = frozenset()
    no_guard_reason = "the pre-trained weights do not move, nothing can be forgotten"

    def __init__(self, config: Any = None):
        super().__init__(config)
        # "start": the head is the logistic-regression fit; "fallback" (LP-FT's probe stage): the fit is
        # kept aside in `fitted_head`, for the loop to fall back on if fine-tuning ends below it on validation
        self.probe_role = "start"
        self.fitted_head: tuple[torch.Tensor, torch.Tensor] | None = None
        self.use_cache = True  # False after a stage that changed the backbone (contrastive): features computed afresh
        # A linear head on fixed features is logistic regression: it wants a larger step than a head
        # trained through a backbone (MiniLM, 1,000 rows, 3 epochs: accuracy 0.664 at 1e-3, 0.741 at
        # 1e-2). An MLP head keeps 1e-3.
        if config is not None and config.head == "mlp":
            self.default_lr = 1e-3

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        model = parts.model
        self.head_name = _head_module(model, parts.head)
        head = model.get_submodule(self.head_name)
        pooling = self.config.pooling
        in_model = mean_pooled_in_model(model)
        if pooling == "auto":
            pooling = "mean" if in_model else sentence_transformers_pooling(Path(str(getattr(model, "name_or_path", "")))) or "head"
        self.pooling = pooling
        self.capture_head_input = pooling == "head" or in_model  # the head's own input is the mean already
        spec = None
        if pooling == "mean":  # a new head on mean-pooled hidden states, in place of the model's own
            n_out = model.config.num_labels
            spec = {"type": self.config.head, "pooling": "mean", "module": self.head_name,
                    "in_features": model.config.hidden_size, "hidden": self.config.head_hidden, "out_features": n_out}
        elif self.config.head == "mlp":
            if not isinstance(head, nn.Linear):
                raise UserError(
                    f"strategy.head: mlp replaces a linear head, but this model's head ({self.head_name}) is a "
                    f"{type(head).__name__}; use head: linear"
                )
            spec = {"type": "mlp", "module": self.head_name, "in_features": head.in_features,
                    "hidden": self.config.head_hidden, "out_features": head.out_features}
        if spec is not None:
            new = make_head(spec)
            for m in new.modules():  # the initialisation transformers gives classification heads
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=getattr(model.config, "initializer_range", 0.02))
                    nn.init.zeros_(m.bias)
            parent, _, child = self.head_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            model.config.tunesmith_head = {**(getattr(model.config, "tunesmith_head", None) or {}), **spec}
            parts.head = [f"{self.head_name}.{n}" for n, _ in new.named_parameters()]
        freeze(list(model.named_parameters()))
        head_params = parts.params(parts.head)
        unfreeze(head_params)
        return [ParamGroup("head", head_params)]

    @torch.no_grad()
    def _extract(self, model: nn.Module, task: Any, enc: Any, device: torch.device, amp: torch.dtype | None,
                 batch_size: int) -> torch.Tensor:
        from tunesmith.data.batching import make_batches

        head = model.get_submodule(self.head_name)
        captured: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
        model.eval()
        feats: torch.Tensor | None = None
        try:
            with linear_weights_cast(model, amp):  # bit for bit what per-batch casts give, once for the pass
                for b in make_batches(enc.lengths, batch_size, seed=0, epoch=0, shuffle=False):
                    batch = {k: v.to(device) for k, v in task.collate(enc, b, train=False).items() if k != "labels"}
                    captured.clear()
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        if not self.capture_head_input:  # the backbone alone; its own pooler and head are not used
                            hidden = model.base_model(**batch).last_hidden_state
                            captured.append(mean_pool(hidden.float(), batch["attention_mask"]))
                        else:
                            model(**batch)
                    x = captured[0]
                    if x.ndim == 3:
                        if self.first_token is None:  # does the head read only the first token itself?
                            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):  # its weights' dtype
                                self.first_token = bool(torch.allclose(head(x).float(), head(x[:, :1]).float(), atol=1e-5))
                            if not self.first_token:
                                raise UserError(
                                    "feature-extraction: this model's head uses the whole sequence, which is too large "
                                    "to cache; use strategy head-only"
                                )
                        x = x[:, 0]
                    else:
                        self.first_token = False
                    x = x.float().cpu()
                    if feats is None:
                        feats = torch.zeros(len(enc), x.shape[-1])
                    feats[b] = x
        finally:
            handle.remove()
        return feats if feats is not None else torch.zeros(0, 1)

    def training_view(self, task: Any, model: nn.Module, enc: dict[str, Any], rt: Any) -> TrainingView:
        """Features for every split, from the cache or from one backbone pass; the head to train on them."""
        root = cache_root(self.config.cache_dir) / "features"
        identity = model_identity(model)
        self.first_token: bool | None = None
        out: dict[str, Any] = {}
        info: dict[str, Any] = {"cache_dir": str(root)}
        for split, e in enc.items():
            load = functools.partial(self._features_for, split, e, model, task, rt, root, identity, info)
            # the test split is the baselines' and the final evaluation's: computed when they first read it
            out[split] = Features(None, e.labels, len(e), load) if split == "test" else Features(load(), e.labels)
        info["dim"] = int(out["train"].features.shape[-1])
        info["pooling"] = self.pooling
        head = model.get_submodule(self.head_name)
        return TrainingView(on_features(task), FeatureHead(head, bool(self.first_token)), out, info,
                            start=lambda: self._probe_start(task, head, out, rt))

    def _features_for(self, split: str, e: Any, model: nn.Module, task: Any, rt: Any, root: Path, identity: Any,
                      info: dict[str, Any]) -> torch.Tensor:
        """One split's features: from the disk cache, or one backbone pass (then cached); noted in `info`."""
        from safetensors.torch import load_file, save_file

        key = hashlib.sha256(
            json.dumps([CACHE_VERSION, identity, self.head_name, self.pooling, str(rt.amp), e.digest()]).encode()
        ).hexdigest()[:32]
        path = root / f"{key}.safetensors"
        t0 = time.perf_counter()
        if not self.use_cache:
            feats = self._extract(model, task, e, rt.device, rt.amp, rt.batch_size)
            cached = False
        elif path.exists():
            stored = load_file(str(path))
            feats, first = stored["features"], bool(stored["first_token"].item())
            self.first_token = first if self.first_token is None else self.first_token
            cached = True
        else:
            feats = self._extract(model, task, e, rt.device, rt.amp, rt.batch_size)
            root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"features": feats.contiguous(), "first_token": torch.tensor(bool(self.first_token))}, str(tmp))
            os.replace(tmp, path)  # written aside, then renamed: a killed run leaves no half-written cache
            cached = False
        seconds = time.perf_counter() - t0
        info[split] = {"rows": len(e), "cached": cached, "key": key, "seconds": seconds}
        rt.print(f"features: {split} {len(e)} rows ({self.pooling} pooling), {'read from cache' if cached else 'computed'} "
                 f"in {seconds:.1f} s" + (f" ({path})" if self.use_cache else " (not cached: the backbone was tuned)"))
        return feats

    @torch.no_grad()
    def _probe_start(self, task: Any, head: nn.Module, feats: dict[str, Features], rt: Any) -> dict[str, Any] | None:
        """The task's logistic-regression fit on the cached features: set as the head ("start") or kept aside in
        `fitted_head` ("fallback"); what it chose, or None where there is no fit."""
        if not (self.config.probe_start and isinstance(head, nn.Linear) and head.bias is not None
                and not self.first_token and "validation" in feats):
            return None
        t0 = time.perf_counter()
        fitted = task.probe_head(feats["train"], feats["validation"], rt.seed)
        if fitted is None:
            return None
        weight, bias, chosen = fitted
        chosen["seconds"] = round(time.perf_counter() - t0, 2)
        chosen["installed"] = self.probe_role == "start"
        chosen["starting_features"] = self.use_cache  # the starting model's features: the linear probe's fit is a candidate
        cv = chosen.get("chosen_by")
        what = (f"logistic regression (C {chosen['C']:g}{', balanced' if chosen['class_weight'] else ''}) on {chosen['rows']} rows"
                + (f", chosen on {cv['folds']}-fold cross-validation with the validation rows ({cv['rows']} rows)" if cv else "")
                + f", fitted in {chosen['seconds']:.1f} s")
        if chosen["installed"]:
            head.weight.copy_(weight.to(head.weight))
            head.bias.copy_(bias.to(head.bias))
            rt.print(f"head: {what}; the stage's result, no gradient steps (strategy.probe_start=false: train from a random start)")
        else:
            self.fitted_head = (weight, bias)
            rt.print(f"head: {what}, kept aside in case fine-tuning ends below it on validation")
        return chosen
