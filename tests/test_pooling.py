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


@pytest.mark.parametrize("strategy", [{"name": "full"}, {"name": "lora"}])
def test_every_strategy_classifies_from_the_mean_token_and_plain_transformers_loads_it(make_config, st_model_dir, data_dir, strategy):
    """A sentence-transformers model's classifier reads the masked mean of the last hidden states in
    every strategy; the export reloads with tunesmith.load, and with plain transformers by the loader
    docs/strategies.md shows (the encoder, the mean, the classifier's two tensors)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    res = tunesmith.train(make_config(model=str(st_model_dir), strategy=strategy, optim={"epochs": 6}), quiet=True)
    model_dir = res.run_dir / "model"
    assert json.loads((model_dir / "config.json").read_text())["tunesmith_head"] == {"pooling": "mean", "pooler": "masked-mean"}
    texts = [l.split(",")[0] for l in (data_dir / "test.csv").read_text().splitlines()[1:]]
    # the documented loader, plain transformers and safetensors:
    tok, encoder = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    weights = load_file(str(model_dir / "model.safetensors"))
    batch = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    plain = ((hidden * mask).sum(1) / mask.sum(1)) @ weights["classifier.weight"].T + weights["classifier.bias"]
    np.testing.assert_allclose(tunesmith.load(res.run_dir).logits(texts), plain.numpy(), atol=1e-5, rtol=0)
    rows = [l.split(",") for l in (data_dir / "test.csv").read_text().splitlines()[1:]]
    y = np.array([res.eval["labels"].index(l) for _, l in rows])
    from tunesmith.metrics import classification_metrics

    m = classification_metrics(plain.numpy(), y, res.eval["labels"], False)
    assert m["loss"] == pytest.approx(res.eval["after"]["loss"], abs=1e-5)


def test_a_run_starts_from_an_earlier_runs_model_with_its_mean_pooling_and_head(make_config, st_model_dir, data_dir,
                                                                                  tmp_path):
    """A run's model/ as the next run's `model` (more data arrives; fine-tune again): the masked mean is read
    again (the saved config says so; there is no sentence-transformers pooling folder), the earlier head with the
    same labels is the start, and the saved head description is this run's own. Before, the stale description
    made feature-extraction crash on a shape mismatch."""
    first = tunesmith.train(make_config(model=str(st_model_dir), optim={"epochs": 6}), quiet=True)
    model_dir = first.run_dir / "model"
    assert not (model_dir / "1_Pooling").exists()
    for strategy in ({"name": "full", "lp_ft": False}, {"name": "feature-extraction"}):
        second = tunesmith.train(make_config(model=str(model_dir), strategy=strategy,
                                             output_dir=str(tmp_path / strategy["name"])), quiet=True)
        saved = json.loads((second.run_dir / "model" / "config.json").read_text())["tunesmith_head"]
        assert saved["pooling"] == "mean"
        assert second.eval["after"]["accuracy"] >= 0.7
        if strategy["name"] == "full":  # the starting model is the first run's: the same test loss to float tolerance
            assert saved == {"pooling": "mean", "pooler": "masked-mean"}
            assert second.eval["before"]["loss"] == pytest.approx(first.eval["after"]["loss"], abs=1e-5)
        else:
            assert second.eval["features"]["pooling"] == "mean"


def test_an_earlier_head_for_other_labels_starts_afresh(make_config, data_dir, tmp_path):
    """The same number of classes under other names (or in another order): the earlier head's rows would
    mean other classes, so it is re-initialised, not kept (the tiny CLS model: nothing else differs)."""
    first = tunesmith.train(make_config(optim={"epochs": 6}), quiet=True)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for split in ("train", "validation", "test"):
        lines = (data_dir / f"{split}.csv").read_text().splitlines()
        (renamed / f"{split}.csv").write_text("\n".join([lines[0]] + [f"{l}_x" for l in lines[1:]]) + "\n")  # the label is last
    data = {s: str(renamed / f"{s}.csv") for s in ("train", "validation", "test")}
    second = tunesmith.train(make_config(model=str(first.run_dir / "model"), data=data, optim={"epochs": 1},
                                         output_dir=str(tmp_path / "second")), quiet=True)
    assert second.eval["labels"] == [f"{l}_x" for l in first.eval["labels"]]
    # a fresh random head, not the first run's (which gives the same test rows another loss)
    assert second.eval["before"]["loss"] != pytest.approx(first.eval["after"]["loss"], abs=1e-3)
