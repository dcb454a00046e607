"""Kill a run with SIGKILL (at a step, or in the middle of writing a checkpoint), resume it, and
get bit-for-bit the weights of a run that never stopped; Ctrl-C writes a checkpoint and says how
to resume; a changed config is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import POS, NEG, NEU, SPECIAL, make_texts, write_csv

WORKER = Path(__file__).with_name("_resume_worker.py")


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    """The tiny BERT with dropout on, so that resuming must restore the RNG to match."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny-bert-dropout")
    vocab = SPECIAL + sorted(set(POS + NEG + NEU))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(d)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(d)
    return d


@pytest.fixture
def resume_config(make_config, dropout_model_dir, data_dir):
    write_csv(data_dir / "general.csv", make_texts(30, seed=11))

    def make(out, **extra):
        cfg = make_config(model=str(dropout_model_dir), output_dir=str(out), resume="auto",
                          optim={"epochs": 3, "batch_size": 16},
                          strategy={"name": "full", "replay": {"file": str(data_dir / "general.csv"), "fraction": 0.2}},
                          train={"checkpoint_every": 2, "keep_checkpoints": 2, "max_length": 32, "seed": 0, "log_every": 1,
                                 "checkpoint_minutes": 0})  # and at every epoch's end
        for k, v in extra.items():
            cfg[k].update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
        return cfg

    return make


def pythonpath():
    return os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])


def work(tmp_path, cfg, env=None, name="w"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "cfg.json").write_text(json.dumps(cfg))
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath(), **(env or {})}
    return subprocess.run([sys.executable, str(WORKER), str(d / "cfg.json"), str(d)], capture_output=True, text=True,
                          env=e, timeout=300), d


def final(d):
    return load_file(str(d / "final.safetensors"))


_UNINTERRUPTED: dict[str, dict] = {}


@pytest.fixture
def uninterrupted(tmp_path, resume_config):
    """Weights of the run that never stopped (the same seeded data every test: computed once)."""
    if "weights" not in _UNINTERRUPTED:
        proc, d = work(tmp_path, resume_config(tmp_path / "plain-run"), name="plain")
        assert proc.returncode == 0, proc.stderr[-2000:]
        _UNINTERRUPTED["weights"] = final(d)
    return _UNINTERRUPTED["weights"]


