"""Training behaviour on a tiny BERT built in code: what changes, what falls, what reloads."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tunesmith
from conftest import make_texts, write_csv


def initial_state(model_dir):
    from transformers import BertModel

    return {k: v.clone() for k, v in BertModel.from_pretrained(model_dir).state_dict().items()}


def trained_state(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def lines(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_full_run_artifacts_and_loss_falls(make_config, tiny_model_dir):
    res = tunesmith.train(make_config(optim={"epochs": 10}), quiet=True)
    run = res.run_dir
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "eval.json", "model"}
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["before"]) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix"}
    assert ev["after"]["accuracy"] > ev["before"]["accuracy"] and ev["after"]["accuracy"] >= 0.9
    assert ev["train"]["samples_per_s"] > 0 and ev["train"]["peak_rss_mb"] > 0 and ev["train"]["steps"] == 10 * 6
    train = lines(run, "train")
    assert len(train) == 60 and np.mean([r["loss"] for r in train[-6:]]) < 0.5 * np.mean([r["loss"] for r in train[:6]])
    assert len(lines(run, "eval")) == 10  # one validation per epoch
    # every weight trained
    before, after = initial_state(tiny_model_dir), trained_state(run)
    for k, v in before.items():
        assert not torch.equal(v, after[f"bert.{k}"]), k


def test_head_sized_to_labels_and_label_map_saved(make_config, data_dir, tmp_path):
    rows = make_texts(90, 0, classes=("pos", "neg", "neu"))
    write_csv(data_dir / "three.csv", rows)
    cfg = make_config(data={"train": str(data_dir / "three.csv"), "validation": None, "test": None}, optim={"epochs": 1})
    res = tunesmith.train(cfg, quiet=True)
    config = json.loads((res.run_dir / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    assert trained_state(res.run_dir)["classifier.weight"].shape == (3, 32)
    assert res.eval["data"]["validation"]["rows"] == 9 and res.eval["data"]["test"]["rows"] == 9  # split 10% each


def test_head_only_leaves_backbone_bit_identical(make_config, tiny_model_dir, capsys):
    res = tunesmith.train(make_config(strategy={"name": "head-only"}, optim={"lr": None, "epochs": 2}), quiet=False)
    out = capsys.readouterr().out
    before, after = initial_state(tiny_model_dir), trained_state(res.run_dir)
    assert {k for k in after if not k.startswith("bert.")} == {"classifier.weight", "classifier.bias"}
    for k, v in before.items():  # the checkpoint has a pooler: it is backbone, and frozen
        assert torch.equal(v, after[f"bert.{k}"]), f"frozen {k} changed"
    assert not torch.equal(after["classifier.weight"], torch.zeros_like(after["classifier.weight"]))
    trainable = 2 * 32 + 2  # the new classifier
    total = sum(v.numel() for v in after.values() if v.dtype.is_floating_point)
    assert f"{trainable:,} trainable, {total - trainable:,} frozen" in out
    assert "1.00e-03" in out  # head-only default lr


def test_early_stopping_restores_best_weights(make_config, data_dir):
    # validation accuracy reaches its best and then stops improving: patience 2 stops the run
    cfg = make_config(optim={"epochs": 40}, train={"early_stopping": 2, "metric": "accuracy", "eval_every": 2},
                      data={"test": str(data_dir / "validation.csv")})
    res = tunesmith.train(cfg, quiet=True)
    tr = res.eval["train"]
    assert tr["stopped_early"] and tr["steps"] < 40 * 6 and tr["best_step"] == tr["steps"] - 4
    evals = {e["step"]: e for e in lines(res.run_dir, "eval")}
    best, last = evals[tr["best_step"]], evals[tr["steps"]]
    assert last["loss"] != best["loss"]  # training moved on after the best evaluation
    # test = validation here: the restored weights reproduce the best evaluation exactly, not the last
    assert res.eval["after"]["loss"] == pytest.approx(best["loss"], abs=1e-6)
    assert res.eval["after"]["accuracy"] == best["accuracy"] == res.eval["validation_best"]["accuracy"]


def test_export_reloads_with_plain_transformers_to_identical_logits(make_config, data_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    res = tunesmith.train(make_config(optim={"epochs": 8}), quiet=True)
    texts = ["great film", "dull and boring script", "the plot"]
    model_dir = res.run_dir / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        plain = [hf(**tok(t, return_tensors="pt")).logits[0].numpy() for t in texts]
    ours = tunesmith.load(res.run_dir).logits(texts)
    np.testing.assert_allclose(ours, np.stack(plain), atol=1e-5)
    preds = tunesmith.load(res.run_dir)(texts)
    assert [p.label for p in preds][:2] == ["pos", "neg"]
    assert abs(sum(preds[0].probabilities.values()) - 1) < 1e-6


def test_gradient_accumulation_matches_one_big_batch(make_config, tmp_path):
    a = tunesmith.train(make_config(optim={"batch_size": 16, "grad_accum": 2, "epochs": 1, "max_grad_norm": None},
                                    train={"group_by_length": False}, output_dir=str(tmp_path / "a")), quiet=True)
    b = tunesmith.train(make_config(optim={"batch_size": 32, "epochs": 1, "max_grad_norm": None},
                                    train={"group_by_length": False}, output_dir=str(tmp_path / "b")), quiet=True)
    # same examples per optimizer step, in a different batch order (batches are drawn per batch size)
    assert a.eval["train"]["steps"] == b.eval["train"]["steps"] == 3


def test_multi_label(make_config, data_dir):
    rows = []
    for t, l in make_texts(120, 5, classes=("pos", "neg", "neu")):
        rows.append({"text": t, "label": [l] if l != "neu" else ["neu", "pos"]})
    (data_dir / "ml.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(data={"train": str(data_dir / "ml.jsonl"), "validation": None, "test": None}, optim={"epochs": 8})
    res = tunesmith.train(cfg, quiet=True)
    config = json.loads((res.run_dir / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert res.eval["after"]["micro_f1"] > res.eval["before"]["micro_f1"]
    pred = tunesmith.load(res.run_dir)(["the film was great"])[0]
    assert isinstance(pred.label, list)


def test_linear_probe_baseline(make_config):
    res = tunesmith.train(make_config(eval={"linear_probe": True}, optim={"epochs": 1}), quiet=True)
    probe = res.eval["linear_probe"]
    assert 0 <= probe["accuracy"] <= 1 and probe["train_rows"] == 96


def test_truncated_rows_are_counted(make_config, tiny_model_dir, data_dir):
    import csv

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [r["text"] for r in csv.DictReader(open(data_dir / "train.csv"))]
    expected = sum(1 for ids in tok(texts)["input_ids"] if len(ids) > 10)
    assert 0 < expected < len(texts)
    res = tunesmith.train(make_config(train={"max_length": 10}, optim={"epochs": 1}), quiet=True)
    assert res.eval["data"]["train"]["truncated"] == expected


def test_epoch_checkpoints_skip_the_runs_last_epoch(make_config, monkeypatch):
    """train.checkpoint_epochs writes at the end of every epoch but the run's last (the run then finishes and keeps
    no checkpoints); LP-FT's probe stage is not the last, so its epochs are checkpointed. That is with
    checkpoint_minutes 0; at its default (5) a run of seconds writes none, and one whose training clock passes the
    minutes writes one at the first epoch's end after that, then waits the minutes again."""
    from tunesmith.loop import Recipe

    saved: list[tuple[int, int]] = []
    real = Recipe.save_checkpoint

    def counting(self, *a, **k):
        saved.append((self.state.stage, self.state.step))
        return real(self, *a, **k)

    monkeypatch.setattr(Recipe, "save_checkpoint", counting)
    every = {"checkpoint_minutes": 0}
    ev = tunesmith.train(make_config(optim={"epochs": 3, "min_steps": 0}, strategy={"name": "full", "lp_ft": False},
                                     train=every)).eval
    per_epoch = ev["train"]["steps"] // 3
    assert saved == [(0, per_epoch), (0, 2 * per_epoch)]
    saved.clear()
    lp_ft = {"name": "full", "lp_ft": True, "soup": 1}
    tunesmith.train(make_config(optim={"epochs": 2, "min_steps": 0}, strategy=lp_ft, train=every, overwrite=True))
    assert [stage for stage, _ in saved] == [0, 0, 1]  # both probe-stage epochs, the first fine-tuning epoch
    saved.clear()
    tunesmith.train(make_config(optim={"epochs": 2, "min_steps": 0}, strategy={**lp_ft, "soup": 2}, train=every, overwrite=True))
    assert [stage for stage, _ in saved] == [0, 0, 1, 1, 1]  # a soup's first run is not the last: both its epochs
    saved.clear()
    five_epochs = {"optim": {"epochs": 5, "min_steps": 0}, "strategy": {"name": "full", "lp_ft": False}, "overwrite": True}
    tunesmith.train(make_config(**five_epochs))
    assert saved == []  # the default: seconds of training, no checkpoint
    # the training clock read as 4 minutes an epoch: 5 minutes have passed at the ends of epochs 2 and 4
    monkeypatch.setattr(Recipe, "stages_time_now", lambda self: 240.0 * self.state.epoch)
    tunesmith.train(make_config(**five_epochs))
    assert saved == [(0, 2 * per_epoch), (0, 4 * per_epoch)]
