"""Classification metrics: accuracy, macro/micro F1, per-class table, confusion matrix, loss."""

from __future__ import annotations

from typing import Any

import numpy as np


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, names: list[str], multi_label: bool) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    k = len(names)
    if multi_label:
        pred = (logits > 0).astype(int)
        y = labels.astype(int)
        p = 1 / (1 + np.exp(-logits.astype(np.float64)))
        eps = 1e-12
        loss = float(-(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)).mean())
        accuracy = float((pred == y).all(axis=1).mean())  # exact match (subset accuracy)
        prec, rec, f1, sup = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
        out: dict[str, Any] = {
            "accuracy": accuracy,
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
            "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
            "loss": loss,
        }
    else:
        pred = logits.argmax(axis=1)
        y = labels.astype(int)
        probs = _softmax(logits.astype(np.float64))
        loss = float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean())
        prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=list(range(k)), average=None, zero_division=0)
        out = {
            "accuracy": float((pred == y).mean()),
            "macro_f1": float(f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=0)),
            "micro_f1": float(f1_score(y, pred, labels=list(range(k)), average="micro", zero_division=0)),
            "loss": loss,
            "confusion_matrix": confusion_matrix(y, pred, labels=list(range(k))).tolist(),
        }
    out["per_class"] = {
        name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(sup[i])}
        for i, name in enumerate(names)
    }
    out["n"] = int(len(labels))
    return out


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
    names: list[str], multi_label: bool, seed: int = 0,
) -> dict[str, Any]:
    """Logistic regression on frozen features: what the pre-trained representation gives for free."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    tx, vx = scaler.transform(train_x), scaler.transform(test_x)
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    if multi_label:
        clf = OneVsRestClassifier(clf).fit(tx, train_y.astype(int))
        logits = clf.decision_function(vx)
    else:
        present = np.unique(train_y)
        clf.fit(tx, train_y)
        scores = clf.decision_function(vx)
        if scores.ndim == 1:  # binary: sklearn returns one score for the positive class
            scores = np.stack([-scores / 2, scores / 2], axis=1)
        logits = np.full((len(vx), len(names)), -1e9)
        logits[:, present] = scores
    return classification_metrics(np.asarray(logits), test_y, names, multi_label)
