"""Defaults that learn on small, imbalanced data, and a guard that says when they did not."""

from __future__ import annotations

import pytest

import tunesmith
from conftest import make_texts, write_csv


@pytest.fixture
def imbalanced(tmp_path):
    """90/10 training data: 180 'pos', 20 'neg'; the same ratio held out."""
    rows = make_texts(1000, seed=11)
    pos = [r for r in rows if r[1] == "pos"]
    neg = [r for r in rows if r[1] == "neg"]
    d = tmp_path / "imb"
    d.mkdir()
    write_csv(d / "train.csv", pos[:180] + neg[:20])
    write_csv(d / "validation.csv", pos[180:225] + neg[20:25])
    write_csv(d / "test.csv", pos[225:315] + neg[25:35])
    return d


# Strategies that move the tiny model's weights: its random backbone gives a frozen head nothing to
# separate (the linear probe scores 0.52-0.58 macro-F1 here), so head-only, feature-extraction and
# LoRA on it say nothing about collapse; the real-model proxies in docs/strategies.md cover them.
STRATEGIES = [{"name": "full"}, {"name": "freeze", "train_last_n": 1}, {"name": "gradual-unfreeze"}]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[s["name"] for s in STRATEGIES])
def test_no_strategy_collapses_to_the_majority_class(make_config, imbalanced, strategy, capsys):
    """With the default budget (optim.min_steps) and class weights (auto: 9x imbalance), every
    strategy predicts the minority class too; a collapsed model has macro-F1 0.47 here."""
    data = {s: str(imbalanced / f"{s}.csv") for s in ("train", "validation", "test")}
    # the tiny model is random, not pre-trained: it keeps the fixture's rate
    ev = tunesmith.train(make_config(strategy=strategy, data=data, optim={"min_steps": 150})).eval
    out = capsys.readouterr().out
    assert "class weights: balanced, largest class 9.0x the smallest" in out
    assert ev["train"]["steps"] >= 150 and "optim.min_steps=150" in out
    after = ev["after"]
    assert after["per_class"]["neg"]["recall"] > 0 and after["macro_f1"] > 0.5, after["per_class"]
    assert after["macro_f1"] > ev["before"]["macro_f1"]


def test_without_class_weights_the_top_blocks_collapse(make_config, imbalanced):
    """The same run as above without the weights: what the weights prevent (the test above can fail)."""
    data = {s: str(imbalanced / f"{s}.csv") for s in ("train", "validation", "test")}
    cfg = make_config(strategy={"name": "freeze", "train_last_n": 1}, data=data, optim={"min_steps": 150},
                      train={"class_weights": "none"})
    after = tunesmith.train(cfg, quiet=True).eval["after"]
    assert after["per_class"]["neg"]["recall"] == 0 and after["macro_f1"] < 0.5


def test_the_new_head_trains_at_its_own_rate(make_config):
    ev = tunesmith.train(make_config(optim={"lr": 2e-5, "head_lr": 1e-3}), quiet=True).eval
    rates = {g["name"]: g["lr"] for g in ev["optimizer"][0]["groups"]}
    assert rates["head"] == 1e-3 and rates["backbone"] == 2e-5
    alone = tunesmith.train(make_config(strategy={"name": "head-only"}, optim={"lr": 5e-3}, overwrite=True), quiet=True).eval
    assert {g["lr"] for g in alone["optimizer"][0]["groups"]} == {5e-3}  # alone, the head has the stage's rate


