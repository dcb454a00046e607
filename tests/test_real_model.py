"""The real packaged MiniLM on real Rotten Tomatoes snippets (slow: about a minute each on 2 cores)."""

import json
import os
import subprocess
import sys

import pytest

import tunesmith

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rotten(tmp_path_factory):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from _rotten import write_split

    d = tmp_path_factory.mktemp("rotten")
    write_split(d, 600, 400, seed=1)
    return d


def config(rotten, out, **strategy):
    return {
        "task": "text-classification", "model": "minilm-l6",
        "data": {"train": str(rotten / "train.csv"), "test": str(rotten / "test.csv")},
        "strategy": strategy or {"name": "full"},
        "optim": {"lr": 1e-4, "epochs": 3, "batch_size": 16},
        "output_dir": str(out),
    }


@pytest.mark.ci
def test_minilm_full_fine_tuning_beats_its_starting_point(rotten, tmp_path, capsys):
    res = tunesmith.train(config(rotten, tmp_path / "run"))
    out = capsys.readouterr().out
    ev = res.eval
    # the checkpoint has BERT's pooler: only the classifier is new
    assert "head: new 2-way head (classifier.weight, classifier.bias)" in out
    assert "22,713,986 trainable, 0 frozen" in out
    assert ev["data"]["validation"]["rows"] == 60 and ev["data"]["train"]["rows"] == 540
    assert ev["after"]["accuracy"] >= 0.68 and ev["after"]["accuracy"] > ev["before"]["accuracy"] + 0.1
    assert 0.6 <= ev["linear_probe"]["accuracy"] <= 0.9
    clf = tunesmith.load(res.run_dir)
    preds = clf(["A gripping, beautifully acted film.", "A dull, lifeless and tedious mess."])
    assert [p.label for p in preds] == ["fresh", "rotten"]


def test_minilm_head_only_trains_only_the_new_head(rotten, tmp_path, capsys):
    tunesmith.train(config(rotten, tmp_path / "run", name="head-only"))
    out = capsys.readouterr().out
    head = 2 * 384 + 2  # the new classifier
    assert f"{head:,} trainable, {22_713_986 - head:,} frozen" in out


def test_demo_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "demo", "--train-rows", "300", "--epochs", "1",
                           "--output-dir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "before (new head)" in proc.stdout and "after fine-tuning" in proc.stdout
    ev = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert ev["data"]["train"]["rows"] == 300 and ev["data"]["test"]["rows"] == 2000
