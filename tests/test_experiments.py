"""train --seeds and tunesmith sweep: every run a normal run directory, statistics that match the runs,
finished work kept on a second call, pruning recorded, the best config reloadable, bad spaces refused."""

import json
import statistics

import pytest
import yaml

import tunesmith
from test_cli import assert_user_error, write_config
from tunesmith.config import load_config
from tunesmith.errors import Stopped, UserError
from tunesmith.experiments import Pruning
from tunesmith.loop import run as run_loop


def test_seeds_summarise_the_runs_and_keep_finished_ones(make_config, tmp_path):
    cfg = make_config(optim={"epochs": 1}, train={"seed": 5})
    summary = tunesmith.train_seeds(cfg, 3, quiet=True)
    runs = [tmp_path / "run" / f"seed-{s}" for s in (5, 6, 7)]
    evs = [json.loads((r / "eval.json").read_text()) for r in runs]
    assert summary["seeds"] == [5, 6, 7] and [yaml.safe_load((r / "config.yaml").read_text())["train"]["seed"] for r in runs] == [5, 6, 7]
    losses = [ev["after"]["loss"] for ev in evs]
    assert len(set(losses)) == 3  # the seed changes the run
    got = summary["after"]["loss"]
    assert got["mean"] == pytest.approx(statistics.mean(losses)) and got["std"] == pytest.approx(statistics.stdev(losses))
    assert (got["min"], got["max"], got["n"]) == (min(losses), max(losses), 3)
    assert json.loads((tmp_path / "run" / "seeds.json").read_text())["after"]["loss"]["values"] == losses
    assert (tmp_path / "run" / "seeds.html").stat().st_size > 1000
    before = [(r / "eval.json").stat().st_mtime_ns for r in runs]
    again = tunesmith.train_seeds(cfg, 4, quiet=True)  # the three finished seeds are kept, one more trains
    assert [(r / "eval.json").stat().st_mtime_ns for r in runs] == before
    assert again["seeds"] == [5, 6, 7, 8] and again["after"]["loss"]["values"][:3] == losses


def test_sweep_runs_trials_writes_best_config_and_continues(make_config, tmp_path):
    space = {"optim.lr": {"low": 1e-3, "high": 1e-2, "log": True}, "optim.epochs": {"low": 1, "high": 2},
             "strategy.name": {"choices": ["full", "head-only"]}}
    cfg = make_config(sweep=space, output_dir=str(tmp_path / "sweep"))
    summary = tunesmith.sweep(cfg, trials=4, quiet=True)
    trials = summary["trials"]
    assert len(trials) == 4 and all(t["state"] in ("complete", "pruned") for t in trials)
    for t in trials:
        assert 1e-3 <= t["params"]["optim.lr"] <= 1e-2 and t["params"]["optim.epochs"] in (1, 2)
        run_cfg = yaml.safe_load((tmp_path / "sweep" / f"trial-{t['number']:03d}" / "config.yaml").read_text())
        assert run_cfg["strategy"]["name"] == t["params"]["strategy.name"] and "sweep" not in run_cfg
        assert run_cfg["optim"]["lr"] == pytest.approx(t["params"]["optim.lr"])
    best = summary["best"]
    values = [t["value"] for t in trials if t["state"] == "complete"]
    assert best["value"] == max(values)  # macro_f1: higher is better
    ev = json.loads((tmp_path / "sweep" / f"trial-{best['number']:03d}" / "eval.json").read_text())
    assert ev["validation_best"]["macro_f1"] == best["value"]
    best_cfg = load_config(str(tmp_path / "sweep" / "best.yaml"))
    assert best_cfg.optim.lr == pytest.approx(best["params"]["optim.lr"]) and best_cfg.strategy.name == best["params"]["strategy.name"]
    assert "<img" in (tmp_path / "sweep" / "sweep.html").read_text()
    again = tunesmith.sweep(cfg, trials=5, quiet=True)  # the study is in sweep.db: one more trial, not five
    assert len(again["trials"]) == 5 and [t["params"] for t in again["trials"][:4]] == [t["params"] for t in trials]


def test_sweep_with_seeds_scores_a_trial_by_the_mean_of_its_seeds(make_config, tmp_path):
    cfg = make_config(sweep={"optim.lr": {"low": 1e-3, "high": 1e-2, "log": True}}, optim={"epochs": 1},
                      output_dir=str(tmp_path / "sweep"), train={"seed": 3})
    from tunesmith.cli import main

    assert main(["sweep", str(write_config(tmp_path, cfg)), "--trials", "2", "--seeds", "2", "--quiet"]) == 0
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    for t in summary["trials"]:
        runs = [tmp_path / "sweep" / f"trial-{t['number']:03d}" / f"seed-{s}" for s in (3, 4)]
        best = [json.loads((r / "eval.json").read_text())["validation_best"]["macro_f1"] for r in runs]
        assert t["value"] == pytest.approx(sum(best) / 2)
        assert [yaml.safe_load((r / "config.yaml").read_text())["train"]["seed"] for r in runs] == [3, 4]


class Prunes:
    def __init__(self):
        self.reported = []

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return len(self.reported) >= 2


def test_a_pruned_run_is_recorded_and_holds_no_model(make_config, tmp_path, run_cli):
    trial = Prunes()
    with pytest.raises(Stopped, match="pruned by the sweep at step"):
        run_loop(load_config(make_config(optim={"epochs": 3})), quiet=True, observers=[Pruning(trial, "macro_f1")])
    run = tmp_path / "run"
    record = json.loads((run / "failed.json").read_text())
    assert record["status"] == "pruned" and trial.reported[-1][0] == 2 and "(evaluation 2)" in record["error"]
    assert not (run / "eval.json").exists() and not (run / "model").exists()
    assert_user_error(run_cli("predict", run, "good film"), f"the run in {run} was pruned by a sweep at step {record['step']}")


@pytest.mark.parametrize("space, fragments", [
    (None, ["no sweep: section"]),
    ({"optim.lrr": {"low": 1, "high": 2}}, ["sweep.optim.lrr", "lrr"]),
    ({"strategy.name": {"choices": ["full", "fancy"]}}, ["sweep.strategy.name = 'fancy'", "fancy"]),
    ({"optim.lr": {"low": -1.0, "high": 1.0}}, ["sweep.optim.lr = -1.0", "optim.lr must be > 0"]),
    ({"optim.lr": {"low": 0.0, "high": 1.0, "log": True}}, ["log: true needs low > 0"]),
    ({"optim.lr": {"low": 1.0}}, ["give low and high (a range) or choices"]),
    ({"output_dir": {"choices": ["a", "b"]}}, ["sweep.output_dir cannot be searched"]),
])
def test_bad_search_spaces_are_refused_before_any_trial(make_config, tmp_path, space, fragments):
    """In process (the command line's one-line form of these is in tests/test_adversarial.py)."""
    cfg = write_config(tmp_path, make_config(output_dir=str(tmp_path / "sweep"), **({"sweep": space} if space else {})))
    with pytest.raises(UserError) as e:
        tunesmith.sweep(str(cfg), trials=2, quiet=True)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert not list((tmp_path / "sweep").glob("trial-*"))


def test_sweep_needs_optuna_or_says_how_to_get_it(monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "optuna" else real(name, *a, **k))
    from tunesmith.experiments import _optuna

    with pytest.raises(UserError, match=r"pip install 'tunesmith\[sweep\]'"):
        _optuna()