def test_the_guard_says_when_fine_tuning_ends_below_the_linear_probe(make_config, capsys):
    # a rate too small to move anything: the fine-tuned model stays at its random head
    cfg = make_config(optim={"lr": 1e-9, "head_lr": 1e-9}, eval={"linear_probe": True})
    ev = tunesmith.train(cfg).eval
    guard = ev["guard"]
    assert guard["worse"] and guard["best_baseline"] == "linear_probe"
    assert guard["tuned"] < guard["baselines"]["linear_probe"] == ev["baseline_validation"]["linear_probe"]["macro_f1"]
    out = capsys.readouterr().out
    assert "warning: the fine-tuned model is worse on validation than the linear probe: macro_f1" in out
    n = ev["data"]["validation"]["rows"]
    assert guard["validation_rows"] == n and f"on {n} validation rows" in guard["message"]
    assert n < 50 and "give data.validation more rows" in guard["message"]  # the tiny fixture: too few to judge
    good = tunesmith.train(make_config(optim={"epochs": 10}, eval={"linear_probe": True}, overwrite=True), quiet=True).eval
    assert not good["guard"]["worse"] and good["guard"]["message"] == "", good["guard"]


@pytest.mark.parametrize("strategy", [{"name": "full"}, {"name": "lora"}])
def test_lp_ft_fits_the_head_on_cached_features_first_and_keeps_the_better_stage(make_config, strategy, capsys):
    """LP-FT by default: a linear-probe stage (feature-extraction, the head's own input cached) then the
    strategy, each with its own rate; the fine-tuned stage stays only if it beats the probe on validation."""
    import json

    res = tunesmith.train(make_config(strategy={**strategy, "lp_ft": True}, optim={"epochs": 4}))
    ev, out = res.eval, capsys.readouterr().out
    assert "stage 1/2: linear probe" in out and "stage 2/2: fine-tune" in out
    from tunesmith.config import StrategyConfig

    rows = ev["data"]["train"]["rows"]  # strategy.soup auto by rows; LoRA's factors do not average
    members = StrategyConfig(name="full").soup_runs(rows) if strategy["name"] == "full" else 1
    assert ev.get("soup", {"members": 1})["members"] == members
    assert [o["strategy"] for o in ev["optimizer"]] == ["feature-extraction"] + [strategy["name"]] * members
    assert ev["optimizer"][0]["lr"] == 1e-2 and ev["features"]["pooling"] == "head"
    evals = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    probe_best = max(e["macro_f1"] for e in evals if e["step"] <= ev["optimizer"][0]["steps"])
    assert ev["validation_best"]["macro_f1"] >= probe_best  # never below its own probe stage on validation
    if strategy["name"] == "full":  # the tiny random model gives LoRA and a probe nothing to work with
        assert ev["after"]["accuracy"] > ev["before"]["accuracy"]
    assert (res.run_dir / "model" / "model.safetensors").exists()


def test_lp_ft_probe_stage_is_where_fine_tuning_starts_not_a_model_it_keeps(make_config, monkeypatch, capsys):
    """LP-FT's probe stage (a head trained on frozen features) is where fine-tuning starts. Against the fine-tuned
    model the logistic regression fitted on the same features stands in for it: the stage's best validation step,
    picked among dozens on a few validation rows a class, is not kept instead of fine-tuning. Without a fitted
    regression to fall back on, the probe stage is compared as before."""
    from tunesmith.loop import run
    from tunesmith.observers import Observer
    from tunesmith.tasks.classification import ClassificationTask

    seen = {}

    class Watch(Observer):
        def fit_end(self, run):
            if run.state.stage == 0:
                seen["probe_best"] = run.state.best_metric

        def fit_start(self, run, stage):
            if run.state.stage == 1:
                seen["previous"], seen["fallback"] = run.previous[0], run.fallback is not None

    # a rate that wrecks fine-tuning: the run must end on the regression, not on the probe stage's head
    cfg = make_config(strategy={"name": "full", "lp_ft": True, "soup": 1}, optim={"lr": 1.0, "head_lr": 1.0, "min_steps": 0})
    ev, out = run(tunesmith.load_config(cfg), observers=[Watch()]).eval, capsys.readouterr().out
    assert seen["fallback"] and seen["previous"] is None and seen["probe_best"] is not None
    assert ev["kept_stage"]["stage"] == "logistic regression" and "kept the previous stage" not in out
    monkeypatch.setattr(ClassificationTask, "probe_head", lambda *a, **k: None)  # no regression: the probe stage competes
    run(tunesmith.load_config({**cfg, "overwrite": True}), observers=[Watch()])
    assert not seen["fallback"] and seen["previous"] == seen["probe_best"]


