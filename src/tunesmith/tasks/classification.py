"""What text and image classification share: metrics, the evaluation accumulator, the linear probe.

The linear probe (logistic regression on the starting model's frozen, pooled features) is the
baseline a fine-tuned classifier must beat; it is measured on the same test rows as `before`
and `after`, from the same evaluation pass as `before`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from tunesmith.tasks.base import Accumulator, Runtime, Task

PROBE_MAX_ROWS = 4000  # the linear-probe baseline fits on at most this many training rows
PROBE_START_MAX_ROWS = 20000  # the logistic-regression head fits on at most this many training rows
PROBE_START_C = (1.0, 0.1, 0.01)  # inverse regularization strengths tried for it (1.0 first: the linear probe's own)
PROBE_CV_BELOW = 200  # under this many validation rows, its C and class weighting are chosen on k-fold
# cross-validation predictions over the training rows too, not on the validation rows alone
PROBE_CV_FOLDS = 5
WEIGH_FROM = 3.0  # class_weights: auto weighs the loss when the largest class has this many times the smallest's rows
GUARD_FEW_ROWS = 50  # the guard's advice: below this many validation rows, a comparison is mostly noise


class ClassificationTask(Task):
    metrics_better: ClassVar[dict[str, str]] = {"accuracy": "max", "macro_f1": "max", "micro_f1": "max", "loss": "min"}
    head_lr: ClassVar[float | None] = 1e-3
    class_weight: torch.Tensor | None = None  # per-class loss weights (train.class_weights), or None
    class_weight_note: str = ""

    # -- class imbalance ----------------------------------------------------------------------
    def set_class_weights(self, train_labels: list[Any]) -> None:
        """Per-class loss weights n / (k * n_c) (scikit-learn's 'balanced'), when train.class_weights asks."""
        self.class_weight, self.class_weight_note = None, ""
        mode = self.config.train.class_weights
        if self.multi_label or mode == "none" or not self.labels:
            return
        counts = Counter(train_labels)
        rows = [counts.get(label, 0) for label in self.labels]
        ratio = max(rows) / max(min(rows), 1)
        if mode == "auto" and ratio < WEIGH_FROM:
            return
        n = sum(rows)
        self.class_weight = torch.tensor([n / (len(rows) * max(r, 1)) for r in rows], dtype=torch.float32)
        why = f"largest class {ratio:.1f}x the smallest" + (f" (>= {WEIGH_FROM:g}: train.class_weights=auto)" if mode == "auto" else "")
        self.class_weight_note = (f"class weights: balanced, {why}: "
                                  + ", ".join(f"{l} {w:.2f}" for l, w in zip(self.labels[:8], self.class_weight.tolist()))
                                  + (" ..." if len(self.labels) > 8 else ""))

    def smallest_class(self, train: Any) -> int | None:
        """Training rows of the rarest class that has any (a multi-label row counts for each of its labels)."""
        rows = [l for r in train.labels for l in (r if self.multi_label else [r])]
        return min(Counter(rows).values()) if rows else None

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, **kw: Any) -> torch.Tensor:
        weight = self.class_weight.to(logits.device) if self.class_weight is not None else None
        return nn.functional.cross_entropy(logits.float(), labels, weight=weight, **kw)

    def describe(self, enc: dict[str, Any]) -> list[str]:
        return super().describe(enc) + ([self.class_weight_note] if self.class_weight_note else [])

    def metrics(self, logits: np.ndarray, labels: torch.Tensor) -> dict[str, Any]:
        from tunesmith.metrics import classification_metrics

        return classification_metrics(logits, labels.numpy(), self.labels, self.multi_label)

    def accumulator(self, enc: Any) -> Accumulator:
        return Accumulator(len(enc), len(self.labels), lambda logits: self.metrics(logits, enc.labels))

    def baseline(self, model: nn.Module, enc: dict[str, Any], rt: Runtime) -> dict[str, Any]:
        """The starting model (its new head) on test and, from the same pass, the linear probe; both on
        validation too, where the guard after training compares them with the fine-tuned model."""
        probe = self.config.eval.linear_probe
        before, test_feats = self.evaluate(model, enc["test"], rt, features=probe)
        start_val, val_feats = self.evaluate(model, enc["validation"], rt, features=probe)
        out: dict[str, Any] = {"before": before, "baseline_validation": {"before": _scalars(start_val)}}
        if probe:
            out["linear_probe"] = self.linear_probe(model, enc["train"], (test_feats, enc["test"]), (val_feats, enc["validation"]), rt)
            out["baseline_validation"]["linear_probe"] = out["linear_probe"].pop("validation")
        return out

    def linear_probe(self, model: nn.Module, train: Any, test: tuple[np.ndarray, Any], validation: tuple[np.ndarray, Any],
                     rt: Runtime) -> dict[str, Any]:
        from tunesmith.metrics import linear_probe

        sub = list(range(len(train)))
        if len(sub) > PROBE_MAX_ROWS:
            sub = sorted(np.random.default_rng(rt.seed).choice(len(sub), PROBE_MAX_ROWS, replace=False).tolist())
        train_sub = train.subset(sub)
        _, train_feats = self.evaluate(model, train_sub, rt.alone(), features=True)  # every process fits the same probe
        (m, m_val) = linear_probe(train_feats, train_sub.labels.numpy(), [(x, s.labels.numpy()) for x, s in (test, validation)],
                                  self.labels, self.multi_label, rt.seed)
        m["train_rows"] = len(sub)
        m["validation"] = _scalars(m_val)
        return m

    def probe_head(self, train: Any, validation: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
        """A linear head fitted on frozen features (`.features`, `.labels`): logistic regression for each
        C in PROBE_START_C (and with balanced class weights too where the loss is weighted), the one best by
        train.metric, as (weight, bias, what was chosen). This is LP-FT's probe stage as Kumar et al. (ICLR 2022)
        fit it, and the linear-probe baseline among the candidates.

        Under PROBE_CV_BELOW validation rows the choice is scored on the validation rows together with k-fold
        cross-validation predictions for every training row (stratified, k = PROBE_CV_FOLDS or the smallest
        class's row count; scikit-learn's LogisticRegressionCV idea): with 2-3 validation rows a class, the
        validation rows alone tie or pick by one prediction. The head is always fitted on all training rows;
        the score kept under train.metric is the validation rows' alone. `best_on_validation` is the best of every
        fit's validation score: LP-FT's fallback is weighed against fine-tuning by it, as before the choice of fit
        was cross-validated (measured: docs/strategies.md)."""
        from tunesmith.metrics import fit_probe

        if train.labels is None or validation.labels is None or len(validation) == 0 or len(train) < 2:
            return None
        x, y = train.features.numpy(), train.labels.numpy()
        if len(x) > PROBE_START_MAX_ROWS:
            keep = np.sort(np.random.default_rng(seed).choice(len(x), PROBE_START_MAX_ROWS, replace=False))
            x, y = x[keep], y[keep]
        if not self.multi_label and len(np.unique(y)) < 2:
            return None
        metric, vx, vy = self.config.train.metric, validation.features.numpy().astype(np.float64), validation.labels
        folds = self.probe_folds(y, seed) if len(vy) < PROBE_CV_BELOW else []
        pooled_y = torch.cat([torch.as_tensor(y[np.concatenate([t for _, t in folds])]), vy]) if folds else vy
        best: tuple[Any, ...] | None = None
        probe_score = best_val = None
        for balanced in (False, True) if self.class_weight is not None else (False,):
            for c in PROBE_START_C:
                w, b = fit_probe(x, y, len(self.labels), self.multi_label, seed, c, balanced)
                val_logits = vx @ w.T + b
                oof = [x[te] @ fw.T + fb for tr, te in folds
                       for fw, fb in [fit_probe(x[tr], y[tr], len(self.labels), self.multi_label, seed, c, balanced)]]
                score = self.metrics(np.concatenate([*oof, val_logits]), pooled_y)[metric]
                own = self.metrics(val_logits, vy)[metric]
                best_val = own if best_val is None or self.better(metric, own, best_val) else best_val
                probe_score = score if probe_score is None else probe_score  # the first candidate is the linear probe's fit
                if best is None or self.better(metric, score, best[0]):
                    best = (score, w, b, c, balanced, own)
        score, w, b, c, balanced, val_score = best
        info = {"C": c, "class_weight": "balanced" if balanced else None, "rows": len(x), metric: val_score,
                "best_on_validation": best_val}
        if folds:
            info["chosen_by"] = {"folds": len(folds), "rows": len(pooled_y), metric: score, "linear_probe": probe_score}
        return torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), info

    def probe_folds(self, y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Stratified folds of the training rows for probe_head's choice, or [] where they cannot be made (a
        multi-label task; a class with one row: a fold's training rows must hold every class)."""
        from sklearn.model_selection import StratifiedKFold

        if self.multi_label:
            return []
        counts = np.bincount(y.astype(int))
        k = min(PROBE_CV_FOLDS, int(counts[counts > 0].min()))
        if k < 2:
            return []
        return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))

    def final(self, model: nn.Module, enc: dict[str, Any], rt: Runtime, ev: dict[str, Any]) -> dict[str, Any]:
        test = enc["test"]
        acc = self.accumulator(test)
        self.predict(model, test, acc, rt)
        acc.merge(rt.gather)
        out: dict[str, Any] = {"after": acc.compute()}
        if not self.multi_label and test.labels is not None:
            out["mistakes"] = self.mistakes(acc.rows, test.labels.numpy())
        guard = self.guard(ev, len(enc["validation"]))
        if guard is not None:
            out["guard"] = guard
            if guard["worse"]:
                rt.print(f"[yellow]warning: {guard['message']}[/yellow]")
        return out

    def mistakes(self, logits: np.ndarray, labels: np.ndarray, k: int = 16) -> list[dict[str, Any]]:
        """The `k` test rows predicted wrong with the highest confidence (report.html shows them)."""
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        pred, conf = p.argmax(axis=1), p.max(axis=1)
        wrong = np.nonzero(pred != labels)[0]
        top = wrong[np.argsort(-conf[wrong], kind="stable")][:k]
        return [{**self.example(int(i)), "label": self.labels[int(labels[i])], "predicted": self.labels[int(pred[i])],
                 "confidence": float(conf[i])} for i in top]

    def example(self, i: int) -> dict[str, Any]:
        """Row `i` of the test set as a report shows it: `where`, and `text` or `image` (a path)."""
        return {"where": f"test row {i + 1}"}

    def guard(self, ev: dict[str, Any], n_validation: int | None = None) -> dict[str, Any] | None:
        """Is the fine-tuned model (its best validation score) worse than the better of the starting model and
        the linear probe, on validation? The choice is made on validation, never on the test set."""
        metric, tuned = self.config.train.metric, (ev.get("validation_best") or {})
        baselines = {k: v[metric] for k, v in (ev.get("baseline_validation") or {}).items() if metric in v}
        start = (ev.get("features") or {}).get("probe_start") or {}
        # the model's head is the fit on the starting model's features (feature-extraction's; LP-FT's fallback, kept)
        cv = start.get("chosen_by") if start.get("installed") and start.get("starting_features") else None
        if cv and "linear_probe" in baselines:
            # the head is the regression chosen over the linear probe's own fit on cross-validation with the validation
            # rows (probe_head): on more rows than validation's alone, so that comparison is already made there
            baselines.pop("linear_probe")
        if metric not in tuned or not baselines:
            return None
        best_name = max(baselines, key=lambda k: baselines[k]) if self.metrics_better[metric] == "max" else min(baselines, key=baselines.get)
        best = baselines[best_name]
        worse = self.better(metric, best, tuned[metric]) and best != tuned[metric]
        shown = {"before": "the starting model (its new, random head)", "linear_probe": "the linear probe"}[best_name]
        rows = f" on {n_validation} validation rows" if n_validation else ""
        if n_validation is not None and n_validation < GUARD_FEW_ROWS:
            advice = f"with under {GUARD_FEW_ROWS} validation rows one or two predictions decide this: give data.validation more rows"
        else:
            tips = [] if self.config.strategy.name == "feature-extraction" else [
                "strategy feature-extraction (its head is the linear probe's logistic regression)"]
            advice = "try " + ", ".join(tips + ["more steps (optim.min_steps)", "another learning rate (tunesmith lr-find)"])
        message = (f"the fine-tuned model is worse on validation than {shown}: {metric} {tuned[metric]:.4f} against "
                   f"{best:.4f}{rows}; {advice}") if worse else ""
        out = {"metric": metric, "tuned": tuned[metric], "baselines": baselines, "best_baseline": best_name,
               "worse": worse, "validation_rows": n_validation, "message": message}
        if cv:
            out["linear_probe_cross_validated"] = {"tuned": cv[metric], "linear_probe": cv["linear_probe"], "rows": cv["rows"]}
        return out

    def summary(self, ev: dict[str, Any]) -> list[Any]:
        from tunesmith.report import per_class_table

        return [per_class_table(ev["after"])] if self.labels and len(self.labels) <= 30 else []


def _scalars(m: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in m.items() if isinstance(v, float)}
