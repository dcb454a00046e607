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
    failed = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert failed["user_error"] and failed["step"] == 5 and "NaN/inf" in failed["error"] and "traceback" not in failed


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
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # another run's directory: untouched
    res = tunesmith.train(make_config(optim={"epochs": 1}), quiet=True)  # released: the run goes ahead
    assert (res.run_dir / "eval.json").exists()


def test_too_little_disk_fails_before_training(make_config, monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(UserError, match=r"1 MB free on its disk, but the model and checkpoints this run writes needs about \d+ MB"):
        tunesmith.train(make_config(), quiet=True)
    assert not (tmp_path / "run").exists()  # the directory this run made is gone again: nothing looks started


def test_a_run_that_fails_after_starting_is_marked_failed_and_resumes(make_config, monkeypatch, tmp_path, capsys):
    """An unexpected error at the 8th step: one line and exit 1, the traceback in a file, failed.json in the run
    directory with the step and the checkpoint; predict refuses the run; --resume finishes it and clears the mark."""
    from pathlib import Path

    import yaml

    from tunesmith.cli import main
    from tunesmith.tasks.text_classification import TextClassification

    original = TextClassification.step
    calls = {"n": 0}

    def step(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise RuntimeError("the machine broke")
        return original(self, model, batch)

    monkeypatch.setattr(TextClassification, "step", step)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(make_config(train={"checkpoint_minutes": 0})))  # a checkpoint at every epoch's end
    rc = main(["train", str(cfg), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("tunesmith: error: unexpected RuntimeError: the machine broke; this is a bug in tunesmith")
    assert "Traceback" in Path(err[0].split("the traceback is in ")[1].split(" ")[0]).read_text()
    run = tmp_path / "run"
    failed = json.loads((run / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["type"] == "RuntimeError" and failed["step"] == 7 and not failed["user_error"]
    assert failed["checkpoint"].endswith("step-000006") and "raise RuntimeError" in failed["traceback"]
    assert not (run / "eval.json").exists()

    assert main(["predict", str(run), "great film"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tunesmith: error: the run in {run} failed at step 7 and holds no model: the machine broke") and "--resume" in err

    monkeypatch.setattr(TextClassification, "step", original)
    assert main(["train", str(cfg), "--quiet", "--resume"]) == 0
    assert (run / "eval.json").exists() and not (run / "failed.json").exists()


def test_max_length_past_the_model_is_lowered_with_a_warning(make_config, make_lm_config, data_dir, tmp_path):
    """train.max_length 100000 on models of 64 (BERT) and 256 (Llama) positions: lowered, said, trained."""
    import yaml

    from conftest import make_texts, write_csv

    write_csv(data_dir / "train.csv", make_texts(96, 1) + [(" ".join(["great"] * 300), "pos")])
    res = tunesmith.train(make_config(train={"max_length": 100000}, optim={"epochs": 1}), quiet=True)
    assert yaml.safe_load((res.run_dir / "config.yaml").read_text())["train"]["max_length"] == 64
    assert res.eval["data"]["train"]["truncated"] >= 1
    assert any(w.startswith("train.max_length 100000 is more than model") and "(64 tokens: max_position_embeddings" in w
               for w in res.eval["data_report"]["warnings"])
    res = tunesmith.train(make_lm_config(train={"max_length": 100000}, optim={"epochs": 1}, output_dir=str(tmp_path / "lm")), quiet=True)
    assert yaml.safe_load((res.run_dir / "config.yaml").read_text())["train"]["max_length"] == 256


def test_every_exported_model_carries_a_model_card(make_config, make_lm_config, tmp_path):
    """README.md in the Hugging Face model-card format: metadata a hub reads, the run's own numbers."""
    import yaml

    res = tunesmith.train(make_config(optim={"epochs": 2}), quiet=True)
    text = (res.run_dir / "model" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
    assert meta["base_model"].endswith("tiny-bert0") and "tunesmith" in meta["tags"]
    after = res.eval["after"]["accuracy"]
    assert f"| accuracy | {res.eval['before']['accuracy']:.4f} | {after:.4f} |" in text
    assert "| train | 96 |" in text and "2 labels: `neg`, `pos`." in text
    assert f'pipeline("text-classification", model="{res.run_dir}/model")' in text
    res = tunesmith.train(make_lm_config(optim={"epochs": 1}, lm={"forgetting": None}), quiet=True)
    text = (res.run_dir / "model" / "README.md").read_text()
    assert yaml.safe_load(text.split("---")[1])["pipeline_tag"] == "text-generation" and "| perplexity |" in text
    assert "apply_chat_template" in text
