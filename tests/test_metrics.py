import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from tunesmith.metrics import classification_metrics


@pytest.mark.parametrize("seed", range(5))
def test_single_label_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    k = 4
    y = rng.integers(0, k - 1, 60)  # class 3 never occurs: zero-division cases
    logits = rng.normal(size=(60, k))
    m = classification_metrics(logits, y, ["a", "b", "c", "d"], False)
    pred = logits.argmax(1)
    labels = list(range(k))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, labels=labels, average="micro", zero_division=0))
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=labels).tolist()
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    assert [c["precision"] for c in m["per_class"].values()] == pytest.approx(p.tolist())
    assert [c["recall"] for c in m["per_class"].values()] == pytest.approx(r.tolist())
    assert [c["support"] for c in m["per_class"].values()] == s.tolist()


def test_multi_label_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 3))
    logits = rng.normal(size=(50, 3))
    m = classification_metrics(logits, y, ["a", "b", "c"], True)
    pred = (logits > 0).astype(int)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))
    assert m["accuracy"] == pytest.approx((pred == y).all(1).mean())
