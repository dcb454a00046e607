"""image-classification on a tiny timm model and tiny generated images: loss falls, the export
reloads with timm alone to identical logits, prediction preprocessing equals evaluation's (and
timm's own transform), frozen batch-norm statistics stay bit-identical, bad images are named."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from test_cli import assert_user_error

COLORS = {"red": (200, 40, 40), "blue": (40, 40, 200), "green": (40, 200, 40)}


def make_images(root, n, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    for c, color in COLORS.items():
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = (rng.normal(0, 30, (*size, 3)) + color).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.fixture
def images(tmp_path):
    make_images(tmp_path / "train", 16, 0)
    make_images(tmp_path / "test", 6, 1)
    return tmp_path


def config(tiny_timm_dir, images, tmp_path, **sections):
    cfg = {"task": "image-classification", "model": str(tiny_timm_dir), "output_dir": str(tmp_path / "run"),
           "data": {"train": str(images / "train"), "test": str(images / "test")},
           "optim": {"epochs": 6, "batch_size": 8, "lr": 3e-3, "min_steps": 0}, "image": {"size": 48},
           "train": {"log_every": 1, "precision": "fp32"}, "eval": {"linear_probe": False, "report": False},
           "strategy": {"lp_ft": False}}  # one stage's exact behaviour; tests/test_defaults.py covers LP-FT
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def test_train_loss_falls_export_reloads_with_timm_alone(tiny_timm_dir, images, tmp_path):
    import timm

    import tunesmith

    result = tunesmith.train(config(tiny_timm_dir, images, tmp_path), quiet=True)
    log = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["type"] == "train"]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    ev = result.eval
    assert ev["after"]["accuracy"] == 1.0 and ev["before"]["accuracy"] < 0.7 and "top3_accuracy" in ev["after"]
    model_dir = tmp_path / "run" / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["README.md", "config.json", "model.safetensors", "preprocessing.json"]
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["label_names"] == ["blue", "green", "red"] and cfg["num_classes"] == 3
    # timm alone: create_model + its own eval transform, as docs/images.md shows
    m = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    tf = timm.data.create_transform(**timm.data.resolve_data_config(model=m))
    files = sorted((images / "test").rglob("*.png"))
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        timm_logits = m(x).numpy()
        trained = result.model.eval()(x.contiguous(memory_format=torch.channels_last)).numpy()
    clf = tunesmith.load(tmp_path / "run")
    np.testing.assert_allclose(clf.logits(files), timm_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(trained, timm_logits, atol=1e-5, rtol=0)
    assert [p.label for p in clf.predict(files)] == [f.parent.name for f in files]
    # `tunesmith eval` on the test folder: the task's own metrics, the same as the run measured
    again = tunesmith.evaluate(tmp_path / "run", str(images / "test"))
    assert again["accuracy"] == ev["after"]["accuracy"] and again["loss"] == pytest.approx(ev["after"]["loss"], rel=1e-4)


def test_prediction_preprocessing_equals_evaluation_and_timm(tiny_timm_dir, images, tmp_path):
    import timm

    from tunesmith.config import load_config
    from tunesmith.predict import ImageClassifier
    from tunesmith.tasks.image_classification import ImageClassification

    odd = tmp_path / "odd"
    odd.mkdir()
    Image.fromarray(np.arange(64 * 80, dtype=np.uint8).reshape(64, 80) % 251).convert("P").save(odd / "palette.png")
    Image.fromarray((np.random.default_rng(0).random((50, 30, 4)) * 255).astype(np.uint8), "RGBA").save(odd / "rgba.png")
    Image.fromarray(np.full((33, 41), 200, np.uint8), "L").save(odd / "gray.jpg")
    files = sorted(odd.iterdir()) + sorted((images / "test" / "red").iterdir())[:2]
    task = ImageClassification(load_config(config(tiny_timm_dir, images, tmp_path)))
    task.load_tokenizer(task.resolve())
    task._decode_all(files)
    from tunesmith.data.images import ImageSet

    enc = task.encode(ImageSet("test", "x", files, [None] * len(files), [str(f) for f in files]))
    evaluated = task.collate(enc, list(range(len(files))), train=False)["x"]
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_timm_dir, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["pretrained_cfg"].update(task.export_data_config())
    (model_dir / "config.json").write_text(json.dumps(cfg))
    predicted = ImageClassifier(model_dir).preprocess(files)
    assert torch.equal(evaluated, predicted)
    tf = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg["pretrained_cfg"]))
    reference = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    torch.testing.assert_close(predicted.contiguous(), reference, atol=1e-6, rtol=0)


def test_16_bit_images_are_scaled_not_clipped():
    from tunesmith.data.images import to_rgb

    a = np.linspace(0, 65535, 256 * 4, dtype=np.uint16).reshape(4, 256)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (4, 256, 3) and rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    assert 120 < rgb[2, 0, 0] < 136  # the middle of the range stays grey (Pillow's own conversion: white)


@pytest.mark.parametrize("strategy", [{"name": "freeze", "train_last_n": 1}, {"name": "head-only"}], ids=["freeze", "head-only"])
def test_frozen_batch_norm_statistics_stay_bit_identical(tiny_timm_dir, images, tmp_path, strategy):
    import tunesmith

    result = tunesmith.train(config(tiny_timm_dir, images, tmp_path, strategy=strategy, optim={"epochs": 2}), quiet=True)
    start = load_file(str(tiny_timm_dir / "model.safetensors"))
    after = {k: v for k, v in result.model.state_dict().items()}
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    last = max(int(k.split(".")[1]) for k in start if k.startswith("blocks."))
    frozen = [k for k in stats if not (strategy["name"] == "freeze" and k.startswith(f"blocks.{last}."))
              and not k.startswith(("conv_head", "bn2"))]
    assert frozen and all(torch.equal(start[k], after[k]) for k in frozen)
    if strategy["name"] == "freeze":  # ... while the trained block's statistics did move
        assert any(not torch.equal(start[k], after[k]) for k in stats if k.startswith(f"blocks.{last}."))


def test_best_weights_come_back_with_their_batch_norm_statistics(tiny_timm_dir, images, tmp_path):
    """After the first evaluation the head is turned upside down (a rate too small to undo it), so that
    evaluation stays the best while every later training forward pass still moves the running statistics.
    The model kept is the first evaluation's, weights and statistics alike (weights from one step with
    statistics from another would be a model nobody trained)."""
    import tunesmith
    from tunesmith.loop import run
    from tunesmith.observers import Observer

    class Snapshot(Observer):
        def __init__(self):
            self.at = {}

        def validation_end(self, run, metrics, improved):
            model = run.view.model
            self.at[run.state.step] = {n: b.clone() for n, b in model.named_buffers() if n.endswith("running_mean")}
            if len(self.at) == 1:
                with torch.no_grad():
                    model.get_classifier().weight.mul_(-5.0)

    snap = Snapshot()
    cfg = config(tiny_timm_dir, images, tmp_path, optim={"epochs": 2, "lr": 1e-12, "head_lr": 1e-12}, train={"metric": "loss"})
    result = run(tunesmith.load_config(cfg), quiet=True, observers=[snap])
    first, last = min(snap.at), max(snap.at)
    assert result.eval["validation_best"]["step"] == first < last
    after = dict(result.model.named_buffers())
    assert any(not torch.equal(snap.at[first][n], snap.at[last][n]) for n in snap.at[first])  # the statistics moved
    assert all(torch.equal(after[n], snap.at[first][n]) for n in snap.at[first])  # ... and came back with the best weights


def test_feature_extraction_caches_and_reloads(tiny_timm_dir, images, tmp_path):
    import tunesmith

    cfg = config(tiny_timm_dir, images, tmp_path, strategy={"name": "feature-extraction"}, optim={"epochs": 20, "lr": 3e-2})
    first = tunesmith.train(cfg, quiet=True)
    assert not first.eval["features"]["train"]["cached"]
    cfg["overwrite"] = True
    second = tunesmith.train(cfg, quiet=True)
    assert second.eval["features"]["train"]["cached"]
    assert second.eval["after"]["accuracy"] == first.eval["after"]["accuracy"]
    assert second.eval["after"]["loss"] == pytest.approx(first.eval["after"]["loss"], abs=1e-6)
    assert first.eval["after"]["accuracy"] >= 0.9
    clf = tunesmith.load(tmp_path / "run")
    files = sorted((images / "test").rglob("*.png"))
    assert np.mean([p.label == f.parent.name for p, f in zip(clf.predict(files), files)]) == first.eval["after"]["accuracy"]


def test_predict_cli_folder_to_csv_with_top_k(tiny_timm_dir, images, tmp_path, run_cli):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(config(tiny_timm_dir, images, tmp_path, optim={"epochs": 1})))
    assert run_cli("train", p, "--quiet").returncode == 0
    proc = run_cli("predict", tmp_path / "run", images / "test", "--top-k", "2", "--output", tmp_path / "p.csv")
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "path,label,p,label_2,p_2" and len(lines) == 1 + 18


def test_bad_images_named_one_line_exit_2_or_skipped_and_counted(tiny_timm_dir, images, tmp_path, run_cli):
    p = tmp_path / "c.yaml"
    broken = images / "train" / "red" / "broken.png"
    good = (images / "train" / "red" / "0.png").read_bytes()
    broken.write_bytes(good[: len(good) // 2])  # a truncated PNG
    (images / "train" / "blue" / "notes.txt").write_text("not an image")
    p.write_text(yaml.safe_dump(config(tiny_timm_dir, images, tmp_path, optim={"epochs": 1})))
    proc = run_cli("train", p)
    assert_user_error(proc, "2 bad image(s)/row(s)", str(broken), "notes.txt")
    assert not (tmp_path / "run").exists()
    proc = run_cli("validate", p, "data.bad_rows=skip")
    assert proc.returncode == 0 and "2 row(s) skipped" in proc.stdout and str(broken) in proc.stdout
    proc = run_cli("train", p, "data.bad_rows=skip", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["data_report"]["files"][0]["bad_rows"] == 2


def test_image_data_errors(tiny_timm_dir, images, tmp_path, run_cli):
    p = tmp_path / "c.yaml"

    def run(**data):
        p.write_text(yaml.safe_dump(config(tiny_timm_dir, images, tmp_path, data=data)))
        return run_cli("validate", p)

    (images / "train" / "empty").mkdir()
    assert_user_error(run(), "class folder has no images", "empty")
    shutil.rmtree(images / "train" / "empty")
    one = tmp_path / "one"
    shutil.copytree(images / "train" / "red", one / "red")
    assert_user_error(run(train=str(one)), "only one class ('red')")
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\n" + "".join(f"train/red/{i}.png,red\ntrain/blue/{i}.png,blue\n" for i in range(8))
                       + "train/red/missing.png,red\n")
    assert_user_error(run(train=str(listing)), f"{listing}:18: image not found")
    assert_user_error(run(train=str(images / "train" / "red" / "0.png")), "image data is a folder")
    listing.write_text("file,label\n")
    assert_user_error(run(train=str(listing)), "no column 'path' (set by data.image_column)")
    p.write_text(yaml.safe_dump(config(tiny_timm_dir, images, tmp_path, strategy={"name": "lora"})))
    assert_user_error(run_cli("validate", p), "strategy lora is not available for image-classification")


def test_batch_norm_statistics_are_measured_anew_as_a_plain_average():
    """recompute_batch_norm: the running mean becomes the plain average of the batches' means (momentum None),
    with dropout off while it measures; momenta come back; a frozen (eval-mode) batch norm is not among the
    layers that train."""
    from torch import nn

    from tunesmith.models.layers import recompute_batch_norm, training_batch_norms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    model.train()
    model[3].eval()  # frozen, as the loop keeps a fully frozen module
    norms = training_batch_norms(model)
    assert norms == [model[1]]
    model[1].running_mean.fill_(7.0)
    frozen = model[3].running_mean.clone()
    batches = [torch.randn(8, 4) * 3 + i for i in range(3)]
    recompute_batch_norm(model, norms, lambda: [model(b) for b in batches])
    expected = torch.stack([b.mean(0) for b in batches]).mean(0)  # dropout off: the inputs as they are
    torch.testing.assert_close(model[1].running_mean, expected)
    torch.testing.assert_close(model[1].running_var, torch.stack([b.var(0) for b in batches]).mean(0))
    assert model[1].momentum == 0.1 and int(model[1].num_batches_tracked) == 3
    assert torch.equal(model[3].running_mean, frozen)


def test_image_soup_measures_its_batch_norm_statistics_anew(tiny_timm_dir, images, tmp_path, capsys):
    """A model soup of a CNN: the averaged weights get statistics measured on the training rows, not the
    average of the runs' statistics; the export carries them."""
    import tunesmith

    cfg = config(tiny_timm_dir, images, tmp_path, optim={"epochs": 2}, strategy={"lp_ft": True, "soup": 2})
    result = tunesmith.train(cfg)
    out = capsys.readouterr().out
    n = sum(1 for m in result.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    soup = result.eval["soup"]
    assert soup["members"] == 2 and soup["batch_norm_remeasured"] == n > 0
    assert f"the statistics of {n} batch-norm layers measured anew on the {result.eval['data']['train']['rows']} training rows" in out
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    name = next(k for k, m in result.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    # one pass over the training rows in batches of 8 (the runs' own count would be their optimizer steps)
    assert int(saved[f"{name}.num_batches_tracked"]) == -(-result.eval["data"]["train"]["rows"] // 8)


def test_a_run_starts_from_an_earlier_runs_model_and_keeps_its_head_for_the_same_classes(tiny_timm_dir, images, tmp_path):
    """An earlier run's model/ as `model` (fine-tune again): the same classes keep the trained head, so the
    starting model is the first run's (its test loss to float tolerance); other classes get timm's new head."""
    import tunesmith

    first = tunesmith.train(config(tiny_timm_dir, images, tmp_path), quiet=True)
    again = tunesmith.train(config(tiny_timm_dir, images, tmp_path, model=str(first.run_dir / "model"),
                                   output_dir=str(tmp_path / "again"), optim={"epochs": 1}), quiet=True)
    assert again.eval["before"]["loss"] == pytest.approx(first.eval["after"]["loss"], abs=1e-5)
    two = tmp_path / "two"
    for split in ("train", "test"):
        for c in ("red", "blue"):
            shutil.copytree(images / split / c, two / split / f"{c}-2")
    other = tunesmith.train(config(tiny_timm_dir, images, tmp_path, model=str(first.run_dir / "model"),
                                   output_dir=str(tmp_path / "other"), optim={"epochs": 1},
                                   data={"train": str(two / "train"), "test": str(two / "test")}), quiet=True)
    assert other.eval["labels"] == ["blue-2", "red-2"]
    assert len(load_file(str(other.run_dir / "model" / "model.safetensors"))["classifier.bias"]) == 2