def test_soup_is_the_mean_of_the_fine_tuning_runs_last_weights(make_config, capsys):
    """strategy.soup: k runs of the fine-tuning stage from the same start (the random streams run on: other
    batches and dropout), each kept as it ends (its best validation step scored, not restored); the model
    validated as the stage's result is the mean of their last weights."""
    import torch

    from tunesmith.loop import run
    from tunesmith.observers import Observer

    lasts, bests, validated, best, copies = [], [], [], {}, []

    class Watch(Observer):
        def fit_end(self, run):
            if run.state.stage == 1:
                lasts.append({n: t.detach().clone() for n, t in run.state_tensors(moving=True).items()})
                bests.append(dict(best))

        def validation_end(self, run, metrics, improved):
            if run.state.stage == 1:
                weights = {n: t.detach().clone() for n, t in run.state_tensors(moving=True).items()}
                validated.append((metrics["macro_f1"], weights))
                copies.append(run.best_state)  # no copy of the best step in a soup's runs: they are not restored
                if improved:
                    best.clear()
                    best.update(weights)

    cfg = tunesmith.load_config(make_config(strategy={"name": "full", "lp_ft": True, "soup": 3}, optim={"epochs": 4}))
    ev, out = run(cfg, observers=[Watch()]).eval, capsys.readouterr().out
    assert ev["soup"]["members"] == 3 and len(ev["soup"]["member_macro_f1"]) == 3 and len(lasts) == 3
    assert ev["soup"]["batch_norm_remeasured"] == 0  # a transformer: no batch norm to measure anew
    assert "model soup: fine-tuning run 3/3" in out and "model soup of 3 fine-tuning runs" in out
    assert "restored the best weights" not in out.split("stage 2/2")[1]  # the runs are not restored to their best step
    probe, tune = ev["optimizer"][0]["steps"], ev["optimizer"][1]["steps"]
    assert ev["train"]["steps"] == probe + 3 * tune
    assert any(not torch.equal(lasts[0][n], lasts[1][n]) for n in lasts[0])  # the runs differ
    assert any(not torch.equal(lasts[i][n], bests[i][n]) for i in range(3) for n in lasts[i])  # and differ from their best steps
    assert copies and all(c is None for c in copies)
    score, soup = validated[-1]  # the last validation of the stage: the soup's
    assert score == pytest.approx(ev["soup"]["macro_f1"]) and soup.keys() == lasts[0].keys()
    # against the probe stage and the fallback the stage counts as the best of its runs and the soup
    assert ev["soup"]["stage_score"] == pytest.approx(max(ev["soup"]["member_macro_f1"] + [score]))
    for n, t in soup.items():
        torch.testing.assert_close(t, sum(w[n] for w in lasts) / 3, atol=1e-6, rtol=1e-6)
    one = tunesmith.train(make_config(strategy={"name": "full", "lp_ft": True, "soup": 1}, optim={"epochs": 4},
                                      overwrite=True), quiet=True).eval
    assert "soup" not in one and one["train"]["steps"] == probe + tune


def test_soup_auto_runs_three_from_100_to_2000_training_rows_and_rejects_zero(make_config):
    from tunesmith.config import StrategyConfig

    auto = StrategyConfig(name="full")
    assert [auto.soup_runs(n) for n in (40, 99, 100, 1999, 2000, 10_000)] == [1, 1, 3, 3, 1, 1]
    assert StrategyConfig(name="full", soup=2).soup_runs(10_000) == 2
    for bad in (0, -1, True):
        with pytest.raises(tunesmith.UserError, match="soup"):
            tunesmith.train(make_config(strategy={"name": "full", "soup": bad}), quiet=True)


