"""Each strategy on the tiny BERT: exact trainable counts, what moved, what stayed bit-identical.

The tiny BERT (hidden 32, 2 blocks, intermediate 64) has, by construction:
embeddings 3,488 = word 34x32 ... + LayerNorm; each block 8,544 = attention 4x(32x32+32) + LN 64
+ intermediate 32x64+64 + output 64x32+32 + LN 64; pooler (the neck) 32x32+32 = 1,056;
the new 2-way head 2x32+2 = 66. Total 21,698.
"""

import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tunesmith
from conftest import make_texts, write_csv
from tunesmith.errors import UserError

BLOCK, NECK, HEAD = 8_544, 1_056, 66
ATTENTION = 4 * (32 * 32 + 32) + 64  # q, k, v, output dense and the attention LayerNorm
TOTAL = 21_698
EMBEDDINGS = TOTAL - 2 * BLOCK - NECK - HEAD


def initial(model_dir):
    from transformers import BertModel

    return {f"bert.{k}": v.clone() for k, v in BertModel.from_pretrained(model_dir).state_dict().items()}


def trained(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def changed(before, after):
    return {k for k, v in before.items() if k in after and not torch.equal(v, after[k])}


def tiny_parts(tiny_model_dir, labels=2):
    from transformers import AutoModelForSequenceClassification

    from tunesmith.strategies.base import ModelParts

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=labels)
    return ModelParts(model, ["classifier.weight", "classifier.bias"])


def strategy(name, **kw):
    from tunesmith.config import StrategyConfig
    from tunesmith.registry import STRATEGIES

    cfg = StrategyConfig(name=name, **kw)
    return STRATEGIES.get(name)(cfg)


# -- layer groups ----------------------------------------------------------------------------------


def test_layer_groups_of_bert(tiny_model_dir):
    g = tiny_parts(tiny_model_dir).layers
    count = lambda names: sum(dict(tiny_parts(tiny_model_dir).model.named_parameters())[n].numel() for n in names)  # noqa: E731
    assert [count(b) for b in g.blocks] == [BLOCK, BLOCK]
    assert count(g.neck) == NECK and count(g.embeddings) == EMBEDDINGS
    assert all(n.startswith("bert.encoder.layer.1.") for n in g.blocks[1])
    assert [name for name, _, _ in g.ordered()] == ["embeddings", "block 0", "block 1", "neck", "head"]


# -- freeze ----------------------------------------------------------------------------------------


def test_freeze_last_block_exact_count_and_frozen_weights_identical(make_config, tiny_model_dir):
    res = tunesmith.train(make_config(strategy={"name": "freeze", "train_last_n": 1}), quiet=True)
    assert res.eval["parameters"]["trainable"] == BLOCK + NECK + HEAD
    before, after = initial(tiny_model_dir), trained(res.run_dir)
    moved = changed(before, after)
    for k in before:
        if k.startswith(("bert.encoder.layer.1.", "bert.pooler.")):
            assert k in moved, f"trainable {k} did not change"
        else:
            assert k not in moved, f"frozen {k} changed"
    assert set(res.eval["weights_moved"]) == {"block 1", "neck"}


def test_freeze_patterns_freeze_attention(make_config, tiny_model_dir):
    res = tunesmith.train(make_config(strategy={"name": "freeze", "freeze_patterns": ["*.attention.*"]}), quiet=True)
    assert res.eval["parameters"]["trainable"] == TOTAL - EMBEDDINGS - 2 * ATTENTION
    before, after = initial(tiny_model_dir), trained(res.run_dir)
    moved = changed(before, after)
    assert not any(".attention." in k or ".embeddings." in k for k in moved)
    assert {k for k in before if ".intermediate." in k} <= moved


