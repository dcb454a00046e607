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


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, evaluate_on: list[tuple[np.ndarray, np.ndarray]],
    names: list[str], multi_label: bool, seed: int = 0,
) -> list[dict[str, Any]]:
    """Logistic regression on frozen features: what the pre-trained representation gives for free.
    Fitted once on the training features; metrics on each (features, labels) set of `evaluate_on`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    tx = scaler.transform(train_x)
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    present = np.unique(train_y)
    clf = OneVsRestClassifier(clf).fit(tx, train_y.astype(int)) if multi_label else clf.fit(tx, train_y)
    out = []
    for x, y in evaluate_on:
        vx = scaler.transform(x)
        if multi_label:
            logits = clf.decision_function(vx)
        else:
            scores = clf.decision_function(vx)
            if scores.ndim == 1:  # binary: sklearn returns one score for the positive class
                scores = np.stack([-scores / 2, scores / 2], axis=1)
            logits = np.full((len(vx), len(names)), -1e9)
            logits[:, present] = scores
        out.append(classification_metrics(np.asarray(logits), y, names, multi_label))
    return out