def test_a_fitted_probe_is_one_linear_layer_on_the_raw_features():
    """fit_probe folds the standardization into the weights: the layer's logits are scikit-learn's scores
    (binary split as -s/2, s/2; a class without training rows never wins; one-vs-rest for multi-label)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from tunesmith.metrics import ABSENT_LOGIT, fit_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)) * rng.uniform(0.1, 5, size=6) + rng.normal(size=6) * 3
    for k, y in ((2, rng.integers(0, 2, 120)), (4, rng.choice([0, 1, 3], 120))):
        w, b = fit_probe(x, y, k, multi_label=False, c=0.5)
        scaler = StandardScaler().fit(x)
        ref = LogisticRegression(max_iter=2000, C=0.5, random_state=0).fit(scaler.transform(x), y).decision_function(scaler.transform(x))
        logits = x @ w.T + b
        if k == 2:
            np.testing.assert_allclose(logits[:, 1] - logits[:, 0], ref, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_allclose(logits[:, [0, 1, 3]], ref, rtol=1e-6, atol=1e-6)
            assert (logits[:, 2] == ABSENT_LOGIT).all() and (logits.argmax(1) != 2).all()
    multi = rng.integers(0, 2, size=(120, 3))
    w, b = fit_probe(x, multi, 3, multi_label=True)
    assert w.shape == (3, 6) and (((x @ w.T + b) > 0) == multi).mean() > 0.5


def _probe_task(make_config, strategy: str = "feature-extraction"):
    """A text-classification task as the run sets it up, 2 labels, the loss class-weighted (so balanced fits compete)."""
    import torch

    from tunesmith.config import load_config
    from tunesmith.registry import TASKS

    cfg = load_config(make_config(strategy={"name": strategy}))
    task = TASKS.get(cfg.task)(cfg)
    task.labels, task.multi_label, task.class_weight = ["common", "rare"], False, torch.tensor([1.0, 9.0])
    return task


class _Features:
    """What probe_head reads from a split: its pooled features and labels."""

    def __init__(self, x, y):
        import torch

        self.features, self.labels = torch.tensor(x, dtype=torch.float32), torch.tensor(y)

    def __len__(self):
        return len(self.labels)


def test_probe_head_chooses_on_cross_validation_when_validation_is_small(make_config):
    """90/10 training rows; four validation rows of the common class, placed where the classes overlap. On them
    alone the fit at C 0.1 (which calls them all 'common') wins and the linear probe's own fit (C 1, which calls
    them 'rare') scores 0; on 5-fold cross-validation over the 100 training rows together with them, C 1 wins by
    far, as the training rows say it should. From PROBE_CV_BELOW validation rows, the validation rows alone decide;
    a class with one training row leaves no stratified folds to make."""
    import numpy as np

    from tunesmith.metrics import fit_probe
    from tunesmith.tasks import classification

    y = np.array([0] * 90 + [1] * 10)
    x = np.random.default_rng(0).normal(size=(100, 2)) + y[:, None] * 2.0
    val_x = np.full((4, 2), 2.0) + np.random.default_rng(1).normal(scale=0.02, size=(4, 2))
    val_y = np.zeros(4, dtype=int)
    task = _probe_task(make_config)
    w, b, info = task.probe_head(_Features(x, y), _Features(val_x, val_y), seed=0)
    assert (info["C"], info["class_weight"]) == (1.0, None), info
    assert info["chosen_by"]["folds"] == 5 and info["chosen_by"]["rows"] == 104
    assert info["chosen_by"]["macro_f1"] == info["chosen_by"]["linear_probe"] > 0.8
    assert info["macro_f1"] == 0.0  # the score kept is the validation rows' alone
    ref_w, ref_b = fit_probe(x, y, 2, False, 0, 1.0, False)  # fitted on all training rows, not on a fold's
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.numpy(), ref_b, rtol=1e-5, atol=1e-5)
    big = np.repeat(val_x, classification.PROBE_CV_BELOW // 4, axis=0)
    _, _, alone = task.probe_head(_Features(x, y), _Features(big, np.zeros(len(big), dtype=int)), seed=0)
    assert (alone["C"], alone["class_weight"], alone["macro_f1"]) == (0.1, None, 0.5) and "chosen_by" not in alone
    one = np.array([0] * 99 + [1])
    _, _, few = task.probe_head(_Features(x, one), _Features(val_x, val_y), seed=0)
    assert "chosen_by" not in few and few["macro_f1"] == 0.5


def test_guard_takes_the_cross_validated_choice_of_feature_extraction_over_the_probe(make_config):
    """Feature-extraction's head was chosen over the linear probe's own fit on cross-validation with the validation
    rows: the guard does not overrule that on the validation rows alone. A fit set aside and not kept (LP-FT's
    fallback, fine-tuning won), or fitted on tuned features (contrastive's head), is still compared there."""
    chosen_by = {"folds": 5, "rows": 104, "macro_f1": 0.62, "linear_probe": 0.47}
    start = {"installed": True, "starting_features": True, "macro_f1": 0.0, "chosen_by": chosen_by}
    ev = {"validation_best": {"macro_f1": 0.0}, "baseline_validation": {"before": {"macro_f1": 0.0}, "linear_probe": {"macro_f1": 0.5}},
          "features": {"probe_start": start}}
    guard = _probe_task(make_config).guard(ev, 4)
    assert not guard["worse"] and "linear_probe" not in guard["baselines"]
    assert guard["linear_probe_cross_validated"] == {"tuned": 0.62, "linear_probe": 0.47, "rows": 104}
    for other in ({"installed": False}, {"starting_features": False}):
        compared = _probe_task(make_config, "full").guard({**ev, "features": {"probe_start": {**start, **other}}}, 4)
        assert compared["worse"] and compared["best_baseline"] == "linear_probe"


def test_feature_extraction_head_is_the_best_logistic_regression(make_config, capsys):
    """The linear head is the logistic regression best on validation and cross-validation (the linear probe, C=1,
    is one of the candidates), validated once, with no gradient steps after it: the run scores at or above the linear probe
    on validation. Turned off, the head trains from a random start and the first validation follows steps."""
    import json

    res = tunesmith.train(make_config(strategy={"name": "feature-extraction"}, eval={"linear_probe": True}))
    ev, out = res.eval, capsys.readouterr().out
    start = ev["features"]["probe_start"]
    assert start["C"] in (1.0, 0.1, 0.01) and start["rows"] == ev["data"]["train"]["rows"] and start["installed"]
    assert "the stage's result, no gradient steps" in out
    assert "(no optimizer steps)" in out and "samples/s" not in out.split("train: ")[-1]
    evals = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert [e["step"] for e in evals] == [0] and evals[0]["macro_f1"] == pytest.approx(start["macro_f1"], abs=1e-6)
    assert ev["train"]["steps"] == 0 and ev["validation_best"]["macro_f1"] == pytest.approx(start["macro_f1"], abs=1e-6)
    cv = start["chosen_by"]  # the tiny fixture's few validation rows: the choice includes cross-validation
    assert cv["rows"] == ev["data"]["train"]["rows"] + ev["data"]["validation"]["rows"]
    assert cv["macro_f1"] >= cv["linear_probe"]  # the linear probe's own fit is a candidate
    assert not ev["guard"]["worse"] and ev["guard"]["linear_probe_cross_validated"]["linear_probe"] == cv["linear_probe"]
    if start["C"] == 1.0 and not start["class_weight"]:  # the probe itself: the same test numbers
        assert ev["after"]["macro_f1"] == pytest.approx(ev["linear_probe"]["macro_f1"], abs=1e-4)
    off = tunesmith.train(make_config(strategy={"name": "feature-extraction", "probe_start": False}, overwrite=True), quiet=True)
    first = next(json.loads(l) for l in (off.run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l)
    assert first["step"] > 0 and "probe_start" not in off.eval["features"] and off.eval["train"]["steps"] > 0


def test_lp_ft_falls_back_on_the_logistic_regression_when_fine_tuning_ends_below_it(make_config, capsys):
    """A rate too small to move anything and one short probe stage: both end below the logistic regression
    fitted on the probe stage's features, so the run keeps that regression (starting backbone, head set to
    the fit): on test it scores exactly what the linear probe scores, and eval.json says why."""
    cfg = make_config(strategy={"name": "full", "lp_ft": True}, optim={"lr": 1e-9, "head_lr": 1e-9, "epochs": 1, "min_steps": 0},
                      eval={"linear_probe": True})
    ev = tunesmith.train(cfg).eval
    out = capsys.readouterr().out
    kept = ev["kept_stage"]
    assert kept["stage"] == "logistic regression" and kept["macro_f1"] > kept["instead_of"]
    assert "kept the logistic regression on the probe stage's features" in out
    assert ev["validation_best"]["macro_f1"] == pytest.approx(ev["baseline_validation"]["linear_probe"]["macro_f1"], abs=1e-6)
    for m in ("accuracy", "macro_f1", "loss"):
        assert ev["after"][m] == pytest.approx(ev["linear_probe"][m], abs=1e-4), m
    assert not ev["guard"]["worse"]
    assert max(ev["weights_moved"].values()) == 0.0  # the backbone as it started


def test_lp_ft_weighs_the_fallback_by_the_best_fit_on_validation_and_keeps_the_cross_validated_one(make_config, monkeypatch, capsys):
    """Against fine-tuning, the fallback counts as the best validation score of the fits tried (here patched to
    1.0, above anything fine-tuning reaches); the fit installed is the one chosen on cross-validation, and the run
    reports that fit's own validation score. The guard takes the cross-validated choice over the linear probe."""
    from tunesmith.tasks.classification import ClassificationTask

    probe_head = ClassificationTask.probe_head

    def best_fit_scores_one(self, *a, **k):
        w, b, info = probe_head(self, *a, **k)
        return w, b, {**info, "best_on_validation": 1.0}

    monkeypatch.setattr(ClassificationTask, "probe_head", best_fit_scores_one)
    cfg = make_config(strategy={"name": "full", "lp_ft": True}, optim={"epochs": 1, "min_steps": 0}, eval={"linear_probe": True})
    ev = tunesmith.train(cfg).eval
    out = capsys.readouterr().out
    kept, fit = ev["kept_stage"], ev["features"]["probe_start"]
    assert kept["stage"] == "logistic regression" and kept["macro_f1"] == 1.0 > kept["instead_of"]
    assert kept["fit_macro_f1"] == fit["macro_f1"] == ev["validation_best"]["macro_f1"] < 1.0
    assert f"the fit kept, chosen on cross-validation, scores {fit['macro_f1']:.4f}" in out
    assert not ev["guard"]["worse"] and "linear_probe" not in ev["guard"]["baselines"]


@pytest.mark.parametrize("before", [True, False])
def test_lp_ft_probe_stage_leaves_the_test_split_to_the_baselines_and_times_its_stages(make_config, before, capsys):
    """The probe stage caches features of train and validation only: the test split's are computed when the
    baselines read them (eval.before), never for a run that does not (the final evaluation runs the tuned
    model). train.stages_s is the stages' wall time (feature passes, fits, steps, validation): more than the
    optimizer steps' runtime_s, less than the whole call."""
    import time

    t0 = time.perf_counter()
    ev = tunesmith.train(make_config(strategy={"name": "full", "lp_ft": True}, optim={"epochs": 2, "min_steps": 0},
                                     eval={"before": before, "linear_probe": before})).eval
    whole = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert ev["features"]["train"]["rows"] == ev["data"]["train"]["rows"] and "validation" in ev["features"]
    assert ("test" in ev["features"]) == before and ("features: test" in out) == before
    assert 0 < ev["train"]["runtime_s"] < ev["train"]["stages_s"] < whole
    if before:  # the probe's test rows came from that one pass
        assert ev["linear_probe"]["accuracy"] >= 0 and ev["before"]["accuracy"] >= 0
