"""`contrastive`: SetFit's recipe for sentence encoders at the few-shot end (8-64 rows per class).

Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts" (SetFit): first fine-tune the
body contrastively on pairs of training rows (same label: cosine similarity 1, different: 0, a
mean-squared-error loss on the cosine of their mean-pooled embeddings), then fit a classifier
head on the tuned embeddings. Pairs multiply the signal of a few labelled rows: 16 rows per class
give thousands of pairs.

Here it is two stages of the one loop:

1. `contrastive pairs`: every backbone weight trains on pairs (`pairs_per_row` positive and as many
   negative partners per row, SetFit's `num_iterations`; at most `max_pairs`; where the loss is
   class-weighted, rows of the smaller classes anchor again until every class anchors as many pairs as
   the largest), at 2e-5 (SetFit's
   body rate), 16 pairs a step (`pair_batch_size`, SetFit's batch size), for `body_epochs` passes
   (SetFit's 1). Validation fits a logistic regression on the training rows' embeddings and scores
   the validation rows: what the second stage will get, so the best body is kept by that;
2. `head`: `feature-extraction` with mean pooling on the tuned body (features computed afresh, not
   from the cache: the body changed), the model's own head trained on them.

The export is the usual one: the tuned body and its head (mean pooling recorded; `tunesmith.load`
predicts with it). Measured in docs/strategies.md: above feature-extraction on 4 of 5 few-shot
proxies under 100 rows (14 to 29 training rows a class; the fifth within a seed's spread), below it
at 7 a class, and not consistently above full fine-tuning from 100 rows. So `auto` chooses it where
it would take feature-extraction, for a sentence encoder with 10 or more training rows in every class.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from tunesmith.errors import UserError
from tunesmith.models.heads import mean_pool
from tunesmith.precision import linear_weights_cast
from tunesmith.strategies.base import BaseStrategy, ModelParts, ParamGroup, Stage, StrategyOptions, TrainingView, freeze, unfreeze


class ContrastiveOptions(StrategyOptions):
    pairs_per_row: int = Field(
        20, gt=0, description="contrastive: positive and negative partners drawn per training row (SetFit's num_iterations)."
    )
    max_pairs: int = Field(10000, gt=0, description="contrastive: at most this many pairs (fewer partners per row on larger data).")
    pair_batch_size: int = Field(
        16, gt=0, description="contrastive: pairs a step in the pair stage (SetFit's batch_size, 16: 32 texts); optim.batch_size "
        "does not apply to pairs. Measured against 32 in docs/strategies.md."
    )
    body_epochs: int = Field(
        1, gt=0, description="contrastive: passes over the pairs (SetFit's num_epochs, 1); optim.min_steps does not raise it: "
        "the pairs are many already, and more passes overfit the few rows they come from."
    )


class PairSet:
    """Pairs of rows of an encoded set and their target similarity (1 same label, 0 different)."""

    def __init__(self, base: Any, a: np.ndarray, b: np.ndarray, target: np.ndarray):
        self.base, self.a, self.b, self.target = base, a, b, target
        self.labels = None  # pairs have targets, not class labels
        self.truncated = 0
        base_lengths = base.lengths
        self._lengths = [base_lengths[i] + base_lengths[j] for i, j in zip(a.tolist(), b.tolist())]

    @property
    def lengths(self) -> list[int]:
        return self._lengths

    def __len__(self) -> int:
        return len(self.a)

    @classmethod
    def draw(cls, base: Any, per_row: int, max_pairs: int, seed: int, balanced: bool = False) -> "PairSet":
        """SetFit's pair generation: for each row, a random row of its label and one of another label, per round.
        `balanced` (where the task weighs its loss by class): rows of the smaller classes anchor pairs again, in
        turn, until every class anchors as many as the largest, so a rare class's rows are not drawn together
        a sixth as often as the common class's (measured in docs/strategies.md, imbalanced few-shot sets)."""
        labels = base.labels
        keys = [tuple(row.tolist()) for row in labels] if labels.ndim == 2 else labels.tolist()
        by_label: dict[Any, list[int]] = {}
        for i, k in enumerate(keys):
            by_label.setdefault(k, []).append(i)
        if len(by_label) < 2:
            raise UserError("strategy contrastive needs at least 2 labels in the training data")
        rng = random.Random(seed)
        largest = max(len(rows) for rows in by_label.values()) if balanced else 0
        anchors = list(range(len(keys))) + [rows[n % len(rows)] for rows in by_label.values() for n in range(largest - len(rows))]
        rounds = max(1, min(per_row, max_pairs // (2 * len(anchors))))
        everyone = list(range(len(keys)))
        a, b, t = [], [], []
        for _ in range(rounds):
            for i in anchors:
                k = keys[i]
                same = by_label[k]
                j = rng.choice(same) if len(same) > 1 else i
                while len(same) > 1 and j == i:
                    j = rng.choice(same)
                other = rng.choice(everyone)
                while keys[other] == k:
                    other = rng.choice(everyone)
                a += [i, i]
                b += [j, other]
                t += [1.0, 0.0]
        return cls(base, np.asarray(a), np.asarray(b), np.asarray(t, dtype=np.float32))


class PairTask:
    """The task as the loop sees it in the pair stage: batches are pairs, the loss is SetFit's, validation
    is a logistic regression on the tuned embeddings. Anything else is the task's own."""

    def __init__(self, task: Any, enc: dict[str, Any]):
        self._task, self._enc = task, enc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def collate(self, enc: PairSet, idx: list[int], train: bool = True) -> dict[str, torch.Tensor]:
        rows = [int(enc.a[i]) for i in idx] + [int(enc.b[i]) for i in idx]
        batch = self._task.collate(enc.base, rows, train=train)
        batch.pop("labels", None)
        batch["pair_target"] = torch.as_tensor(enc.target[idx])
        return batch

    def weight(self, enc: PairSet, idx: list[int]) -> float:
        return float(len(idx))

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = batch.pop("pair_target")
        emb = embed(model, batch)
        ea, eb = emb[: len(target)], emb[len(target) :]
        cos = nn.functional.cosine_similarity(ea, eb, dim=-1)
        return {"loss": nn.functional.mse_loss(cos, target.to(cos.dtype))}

    @torch.no_grad()
    def _embeddings(self, model: nn.Module, enc: Any, rt: Any) -> np.ndarray:
        from tunesmith.data.batching import make_batches

        was = model.training
        model.eval()
        out = np.zeros((len(enc), 0), dtype=np.float32)
        with linear_weights_cast(model, rt.amp):
            for b in make_batches(enc.lengths, rt.batch_size, seed=0, epoch=0, shuffle=False):
                batch = {k: v.to(rt.device) for k, v in self._task.collate(enc, b, train=False).items() if k != "labels"}
                with torch.autocast(rt.device.type, dtype=rt.amp, enabled=rt.amp is not None):
                    e = embed(model, batch).float().cpu().numpy()
                if out.shape[1] == 0:
                    out = np.zeros((len(enc), e.shape[1]), dtype=np.float32)
                out[b] = e
        model.train(was)
        return out

    def evaluate(self, model: nn.Module, enc: Any, rt: Any, features: bool = False) -> tuple[dict[str, Any], None]:
        """What the head stage will reach: logistic regression on the training rows' embeddings, scored on `enc`."""
        from tunesmith.metrics import linear_probe

        train = self._enc["train"]
        x_train, x = self._embeddings(model, train, rt), self._embeddings(model, enc, rt)
        (m,) = linear_probe(x_train, train.labels.numpy(), [(x, enc.labels.numpy())], self._task.labels,
                            self._task.multi_label, rt.seed)
        return m, None

    def baseline(self, model: nn.Module, enc: dict[str, Any], rt: Any) -> dict[str, Any]:
        return self._task.baseline(model, self._enc, rt)  # the starting model and the linear probe, as for any strategy


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean of the last hidden states over real tokens: SetFit's (and sentence-transformers') embedding."""
    hidden = model.base_model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
    return mean_pool(hidden, batch["attention_mask"])


class Contrastive(BaseStrategy):
    name = "contrastive"
    default_lr = 2e-5  # SetFit's body rate
    description = "SetFit: the body trained on pairs of rows (same label or not), then a head on its embeddings; few-shot text"
    Options = ContrastiveOptions
    trains_backbone = True
    needs_new_head = True
    guards = frozenset({"l2sp"})
    no_guard_reason = "replay rows have labels but no pairs"

    def stages(self, task: Any) -> list[Stage]:
        from tunesmith.registry import STRATEGIES

        probe = STRATEGIES.get("feature-extraction")
        options = type(self.config).model_validate({"name": "feature-extraction", "pooling": "mean"})
        head = probe(options)
        head.use_cache = False  # the body was just tuned: its features are new
        return [Stage(self, epochs=self.config.body_epochs, batch_size=self.config.pair_batch_size, role="contrastive pairs"),
                Stage(head, lr=probe.default_lr, role="head on the tuned embeddings", compare_previous=False)]

    def apply(self, parts: ModelParts) -> list[ParamGroup]:
        named = list(parts.model.named_parameters())
        head = set(parts.head)
        freeze([(n, p) for n, p in named if n in head])
        body = [(n, p) for n, p in named if n not in head]
        unfreeze(body)
        return [ParamGroup("backbone", body)]

    def training_view(self, task: Any, model: nn.Module, enc: dict[str, Any], rt: Any) -> TrainingView:
        if not hasattr(model, "base_model") or enc["train"].labels is None:
            raise UserError("strategy contrastive applies to text classifiers (a transformer body with a head)")
        balanced = getattr(task, "class_weight", None) is not None
        pairs = PairSet.draw(enc["train"], self.config.pairs_per_row, self.config.max_pairs, rt.seed, balanced)
        rt.print(f"contrastive: {len(pairs):,} pairs from {len(enc['train']):,} rows "
                 f"({int(pairs.target.sum()):,} same label, {int(len(pairs) - pairs.target.sum()):,} different"
                 + ("; every class anchors as many as the largest: the loss is class-weighted" if balanced else "") + ")")
        view = {"train": pairs, "validation": enc["validation"], "test": enc["test"]}
        return TrainingView(PairTask(task, enc), model, view)