# step3 and in-ckpt10 repeat what step8 and in-ckpt6 check (a kill after a step checkpoint; a torn write)
# at another point: `pytest -m slow` runs them, the default run (about 11 s each) does not
@pytest.mark.parametrize("kill", [
    pytest.param({"KILL_AT_CALL": "3"}, marks=pytest.mark.slow),          # mid-epoch 1, after the checkpoint at step 2
    {"KILL_AT_CALL": "8"},                                                # epoch 2, after the epoch-1 checkpoint and step 8's
    {"KILL_AT_CALL": "16"},                                               # epoch 3, just before the end
    {"KILL_IN_CHECKPOINT": "6"},                                          # while writing the end-of-epoch-1 checkpoint
    pytest.param({"KILL_IN_CHECKPOINT": "10"}, marks=pytest.mark.slow),   # while writing a mid-epoch checkpoint
], ids=["step3", "step8", "step16", "in-ckpt6", "in-ckpt10"])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, resume_config, uninterrupted, kill):
    out = tmp_path / "run"
    proc, d = work(tmp_path, resume_config(out), env=kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "eval.json").exists()
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    if "KILL_IN_CHECKPOINT" in kill:
        assert (out / "checkpoints" / f"step-{int(kill['KILL_IN_CHECKPOINT']):06d}.tmp").exists()  # the torn write
        assert int(kill["KILL_IN_CHECKPOINT"]) not in steps  # ... never looks like a checkpoint
    proc, d = work(tmp_path, resume_config(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = final(d)
    for k, v in uninterrupted.items():
        torch.testing.assert_close(resumed[k], v, atol=1e-6, rtol=0, msg=f"{k} differs after resume")
    ev = json.loads((out / "eval.json").read_text())
    assert ev["train"]["steps"] == 18 and ev["data"]["replay"]["samples_seen"] == 18 * 4
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == list(range(1, 19))  # no step lost or logged twice
    assert not (out / "checkpoints").exists()  # a finished run keeps model/, not its checkpoints


def test_sigint_writes_a_checkpoint_and_says_how_to_resume(tmp_path, resume_config, uninterrupted):
    out = tmp_path / "run"
    cfg = resume_config(out, train={"checkpoint_every": 0})
    d = tmp_path / "w"
    d.mkdir()
    (d / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STEP_DELAY": "0.3", "PYTHONPATH": pythonpath()}
    p = subprocess.Popen([sys.executable, str(WORKER), str(d / "cfg.json"), str(d)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first logged step
        m = out / "metrics.jsonl"
        if m.exists() and '"type": "train"' in m.read_text():
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "interrupted by SIGINT after step" in err and "resume with: tunesmith train" in err
    assert any((out / "checkpoints").iterdir())
    proc, d2 = work(tmp_path, cfg, name="w2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = final(d2)
    for k, v in uninterrupted.items():
        torch.testing.assert_close(resumed[k], v, atol=1e-6, rtol=0, msg=k)


def test_resume_refuses_a_changed_config_but_allows_more_epochs(tmp_path, resume_config):
    out = tmp_path / "run"
    proc, _ = work(tmp_path, resume_config(out), env={"KILL_AT_CALL": "8"})
    assert proc.returncode == -signal.SIGKILL
    proc, _ = work(tmp_path, resume_config(out, optim={"lr": 1e-2, "batch_size": 8}))
    assert proc.returncode == 2
    assert "the config changed in optim.batch_size, optim.lr" in proc.stderr
    proc, d = work(tmp_path, resume_config(out, optim={"epochs": 4}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "eval.json").read_text())["train"]["steps"] == 24


def test_resume_true_without_a_checkpoint_is_an_error(tmp_path, resume_config):
    proc, _ = work(tmp_path, resume_config(tmp_path / "fresh", resume=True))
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr


def test_two_processes_resume_after_sigkill_and_stop_together_on_sigterm(tmp_path, resume_config):
    """torchrun with 2 CPU processes: the whole group killed at a step (a machine dying), then
    resumed; SIGTERM to torchrun (a scheduler's preemption): both workers stop after the same step,
    one checkpoint holds both RNG states. Either way the resumed run ends with the weights of a
    2-process run that never stopped, on both ranks."""
    from test_distributed import free_port

    def torchrun(cfg, name, env=None, wait=True):
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        (d / "cfg.json").write_text(json.dumps(cfg))
        e = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath(), **(env or {})}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(d / "cfg.json"), str(d)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, start_new_session=True)
        if not wait:
            return p, d
        _, err = p.communicate(timeout=600)
        return p.returncode, err, d

    def both(d):
        r0, r1 = (load_file(str(d / f"final-rank{r}.safetensors")) for r in (0, 1))
        for k in r0:
            assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
        return r0

    rc, err, d = torchrun(resume_config(tmp_path / "plain"), "plain")
    assert rc == 0, err[-3000:]
    plain = both(d)

    out = tmp_path / "killed"
    rc, err, _ = torchrun(resume_config(out), "killed", env={"KILL_GROUP_AT_CALL": "8"})  # epoch 2, after step 8's checkpoint
    assert rc == -signal.SIGKILL and not (out / "eval.json").exists()
    ckpt = checkpoint_dirs = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoint_dirs and all((c / "rng-rank1.safetensors").exists() for c in ckpt)
    rc, err, d = torchrun(resume_config(out), "killed-resume")
    assert rc == 0, err[-3000:]
    for k, v in both(d).items():
        torch.testing.assert_close(v, plain[k], atol=1e-6, rtol=0, msg=f"{k} differs after a 2-process resume")

    out = tmp_path / "preempted"
    cfg = resume_config(out, train={"checkpoint_every": 0})
    p, _ = torchrun(cfg, "preempted", env={"STEP_DELAY": "0.3"}, wait=False)
    deadline = time.time() + 180
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and '"type": "train"' in (out / "metrics.jsonl").read_text()):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both workers
    _, err = p.communicate(timeout=180)
    assert p.returncode != 0 and not (out / "eval.json").exists(), err[-3000:]
    assert err.count("interrupted by SIGTERM after step") == 2, err[-3000:]  # one line per worker, the same step
    steps = {line.split("after step ")[1].split(";")[0] for line in err.splitlines() if "interrupted by SIGTERM" in line}
    assert len(steps) == 1, steps
    assert len(list((out / "checkpoints").glob("step-*"))) == 1
    rc, err, d = torchrun(cfg, "preempted-resume")
    assert rc == 0, err[-3000:]
    for k, v in both(d).items():
        torch.testing.assert_close(v, plain[k], atol=1e-6, rtol=0, msg=f"{k} differs after SIGTERM and resume")


def test_resumed_fine_tuning_stage_still_falls_back_to_the_probe_stage(tmp_path, resume_config):
    """LP-FT with a fine-tuning rate that wrecks the model: the run falls back on the probe stage's logistic
    regression (better on validation loss than the stage's own head and the wrecked model). Killed in the
    second stage and resumed, it must still know where that stage began (in the checkpoint) and refit the
    regression of the stage it skips, and end with the same weights as the run that never stopped."""
    def cfg(out):
        return resume_config(out, strategy={"name": "full", "lp_ft": True, "replay": None}, optim={"lr": 5.0, "epochs": 2},
                             train={"metric": "loss"})

    proc, plain = work(tmp_path, cfg(tmp_path / "plain"), name="plain")
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = json.loads((tmp_path / "plain" / "eval.json").read_text())["kept_stage"]
    assert kept["stage"] == "logistic regression"
    out = tmp_path / "run"
    proc, _ = work(tmp_path, cfg(out), env={"KILL_AT_CALL": "17"})  # step 18: stage 2 (steps 13-24), after its checkpoint at 16
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    proc, d = work(tmp_path, cfg(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((out / "eval.json").read_text())["kept_stage"]  # numbers within float noise between processes
    assert got["stage"] == kept["stage"]
    assert {k: v for k, v in got.items() if k != "stage"} == pytest.approx({k: v for k, v in kept.items() if k != "stage"}, rel=1e-6)
    for k, v in final(plain).items():
        torch.testing.assert_close(final(d)[k], v, atol=1e-6, rtol=0, msg=f"{k} differs after resume")


def test_resume_in_a_later_soup_run_gives_the_uninterrupted_soup(tmp_path, resume_config):
    """strategy.soup: killed in the second fine-tuning run, the resumed run must know where the stage began,
    the first run's best weights (the soup's sum, in the checkpoint) and its score, and end with the
    uninterrupted run's averaged weights."""
    def cfg(out):
        return resume_config(out, strategy={"name": "full", "lp_ft": True, "soup": 2, "replay": None}, optim={"epochs": 2})

    proc, plain = work(tmp_path, cfg(tmp_path / "plain"), name="plain")
    assert proc.returncode == 0, proc.stderr[-2000:]
    soup = json.loads((tmp_path / "plain" / "eval.json").read_text())["soup"]
    assert soup["members"] == 2
    out = tmp_path / "run"
    proc, _ = work(tmp_path, cfg(out), env={"KILL_AT_CALL": "29"})  # step 30: the second run (steps 25-36), after step 28's checkpoint
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    saved = json.loads(max((out / "checkpoints").glob("step-*/state.json")).read_text())
    assert saved["member"] == 1 and len(saved["member_scores"]) == 1
    proc, d = work(tmp_path, cfg(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((out / "eval.json").read_text())["soup"]
    assert got["members"] == 2 and got["member_macro_f1"] == pytest.approx(soup["member_macro_f1"], rel=1e-6)
    assert got["macro_f1"] == pytest.approx(soup["macro_f1"], rel=1e-6)
    for k, v in final(plain).items():
        torch.testing.assert_close(final(d)[k], v, atol=1e-6, rtol=0, msg=f"{k} differs after resume")
