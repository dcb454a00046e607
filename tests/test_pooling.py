"""feature-extraction on a sentence-transformers model: mean pooling, saved and reloaded."""

import json
import shutil

import numpy as np
import pytest

import tunesmith


@pytest.fixture
def st_model_dir(tiny_model_dir, tmp_path):
    """The tiny BERT plus a sentence-transformers pooling config that says mean tokens."""
    d = tmp_path / "st-model"
    shutil.copytree(tiny_model_dir, d)
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    return d


@pytest.mark.parametrize("pooling, head", [("auto", "linear"), ("auto", "mlp"), ("head", "linear")])
def test_mean_pooled_head_trains_saves_and_reloads(make_config, st_model_dir, data_dir, pooling, head):
    from tunesmith.metrics import classification_metrics

    res = tunesmith.train(make_config(model=str(st_model_dir), optim={"epochs": 20, "lr": 1e-2},
                                      strategy={"name": "feature-extraction", "pooling": pooling, "head": head}), quiet=True)
    expected = "mean" if pooling == "auto" else "head"
    assert res.eval["features"]["pooling"] == expected
    config = json.loads((res.run_dir / "model" / "config.json").read_text())
    assert (config.get("tunesmith_head") or {}).get("pooling") == ("mean" if expected == "mean" else None)
    rows = [l.split(",") for l in (data_dir / "test.csv").read_text().splitlines()[1:]]
    clf = tunesmith.load(res.run_dir)
    y = np.array([clf.labels.index(l) for _, l in rows])
    m = classification_metrics(clf.logits([t for t, _ in rows]), y, clf.labels, False)
    assert m["loss"] == pytest.approx(res.eval["after"]["loss"], abs=1e-5)
    if expected == "mean":  # mean-pooled word features separate the synthetic classes
        assert res.eval["after"]["accuracy"] >= 0.7


def test_pooling_only_with_feature_extraction():
    from tunesmith.config import load_config
    from tunesmith.errors import UserError

    with pytest.raises(UserError, match="strategy.pooling applies to strategy 'feature-extraction', not 'full'"):
        load_config({"task": "text-classification", "model": "m", "data": {"train": "t.csv"},
                     "strategy": {"name": "full", "pooling": "mean"}})