@pytest.mark.parametrize("settings, message", [
    ({"name": "freeze", "train_last_n": 3}, "has 2 blocks; use 0..2"),
    ({"name": "freeze", "freeze_patterns": ["*.nothing.*"]}, "'*.nothing.*' matches no parameter"),
    ({"name": "freeze", "freeze_patterns": ["classifier.*"]}, "matches the new head"),
    ({"name": "lora", "lora": {"target_modules": ["q_proj"]}}, "'q_proj' matches no module"),
])
def test_nonsense_that_needs_the_model_fails_before_training(make_config, tmp_path, settings, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.").replace("*", r"\*")):
        tunesmith.train(make_config(strategy=settings), quiet=True)
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.parametrize("settings, message", [
    ({"name": "fulll"}, "unknown strategy 'fulll' (did you mean 'full'?); known: auto, contrastive, feature-extraction, freeze"),
    ({"name": "freeze"}, "needs strategy.train_last_n"),
    ({"name": "full", "train_last_n": 2}, "train_last_n applies to strategy 'freeze'"),
    ({"name": "lora", "layer_decay": 0.8}, "layer_decay combines with full, freeze and gradual-unfreeze"),
    ({"name": "head-only", "l2sp": 0.1}, "l2sp does nothing with strategy 'head-only'"),
    ({"name": "feature-extraction", "replay": {"file": "x.csv"}}, "replay does nothing"),
    ({"name": "full", "head": "mlp"}, "applies to strategy 'feature-extraction'"),
])
def test_nonsense_combinations_fail_at_config_time(settings, message):
    from tunesmith.config import load_config

    with pytest.raises(UserError, match=re.escape(message)):
        load_config({"task": "text-classification", "model": "m", "data": {"train": "t.csv"}, "strategy": settings})


# -- discriminative learning rates -----------------------------------------------------------------


def test_layer_decay_rates_fall_away_from_the_head(tiny_model_dir):
    from tunesmith.config import OptimConfig
    from tunesmith.optim import build_optimizer

    groups = strategy("full", layer_decay=0.5).apply(tiny_parts(tiny_model_dir))
    scales = {g.name: g.lr_scale for g in groups}
    assert scales == {"embeddings": 0.125, "block 0": 0.25, "block 1": 0.5, "neck": 0.5, "head": 1.0}
    assert sum(g.numel for g in groups) == TOTAL
    opt = build_optimizer(groups, OptimConfig(), lr=1e-3)
    by_group: dict[str, float] = {}
    for pg in opt.param_groups:
        by_group[pg["name"]] = pg["lr"]
    order = ["head", "block 1", "block 0", "embeddings"]
    assert [by_group[n] for n in order] == sorted([by_group[n] for n in order], reverse=True)
    assert by_group["embeddings"] == pytest.approx(1e-3 * 0.125)


def test_layer_decay_with_freeze_keeps_only_trainable_groups(tiny_model_dir):
    groups = strategy("freeze", train_last_n=1, layer_decay=0.8).apply(tiny_parts(tiny_model_dir))
    assert [(g.name, g.lr_scale) for g in groups] == [("block 1", 0.8), ("neck", 0.8), ("head", 1.0)]


# -- gradual unfreezing ----------------------------------------------------------------------------


def test_gradual_unfreeze_schedule_by_epoch_and_by_steps(tiny_model_dir):
    parts = tiny_parts(tiny_model_dir)
    s = strategy("gradual-unfreeze")
    s.apply(parts)
    trainable = lambda: sum(p.numel() for p in parts.model.parameters() if p.requires_grad)  # noqa: E731
    seen = []
    for epoch in (1, 2, 3, 4):
        s.update(step=0, epoch=epoch)
        seen.append(trainable())
    assert seen == [HEAD, HEAD + BLOCK + NECK, HEAD + 2 * BLOCK + NECK, HEAD + 2 * BLOCK + NECK]  # embeddings stay frozen

    parts = tiny_parts(tiny_model_dir)
    s = strategy("gradual-unfreeze", unfreeze_every=3, freeze_embeddings=False)
    s.apply(parts)
    seen = []
    for step in range(10):
        s.update(step=step, epoch=1)
        seen.append(trainable())
    assert seen == [HEAD] * 3 + [HEAD + BLOCK + NECK] * 3 + [TOTAL - EMBEDDINGS] * 3 + [TOTAL]


def test_gradual_unfreeze_keeps_optimizer_state_of_weights_already_training(tiny_model_dir):
    from tunesmith.config import OptimConfig
    from tunesmith.optim import build_optimizer

    parts = tiny_parts(tiny_model_dir)
    s = strategy("gradual-unfreeze", unfreeze_every=2)
    groups = s.apply(parts)
    opt = build_optimizer(groups, OptimConfig(), lr=1e-3)
    x = {"input_ids": torch.tensor([[2, 10, 11, 3]]), "labels": torch.tensor([1])}
    for step in range(5):
        s.update(step, epoch=1)
        parts.model(**x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    named = dict(parts.model.named_parameters())
    steps = lambda n: int(opt.state[named[n]]["step"]) if named[n] in opt.state else 0  # noqa: E731
    assert steps("classifier.weight") == 5  # never reset when blocks joined
    assert steps("bert.encoder.layer.1.output.dense.weight") == 3  # joined at step 2
    assert steps("bert.encoder.layer.0.output.dense.weight") == 1  # joined at step 4
    assert steps("bert.embeddings.word_embeddings.weight") == 0


def test_gradual_unfreeze_run(make_config, tiny_model_dir):
    res = tunesmith.train(make_config(strategy={"name": "gradual-unfreeze", "unfreeze_every": 4},
                                      optim={"epochs": 2, "lr": 3e-3}, eval={"every_epoch": False}), quiet=True)
    moved = changed(initial(tiny_model_dir), trained(res.run_dir))
    assert any(k.startswith("bert.encoder.layer.0.") for k in moved)
    assert not any(k.startswith("bert.embeddings.") for k in moved)
    assert res.eval["parameters"]["trainable"] == HEAD
    assert res.eval["parameters"]["trainable_at_end"] == HEAD + 2 * BLOCK + NECK


def test_gradual_unfreeze_after_lp_ft_counts_steps_from_its_own_stage(make_config, capsys):
    """After LP-FT's probe stage the run's step count is well past unfreeze_every: the fine-tuning stage must
    still start from the head alone and unfreeze a block every N of its own steps."""
    every = 5
    res = tunesmith.train(make_config(strategy={"name": "gradual-unfreeze", "unfreeze_every": every, "lp_ft": True},
                                      optim={"epochs": 2, "lr": 3e-3}), quiet=False)
    probe, tune = (o["steps"] for o in res.eval["optimizer"])
    assert probe >= 2 * every and tune > every  # counted from the run's start, every block would join at once
    out = capsys.readouterr().out
    assert f"unfroze block 1 and the neck after {every} step(s) of this stage" in out
    joined = min((tune - 1) // every, 2)
    assert res.eval["parameters"]["trainable_at_end"] == HEAD + joined * BLOCK + (NECK if joined else 0)


# -- LoRA ------------------------------------------------------------------------------------------


def test_lora_trains_adapters_and_head_and_exports_reload_identically(make_config, tiny_model_dir, data_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    res = tunesmith.train(make_config(strategy={"name": "lora"}, optim={"epochs": 4}), quiet=True)
    r = 8
    assert res.eval["parameters"]["trainable"] == 2 * 2 * (r * 32 + 32 * r) + HEAD  # query+value in 2 blocks
    merged_dir, adapter_dir = res.run_dir / "model", res.run_dir / "model" / "adapter"
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    adapter_keys = load_file(str(adapter_dir / "adapter_model.safetensors")).keys()
    assert any("classifier" in k for k in adapter_keys), "the new head must be saved with the adapter"
    # the merged weights differ from the base exactly in the adapted layers and the head
    moved = changed(initial(tiny_model_dir), trained(res.run_dir))
    assert moved == {f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")}
    assert set(res.eval["weights_moved"]) == {"block 0", "block 1"}

    texts = [t for t, _ in make_texts(12, seed=9)]
    tok_ids = tunesmith.load(res.run_dir).tokenizer(texts, padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        a, b = merged(**tok_ids).logits, adapted(**tok_ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # ... and both match what the run measured before saving (test loss in eval.json)
    from tunesmith.metrics import classification_metrics

    test_rows = [l.split(",") for l in (data_dir / "test.csv").read_text().splitlines()[1:]]
    clf = tunesmith.load(res.run_dir)
    logits = clf.logits([t for t, _ in test_rows])
    y = np.array([clf.labels.index(l) for _, l in test_rows])
    assert classification_metrics(logits, y, clf.labels, False)["loss"] == pytest.approx(res.eval["after"]["loss"], abs=1e-5)


def test_dora_and_all_linear_adapt_what_they_say_and_export_merged(make_config, tiny_model_dir, tmp_path):
    """use_dora adds a magnitude per output unit of each adapted weight; all-linear adapts every backbone Linear
    (attention, feed-forward, pooler), never the head; both merge into plain weights that reload to the same logits."""
    from transformers import AutoModelForSequenceClassification

    r = 8
    res = tunesmith.train(make_config(strategy={"name": "lora", "lora": {"use_dora": True}}, optim={"epochs": 3},
                                      output_dir=str(tmp_path / "dora")), quiet=True)
    lora_params = 2 * 2 * (r * 32 + 32 * r)
    assert res.eval["parameters"]["trainable"] == lora_params + 2 * 2 * 32 + HEAD  # + a magnitude of 32 per adapted layer
    assert changed(initial(tiny_model_dir), trained(res.run_dir)) == {
        f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")}
    texts = [t for t, _ in make_texts(8, seed=3)]
    clf = tunesmith.load(res.run_dir)
    ids = clf.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        merged = AutoModelForSequenceClassification.from_pretrained(res.run_dir / "model").eval()(**ids).logits
        in_run = res.model.eval()(**ids).logits
    torch.testing.assert_close(merged, in_run, atol=1e-5, rtol=1e-5)

    res = tunesmith.train(make_config(strategy={"name": "lora", "lora": {"target_modules": "all-linear"}}, optim={"epochs": 2},
                                      output_dir=str(tmp_path / "all")), quiet=True)
    # per block: query, key, value, attention output (32x32), intermediate (32->64), output (64->32); the pooler (32x32)
    per_block = 4 * (r * 32 + 32 * r) + (r * 32 + 64 * r) + (r * 64 + 32 * r)
    assert res.eval["parameters"]["trainable"] == 2 * per_block + (r * 32 + 32 * r) + HEAD
    moved = changed(initial(tiny_model_dir), trained(res.run_dir))
    assert sum(1 for k in moved if k.endswith(".weight")) == 2 * 6 + 1


# -- forgetting guards -----------------------------------------------------------------------------


def test_l2sp_keeps_weights_closer_to_the_start(make_config, tmp_path):
    base = dict(optim={"epochs": 4, "lr": 3e-3, "weight_decay": 0.0}, eval={"every_epoch": False})
    free = tunesmith.train(make_config(**base, output_dir=str(tmp_path / "a")), quiet=True)
    held = tunesmith.train(make_config(strategy={"name": "full", "l2sp": 5.0}, **base, output_dir=str(tmp_path / "b")), quiet=True)
    for group in ("block 0", "block 1", "neck"):
        assert held.eval["weights_moved"][group] < 0.8 * free.eval["weights_moved"][group], group
    logged = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all("l2sp_distance" in r for r in logged if r["type"] == "train")


def test_replay_mixes_a_fraction_of_every_batch(make_config, data_dir):
    write_csv(data_dir / "general.csv", make_texts(40, seed=7))
    res = tunesmith.train(make_config(strategy={"name": "full", "replay": {"file": str(data_dir / "general.csv"), "fraction": 0.2}},
                                      optim={"epochs": 2}), quiet=True)
    # 96 rows in batches of 16 -> 6 batches per epoch; 16 * 0.2 / 0.8 = 4 replay rows each
    assert res.eval["data"]["replay"] == {"rows": 40, "source": str(data_dir / "general.csv"), "samples_seen": 2 * 6 * 4}


def test_replay_with_unknown_label_names_file_and_line(make_config, data_dir):
    write_csv(data_dir / "general.csv", [("great film", "pos"), ("a plot", "meh")])
    with pytest.raises(UserError, match=r"general\.csv:3: label 'meh'"):
        tunesmith.train(make_config(strategy={"name": "full", "replay": {"file": str(data_dir / "general.csv")}}), quiet=True)


# -- feature extraction ----------------------------------------------------------------------------


def test_feature_cache_reused_then_rebuilt_when_data_changes(make_config, tmp_path, data_dir, tiny_model_dir):
    cfg = lambda out: make_config(strategy={"name": "feature-extraction"}, output_dir=str(tmp_path / out))  # noqa: E731
    first = tunesmith.train(cfg("a"), quiet=True).eval["features"]
    assert [first[s]["cached"] for s in ("train", "validation", "test")] == [False, False, False]
    second = tunesmith.train(cfg("b"), quiet=True)
    assert [second.eval["features"][s]["cached"] for s in ("train", "validation", "test")] == [True, True, True]
    assert second.eval["parameters"]["trainable"] == HEAD
    assert changed(initial(tiny_model_dir), trained(second.run_dir)) == set()  # backbone bit-identical
    rows = make_texts(96, seed=1)
    rows[5] = ("a different text entirely", rows[5][1])
    write_csv(data_dir / "train.csv", rows)
    third = tunesmith.train(cfg("c"), quiet=True).eval["features"]
    assert [third[s]["cached"] for s in ("train", "validation", "test")] == [False, True, True]
    assert third["train"]["key"] != first["train"]["key"]
    # another max_length tokenizes differently: a new key too
    fourth = tunesmith.train(make_config(strategy={"name": "feature-extraction"}, train={"max_length": 8},
                                         output_dir=str(tmp_path / "d")), quiet=True).eval["features"]
    assert not fourth["validation"]["cached"]


def test_console_shows_budget_and_progress_only_for_gradient_steps(make_config, capsys):
    """A head fitted in closed form takes no steps: no step budget, no batch-size note, no empty progress bar.
    A stage that does step says its budget once a run, LP-FT's two stages and a soup's runs together."""
    tunesmith.train(make_config(strategy={"name": "feature-extraction"}, optim={"batch_size": 128, "min_steps": 150}))
    fe = capsys.readouterr().out
    assert "the stage's result, no gradient steps" in fe
    assert "budget:" not in fe and "/150 steps" not in fe and "is more than the 96 training rows" not in fe
    tunesmith.train(make_config(strategy={"name": "full", "lp_ft": True}, optim={"batch_size": 128, "min_steps": 4}, overwrite=True))
    full = capsys.readouterr().out
    assert full.count("budget: 3 epoch(s) x 1 steps < optim.min_steps=4: 4 steps") == 1
    assert full.count("optim.batch_size 128 is more than the 96 training rows") == 1
    assert "4/4 steps" in full


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_feature_extraction_model_predicts_what_the_cache_trained(make_config, data_dir, head):
    from tunesmith.metrics import classification_metrics

    res = tunesmith.train(make_config(strategy={"name": "feature-extraction", "head": head}, optim={"epochs": 5}), quiet=True)
    test_rows = [l.split(",") for l in (data_dir / "test.csv").read_text().splitlines()[1:]]
    clf = tunesmith.load(res.run_dir)  # the full model: backbone + trained head, from model/
    logits = clf.logits([t for t, _ in test_rows])
    y = np.array([clf.labels.index(l) for _, l in test_rows])
    m = classification_metrics(logits, y, clf.labels, False)
    assert m["loss"] == pytest.approx(res.eval["after"]["loss"], abs=1e-5)
    if head == "mlp":
        assert res.eval["parameters"]["trainable"] == 32 * 256 + 256 + 256 * 2 + 2
        config = json.loads((res.run_dir / "model" / "config.json").read_text())
        assert config["tunesmith_head"]["type"] == "mlp"


# -- auto ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, params, rows, smallest, blocks, guards, expected", [
    ("cpu", 22_000_000, 90, 45, 6, False, {"name": "feature-extraction"}),
    ("cpu", 22_000_000, 999, 19, 6, False, {"name": "feature-extraction"}),  # the rarest class decides
    ("cpu", 22_000_000, 300, 150, 6, False, {"name": "full"}),
    ("cpu", 22_000_000, 4000, None, 6, False, {"name": "full"}),
    ("cpu", 110_000_000, 4000, 2000, 12, False, {"name": "freeze", "train_last_n": 4, "layer_decay": 0.8}),
    ("cpu", 22_000_000, 60, 10, 6, True, {"name": "full"}),
    ("cuda", 22_000_000, 500, 20, 6, False, {"name": "full", "layer_decay": 0.9}),
    ("cuda", 110_000_000, 200, 5, 12, False, {"name": "feature-extraction"}),
    ("cuda", 1_500_000_000, 5000, 3, 28, False, {"name": "lora"}),
    ("cpu", 500_000_000, 5000, None, 24, False, {"name": "lora"}),
])
def test_auto_picks_as_documented(device, params, rows, smallest, blocks, guards, expected):
    from tunesmith.strategies.auto import decide

    settings, reason = decide(device, params, rows, blocks, guards, smallest)
    assert settings == expected
    assert reason and "\n" not in reason
    if expected["name"] == "feature-extraction":
        assert (f"{rows} training rows" if rows < 100 else f"smallest class has {smallest} training rows") in reason


@pytest.mark.parametrize("rows, smallest, labels, guards, expected", [
    (28, 14, 2, False, "contrastive"),  # 16 rows a class, 2 of them to validation: SetFit's few-shot end
    (58, 29, 2, False, "contrastive"),  # under 100 rows
    (120, 15, 4, False, "contrastive"),  # 100 rows or more, but a class under 20
    (14, 7, 2, False, "feature-extraction"),  # under 10 a class: pairs do not help (measured)
    (116, 58, 2, False, "full"),  # 100 rows and 20 a class: full fine-tuning with LP-FT's fallback (measured)
    (999, 19, 2, False, "feature-extraction"),  # a rare class in a large set is not the few-shot end
    (28, 14, None, False, "feature-extraction"),  # not a sentence encoder
    (28, 14, 2, True, "full"),  # a forgetting guard needs the backbone trained on labels
])
def test_auto_picks_contrastive_for_a_few_shot_sentence_encoder(rows, smallest, labels, guards, expected):
    from tunesmith.strategies.auto import decide

    settings, reason = decide("cpu", 22_000_000, rows, 6, guards, smallest, labels)
    assert settings["name"] == expected
    if expected == "contrastive":
        assert f"on a sentence encoder, {smallest} or more in every class (>= 10)" in reason
        assert "\n" not in reason


def test_auto_chooses_contrastive_on_a_sentence_encoder_and_trains_it(make_config, tiny_model_dir, tmp_path):
    """A model folder with sentence-transformers' mean-pooling config and 48 rows a class: auto runs contrastive."""
    import shutil

    import yaml

    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_model_dir, encoder)
    (encoder / "1_Pooling").mkdir()
    (encoder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    res = tunesmith.train(make_config(model=str(encoder), strategy={"name": "auto", "pairs_per_row": 2}, optim={"lr": None}),
                          quiet=True)
    saved = yaml.safe_load((res.run_dir / "config.yaml").read_text())["strategy"]
    assert saved["name"] == "contrastive" == res.eval["strategy"] and saved["pairs_per_row"] == 2
    assert "the few-shot end" in saved["reason"]
    assert [o["strategy"] for o in res.eval["optimizer"]] == ["contrastive", "feature-extraction"]


def test_auto_run_records_its_choice(make_config):
    import yaml

    res = tunesmith.train(make_config(strategy={"name": "auto"}, optim={"lr": None}), quiet=True)
    saved = yaml.safe_load((res.run_dir / "config.yaml").read_text())["strategy"]
    assert saved["name"] == "feature-extraction" == res.eval["strategy"]
    assert "96 training rows" in saved["reason"]  # the tiny data set: < 100 rows


def test_auto_reads_the_class_balance(make_config, tmp_path):
    """195 training rows, but 15 of the rarer class: feature-extraction, and why."""
    import yaml

    from conftest import make_texts, write_csv

    rows = make_texts(1000, seed=11)
    pos, neg = [r for r in rows if r[1] == "pos"], [r for r in rows if r[1] == "neg"]
    write_csv(tmp_path / "train.csv", pos[:180] + neg[:15])
    write_csv(tmp_path / "test.csv", pos[180:270] + neg[20:30])
    data = {s: str(tmp_path / f"{s}.csv") for s in ("train", "test")}  # the fixture's validation file stays
    res = tunesmith.train(make_config(strategy={"name": "auto"}, data=data, optim={"lr": None}), quiet=True)
    saved = yaml.safe_load((res.run_dir / "config.yaml").read_text())["strategy"]
    assert res.eval["data"]["train"]["rows"] == 195
    assert saved["name"] == "feature-extraction" and "smallest class has 15 training rows (< 20)" in saved["reason"]


# -- lr-find ---------------------------------------------------------------------------------------


def test_lr_find_restores_weights_writes_png_and_feeds_training(make_config, tmp_path, tiny_model_dir):
    from tunesmith.config import load_config
    from tunesmith.loop import run

    png = tmp_path / "plot.png"
    found = run(load_config(make_config(optim={"lr": None}), ["optim.lr_find_steps=40"]), quiet=True, lr_find_only=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 1e-7 <= found["suggested_lr"] <= 1.0 and found["steps"] <= 40
    assert not (tmp_path / "run").exists()  # the range test alone writes no run
    res = tunesmith.train(make_config(optim={"lr": "find", "lr_find_steps": 40, "epochs": 1}, train={"seed": 0}), quiet=True)
    assert res.eval["lr_find"]["suggested_lr"] == pytest.approx(found["suggested_lr"])
    assert (res.run_dir / "lr_find.png").exists()
    # same seed, same fixed lr, no range test: identical weights (the test restored weights and RNG)
    fixed = tunesmith.train(make_config(optim={"lr": found["suggested_lr"], "epochs": 1}, output_dir=str(tmp_path / "fixed")), quiet=True)
    a, b = trained(res.run_dir), trained(fixed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_batch_norm_keeps_its_statistics_in_training_mode():
    from tunesmith.loop import set_train_mode
    from tunesmith.strategies.base import freeze

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model = torch.nn.Sequential(backbone, torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy head
    freeze(list(backbone.named_parameters()))
    before, tracked = backbone[1].running_mean.clone(), backbone[1].num_batches_tracked.item()
    set_train_mode(model)
    assert not backbone.training and model[2].training
    model(torch.randn(8, 3, 8, 8) * 5 + 3)
    assert torch.equal(backbone[1].running_mean, before) and backbone[1].num_batches_tracked.item() == tracked


def test_contrastive_tunes_the_body_on_pairs_then_a_head_and_exports(make_config, tiny_model_dir, data_dir, monkeypatch):
    """SetFit: stage 1 trains every body weight (not the head) on pairs with the cosine loss, validated by a
    logistic regression on its embeddings; stage 2 trains the head on freshly computed mean-pooled features.
    With the loss class-weighted, the pairs are drawn class-balanced (the same pairs here: equal classes)."""
    from tunesmith.strategies.contrastive import PairSet

    draw, asked = PairSet.draw.__func__, []
    monkeypatch.setattr(PairSet, "draw", classmethod(lambda cls, *a: asked.append(a[-1]) or draw(cls, *a)))
    res = tunesmith.train(make_config(strategy={"name": "contrastive", "pairs_per_row": 8, "body_epochs": 2, "pair_batch_size": 12},
                                      optim={"epochs": 2}, train={"class_weights": "balanced"}), quiet=True)
    assert asked == [True]
    ev = res.eval
    stages = [o["strategy"] for o in ev["optimizer"]]
    assert stages == ["contrastive", "feature-extraction"] and ev["strategy"] == "contrastive"
    # 8 partners of each kind per row, 12 pairs a step (pair_batch_size, not optim.batch_size), 2 epochs
    assert ev["optimizer"][0]["steps"] == 2 * math.ceil(96 * 8 * 2 / 12)
    assert {g["name"] for g in ev["optimizer"][0]["groups"]} == {"backbone"}  # with and without weight decay
    log = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    pair_losses = [r["loss"] for r in log if r["type"] == "train" and r["step"] <= ev["optimizer"][0]["steps"]]
    assert np.mean(pair_losses[-4:]) < 0.7 * np.mean(pair_losses[:4])
    moved = changed(initial(tiny_model_dir), trained(res.run_dir))
    assert any(k.startswith("bert.encoder.layer.0.") for k in moved) and "bert.embeddings.word_embeddings.weight" in moved
    assert ev["after"]["accuracy"] >= 0.9 and "kept_stage" not in ev
    # the export (tuned body, head on its mean-pooled output) predicts what the run measured on test
    from tunesmith.metrics import classification_metrics

    test_rows = [l.split(",") for l in (data_dir / "test.csv").read_text().splitlines()[1:]]
    clf = tunesmith.load(res.run_dir)
    y = np.array([clf.labels.index(l) for _, l in test_rows])
    m = classification_metrics(clf.logits([t for t, _ in test_rows]), y, clf.labels, False)
    assert m["loss"] == pytest.approx(ev["after"]["loss"], abs=1e-5)


def test_contrastive_pairs_anchor_every_class_as_often_as_the_largest_where_the_loss_is_weighted():
    """12 rows of one label, 3 of another: SetFit's draw anchors each row once a round, so the rare label's rows
    are paired together 3 times a round against 12; balanced (the task weighs its loss by class), its rows anchor
    in turn until both labels anchor 12. With equal classes the draw is SetFit's, pair for pair."""
    import torch

    from tunesmith.strategies.contrastive import PairSet

    class Rows:
        def __init__(self, labels):
            self.labels, self.lengths = torch.tensor(labels), [5] * len(labels)

    def anchored(pairs, rows):  # same-label pairs a label anchors, per round
        same = pairs.a[pairs.target == 1]
        return [int(np.isin(same, rows_of).sum()) for rows_of in rows]

    base = Rows([0] * 12 + [1] * 3)
    plain, even = PairSet.draw(base, 4, 10_000, seed=0), PairSet.draw(base, 4, 10_000, seed=0, balanced=True)
    assert anchored(plain, [range(12), range(12, 15)]) == [48, 12] and len(plain) == 2 * 15 * 4
    assert anchored(even, [range(12), range(12, 15)]) == [48, 48] and len(even) == 2 * 24 * 4
    assert (base.labels[even.a] == base.labels[even.b])[even.target == 1].all()
    assert (base.labels[even.a] != base.labels[even.b])[even.target == 0].all()
    assert np.bincount(even.a[even.target == 1][even.a[even.target == 1] >= 12] - 12).tolist() == [16, 16, 16]
    equal = Rows([0, 1] * 6)
    a, b = PairSet.draw(equal, 3, 10_000, seed=1), PairSet.draw(equal, 3, 10_000, seed=1, balanced=True)
    assert (a.a == b.a).all() and (a.b == b.b).all() and (a.target == b.target).all()
    capped = PairSet.draw(base, 20, 96, seed=0, balanced=True)  # max_pairs counts the extra anchors too
    assert len(capped) == 2 * 24 * 2
