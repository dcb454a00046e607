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
    # 540 training rows: LP-FT, then a soup of 3 fine-tuning runs (strategy.soup auto), each one epoch
    res = tunesmith.train({**config(rotten, tmp_path / "run"), "optim": {"lr": 1e-4, "epochs": 1, "batch_size": 16, "min_steps": 0}})
    out = capsys.readouterr().out
    ev = res.eval
    assert ev["soup"]["members"] == 3 and "model soup of 3 fine-tuning runs" in out
    # the checkpoint has BERT's pooler: only the classifier is new; a sentence-transformers model
    # classifies from the mean token, so the pooler (384 x 384 + 384) is replaced by the mean
    assert "head: new 2-way head (classifier.weight, classifier.bias)" in out
    assert f"{22_713_986 - 384 * 385:,} trainable, 0 frozen" in out
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


@pytest.mark.ci  # 5 seconds: the default run (and CI) includes it
def test_packaged_efficientnet_labels_sample_photos_as_imagenet_would(tmp_path, monkeypatch):
    """The mapped EfficientNet-Lite0 weights, before any fine-tuning: scikit-image's cat photo in a
    cat class, its coffee photo as espresso (or cup); the labels come from timm's ImageNet info."""
    import importlib.util
    from pathlib import Path

    import timm
    import torch
    from PIL import Image

    from tunesmith.data.images import Preprocess, center_crop, decode, normalize
    from tunesmith.models.timm_models import create_model, resolve_image_model

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    resolved = resolve_image_model("efficientnet-lite0", None)  # converts the package's .pth once
    model = create_model(resolved, allow_pickle=False).eval()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    names = json.loads((resolved.path / "config.json").read_text())["label_names"]
    pre = Preprocess.from_timm(timm.data.resolve_data_config(model=model))
    photos = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    tf = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    top = {}
    for name in ("chelsea", "coffee"):
        x = normalize(center_crop(decode(photos / f"{name}.png", pre), pre.size)[None], pre)
        torch.testing.assert_close(x.contiguous(), tf(Image.open(photos / f"{name}.png").convert("RGB"))[None], atol=1e-6, rtol=0)
        with torch.no_grad():
            p = model(x).softmax(-1)[0]
        top[name] = names[int(p.argmax())]
    assert top["chelsea"] in ("tiger cat", "tabby, tabby cat", "Egyptian cat"), top
    assert top["coffee"] in ("espresso", "cup"), top


@pytest.mark.ci  # a few seconds: validate must accept what train accepts, packaged image model included
def test_validate_accepts_the_shipped_image_and_text_configs(rotten, tmp_path, monkeypatch, capsys):
    """`tunesmith validate` goes through train's own preparation: the packaged EfficientNet-Lite0 on a
    folder of PNGs and the packaged MiniLM on CSV files both pass (validate once rejected the first)."""
    from pathlib import Path

    from tunesmith.cli import main
    from tunesmith.datasets import write_digits

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    configs = Path(__file__).resolve().parent.parent / "configs"
    write_digits(tmp_path / "digits", 5, 3)
    assert main(["validate", str(configs / "digits.yaml"), f"data.train={tmp_path / 'digits/train'}",
                 f"data.test={tmp_path / 'digits/test'}"]) == 0
    data = [f"data.train={rotten / 'train.csv'}", "data.validation=null", f"data.test={rotten / 'test.csv'}"]
    assert main(["validate", str(configs / "sentiment.yaml"), *data]) == 0
    out = capsys.readouterr().out
    assert out.count("is ready to train") == 2


def test_minilm_onnx_export_matches_pytorch_and_int8_keeps_the_labels(rotten, tmp_path):
    from tunesmith.export_onnx import export_onnx

    res = tunesmith.train(config(rotten, tmp_path / "run", name="feature-extraction"), quiet=True)
    report = export_onnx(res.run_dir, quantize="int8", quiet=True)
    assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert report["parity"]["max_abs_logit_diff"] < 1e-4 and report["parity"]["samples"] == 64
    assert report["parity_int8"]["label_agreement"] >= 0.95
    texts = ["A gripping, beautifully acted film.", "A dull, lifeless and tedious mess.", "fine"]
    torch_probs = [p.probabilities for p in tunesmith.load(res.run_dir)(texts)]
    onnx_probs = [p.probabilities for p in tunesmith.load(res.run_dir, onnx=True)(texts)]
    assert all(abs(a[k] - b[k]) < 1e-5 for a, b in zip(torch_probs, onnx_probs) for k in a)
