"""Classification metrics: accuracy, macro/micro F1, per-class table, confusion matrix, loss."""

from __future__ import annotations

from typing import Any

import numpy as np


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b with 0 where b == 0 (scikit-learn's zero_division=0)."""
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b != 0)


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp, fp, fn = (x.astype(np.float64) for x in (tp, fp, fn))
    return _div(tp, tp + fp), _div(tp, tp + fn), _div(2 * tp, 2 * tp + fp + fn)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, names: list[str], multi_label: bool) -> dict[str, Any]:
    """Plain NumPy (no scikit-learn import on the hot path: it costs ~50 MB of resident memory)."""
    k = len(names)
    logits = np.asarray(logits, dtype=np.float64)
    if multi_label:
        y = labels.astype(int)
        pred = (logits > 0).astype(int)
        p = 1 / (1 + np.exp(-logits))
        eps = 1e-12
        loss = float(-(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)).mean())
        tp, fp, fn = (pred & y).sum(0), (pred & (1 - y)).sum(0), ((1 - pred) & y).sum(0)
        prec, rec, f1 = _prf(tp, fp, fn)
        support = y.sum(0)
        micro = _prf(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))[2][0]
        out: dict[str, Any] = {
            "accuracy": float((pred == y).all(axis=1).mean()),  # exact match (subset accuracy)
            "macro_f1": float(f1.mean()),
            "micro_f1": float(micro),
            "loss": loss,
        }
    else:
        y = labels.astype(int)
        pred = logits.argmax(axis=1)
        probs = _softmax(logits)
        loss = float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean())
        cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)  # rows: true, columns: predicted
        tp = np.diag(cm)
        prec, rec, f1 = _prf(tp, cm.sum(0) - tp, cm.sum(1) - tp)
        support = cm.sum(1)
        out = {
            "accuracy": float((pred == y).mean()),
            "macro_f1": float(f1.mean()),
            "micro_f1": float((pred == y).mean()),  # equals accuracy for single-label over all classes
            "loss": loss,
            "confusion_matrix": cm.tolist(),
        }
    out["per_class"] = {
        name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(names)
    }
    out["n"] = int(len(labels))
    return out


ABSENT_LOGIT = -1e4  # a class with no training rows: never predicted (finite, so it is representable in a bf16 head too)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, n_labels: int, multi_label: bool, seed: int = 0, c: float = 1.0,
              balanced: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression (scikit-learn, lbfgs) on standardized features, returned as the weight (K, D) and
    bias (K,) of one linear layer on the raw features: the standardization folded in, a binary model's one
    score split as (-s/2, s/2) (softmax of that is the model's sigmoid), classes without rows at ABSENT_LOGIT."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    scaler = StandardScaler().fit(train_x)
    tx = scaler.transform(train_x)
    clf = LogisticRegression(max_iter=2000, C=c, random_state=seed, class_weight="balanced" if balanced else None)
    # one BLAS thread: lbfgs's products are small (rows x hundreds of features), and OpenBLAS's threads beside
    # torch's made each fit 3-16x slower on 2 cores (docs/benchmarks.md, "Time to accuracy")
    with threadpool_limits(1, user_api="blas"):
        if multi_label:
            ovr = OneVsRestClassifier(clf).fit(tx, train_y.astype(int))
        else:
            clf.fit(tx, train_y)
    if multi_label:
        coef = np.concatenate([e.coef_ for e in ovr.estimators_])
        intercept = np.concatenate([e.intercept_ for e in ovr.estimators_])
    else:
        present = clf.classes_.astype(int)
        coef, intercept = clf.coef_, clf.intercept_
        if coef.shape[0] == 1:  # binary: one score for the second class
            coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
        full_w, full_b = np.zeros((n_labels, tx.shape[1])), np.full(n_labels, ABSENT_LOGIT)
        full_w[present], full_b[present] = coef, intercept
        coef, intercept = full_w, full_b
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    return weight, bias


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, evaluate_on: list[tuple[np.ndarray, np.ndarray]],
    names: list[str], multi_label: bool, seed: int = 0,
) -> list[dict[str, Any]]:
    """Logistic regression on frozen features: what the pre-trained representation gives for free.
    Fitted once on the training features; metrics on each (features, labels) set of `evaluate_on`."""
    weight, bias = fit_probe(train_x, train_y, len(names), multi_label, seed)
    return [classification_metrics(np.asarray(x, dtype=np.float64) @ weight.T + bias, y, names, multi_label) for x, y in evaluate_on]
