"""Numerical safety, safe loading and output-directory guards, on the tiny BERT."""

import json

import pytest
import torch

import tunesmith
from tunesmith.errors import UserError


def nan_on(calls):
    """A task step that returns a NaN loss on the given (0-based) calls."""
    from tunesmith.tasks.text_classification import TextClassification

    original = TextClassification.step
    counter = {"n": 0}

    def step(self, model, batch):
        out = original(self, model, batch)
        if counter["n"] in calls:
            out["loss"] = out["loss"] * float("nan")
        counter["n"] += 1
        return out

    return step


def test_nan_steps_are_skipped_counted_and_never_reach_the_weights(make_config, monkeypatch):
    from tunesmith.tasks.text_classification import TextClassification

    monkeypatch.setattr(TextClassification, "step", nan_on({2, 3, 7}))
    res = tunesmith.train(make_config(optim={"epochs": 2}), quiet=True)
    assert res.eval["train"]["skipped_steps"] == 3 and res.eval["train"]["steps"] == 12
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    log = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "skip"] == [3, 4, 8]
    assert all(r["loss"] == r["loss"] for r in log if r["type"] == "train")  # no NaN in the logged losses


def test_too_many_bad_steps_in_a_row_stop_the_run(make_config, monkeypatch, tmp_path):
    from tunesmith.tasks.text_classification import TextClassification

    monkeypatch.setattr(TextClassification, "step", nan_on(set(range(2, 100))))
    with pytest.raises(UserError, match=r"NaN/inf for 3 steps in a row \(last at step 5.*Lower optim.lr"):
        tunesmith.train(make_config(train={"max_bad_steps": 3}), quiet=True)
    assert not (tmp_path / "run" / "eval.json").exists()  # not a finished run: a rerun is not refused


def test_pickle_only_weights_are_refused_unless_allowed(make_config, tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"only pickle-based weights \(pytorch_model.bin\).*allow_pickle: true"):
        tunesmith.train(make_config(model=str(pickled)), quiet=True)
    res = tunesmith.train(make_config(model=str(pickled), allow_pickle=True, optim={"epochs": 1}), quiet=True)
    assert (res.run_dir / "model" / "model.safetensors").exists()  # what we write is safetensors


def test_trust_remote_code_is_off_by_default_and_warns_when_on(make_config, capsys):
    tunesmith.train(make_config(optim={"epochs": 1}), quiet=True)
    assert "trust_remote_code" not in capsys.readouterr().err
    tunesmith.train(make_config(optim={"epochs": 1}, trust_remote_code=True, overwrite=True), quiet=True)
    assert "warning: trust_remote_code is on" in capsys.readouterr().err


def test_a_second_run_on_the_same_directory_is_refused(make_config, tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        with pytest.raises(UserError, match=r"in use by another tunesmith run \(pid 4242\)"):
            tunesmith.train(make_config(), quiet=True)
    res = tunesmith.train(make_config(optim={"epochs": 1}), quiet=True)  # released: the run goes ahead
    assert (res.run_dir / "eval.json").exists()


def test_too_little_disk_fails_before_training(make_config, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(UserError, match=r"1 MB free on its disk, but the model and checkpoints this run writes needs about \d+ MB"):
        tunesmith.train(make_config(), quiet=True)
