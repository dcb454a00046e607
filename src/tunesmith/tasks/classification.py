"""What text and image classification share: metrics, the evaluation accumulator, the linear probe.

The linear probe (logistic regression on the starting model's frozen, pooled features) is the
baseline a fine-tuned classifier must beat; it is measured on the same test rows as `before`
and `after`, from the same evaluation pass as `before`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from tunesmith.tasks.base import Accumulator, Runtime, Task

PROBE_MAX_ROWS = 4000  # the linear-probe baseline fits on at most this many training rows


class ClassificationTask(Task):
    metrics_better: ClassVar[dict[str, str]] = {"accuracy": "max", "macro_f1": "max", "micro_f1": "max", "loss": "min"}

    def metrics(self, logits: np.ndarray, labels: torch.Tensor) -> dict[str, Any]:
        from tunesmith.metrics import classification_metrics

        return classification_metrics(logits, labels.numpy(), self.labels, self.multi_label)

    def accumulator(self, enc: Any) -> Accumulator:
        return Accumulator(len(enc), len(self.labels), lambda logits: self.metrics(logits, enc.labels))

    def baseline(self, model: nn.Module, enc: dict[str, Any], rt: Runtime) -> dict[str, Any]:
        """The starting model (its new head) on test and, from the same pass, the linear probe."""
        probe = self.config.eval.linear_probe
        before, test_feats = self.evaluate(model, enc["test"], rt, features=probe)
        out: dict[str, Any] = {"before": before}
        if probe:
            out["linear_probe"] = self.linear_probe(model, enc["train"], enc["test"], test_feats, rt)
        return out

    def linear_probe(self, model: nn.Module, train: Any, test: Any, test_feats: np.ndarray, rt: Runtime) -> dict[str, Any]:
        from tunesmith.metrics import linear_probe

        sub = list(range(len(train)))
        if len(sub) > PROBE_MAX_ROWS:
            sub = sorted(np.random.default_rng(rt.seed).choice(len(sub), PROBE_MAX_ROWS, replace=False).tolist())
        train_sub = train.subset(sub)
        _, train_feats = self.evaluate(model, train_sub, rt.alone(), features=True)  # every process fits the same probe
        m = linear_probe(train_feats, train_sub.labels.numpy(), test_feats, test.labels.numpy(),
                         self.labels, self.multi_label, rt.seed)
        m["train_rows"] = len(sub)
        return m

    def summary(self, ev: dict[str, Any]) -> list[Any]:
        from tunesmith.report import per_class_table

        return [per_class_table(ev["after"])] if self.labels and len(self.labels) <= 30 else []
