"""`tunesmith export`: ONNX for text and image classifiers (Optimum's layout, parity with PyTorch,
int8), GGUF for Llama chat models (read back by transformers, same greedy answers, chat template
and EOS in the metadata), and the exports refused or failed with nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tunesmith
from conftest import make_texts, text_config, write_text_data


@pytest.fixture(scope="module")
def text_run(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-text")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_CACHE", str(root / "cache"))
        # feature-extraction with an MLP head on mean-pooled features: a head plain from_pretrained cannot rebuild
        cfg = text_config(tiny_model_dir, write_text_data(root / "data"), root / "run", optim={"epochs": 4, "lr": 1e-2},
                          strategy={"name": "feature-extraction", "head": "mlp", "pooling": "mean"})
        tunesmith.train(cfg, quiet=True)
    return root / "run"


def test_onnx_text_export_matches_pytorch_in_optimums_layout(text_run, run_cli):
    import onnx
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    from tunesmith.predict import load

    r = run_cli("export", text_run, "--format", "onnx", "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    out = text_run / "onnx"
    assert {"model.onnx", "model_quantized.onnx", "config.json", "export.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    info = json.loads((out / "export.json").read_text())
    assert info["parity"]["max_abs_logit_diff"] < 1e-4 and info["parity"]["label_agreement"] == 1.0
    assert info["parity"]["samples"] == 32  # the run's test file
    assert info["parity_int8"]["label_agreement"] >= 0.95
    # what Optimum's ORTModelForSequenceClassification reads: config, tokenizer, these names, dynamic axes
    assert AutoConfig.from_pretrained(out).num_labels == 2 and AutoTokenizer.from_pretrained(out)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert all(dims), dims  # batch and sequence both symbolic
    texts = [t for t, _ in make_texts(40, seed=11)]
    want = load(text_run).logits(texts, 7)
    got = load(text_run, onnx=True).logits(texts, 7)
    assert np.abs(want - got).max() < 1e-4
    # the raw session on one odd-sized batch, no tunesmith code in between
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(texts[:5], padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(out / "model.onnx"))
    raw = sess.run(["logits"], {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
    assert np.abs(raw - load(text_run).logits(texts[:5], 5)).max() < 1e-4
    p = run_cli("predict", text_run, texts[0], "--onnx")
    t = run_cli("predict", text_run, texts[0])
    assert p.returncode == 0 and p.stdout.split("\t")[0] == t.stdout.split("\t")[0]
    assert run_cli("predict", text_run, texts[0], "--int8").returncode == 0


def test_an_export_beyond_tolerance_fails_and_writes_nothing(text_run, tmp_path, run_cli, monkeypatch):
    import tunesmith.export_onnx as ex

    monkeypatch.setattr(ex, "FLOAT_ATOL", -1.0)  # no export can pass
    r = run_cli("export", text_run, "--format", "onnx", "--output", tmp_path / "x")
    assert r.returncode == 2 and "does not match the PyTorch model" in r.stderr and "nothing was written" in r.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_onnx_image_export_matches_pytorch(tiny_timm_dir, tmp_path):
    from test_images import config, make_images

    from tunesmith.export_onnx import export_onnx
    from tunesmith.predict import load

    make_images(tmp_path / "train", 8, 0)
    make_images(tmp_path / "test", 3, 1)
    tunesmith.train(config(tiny_timm_dir, tmp_path, tmp_path, optim={"epochs": 2}), quiet=True)
    with pytest.raises(tunesmith.UserError, match="int8 is for text classifiers"):
        export_onnx(tmp_path / "run", quantize="int8", quiet=True)
    report = tunesmith.export(tmp_path / "run", "onnx")
    assert report["parity"]["max_abs_logit_diff"] < 1e-4 and report["parity"]["samples"] == 9
    files = sorted((tmp_path / "test").rglob("*.png"))
    want = [p.label for p in load(tmp_path / "run").predict(files)]
    assert [p.label for p in load(tmp_path / "run", onnx=True).predict(files)] == want
    from fastapi.testclient import TestClient

    from tunesmith.serve import build_app

    with TestClient(build_app(tmp_path / "run", onnx=True)) as client:  # serve --onnx on an image run
        r = client.post("/v1/classify", files=[("image", (f.name, f.read_bytes(), "image/png")) for f in files])
        assert r.status_code == 200 and [x["label"] for x in r.json()["results"]] == want
        assert client.get("/health").json()["backend"] == "onnxruntime"


def test_exports_refuse_the_wrong_kind_of_run(text_run, tiny_llama_dir, tmp_path, run_cli):
    r = run_cli("export", text_run, "--format", "gguf")
    assert r.returncode == 2 and "Llama-family" in r.stderr and "--format onnx" in r.stderr
    r = run_cli("export", tiny_llama_dir, "--format", "onnx")
    assert r.returncode == 2 and "language model" in r.stderr
    r = run_cli("export", text_run, "--format", "onnx", "--quantize", "q8_0")
    assert r.returncode == 2 and "--quantize q8_0 is for gguf" in r.stderr
    r = run_cli("predict", tmp_path, "text", "--onnx")
    assert r.returncode == 2 and "no ONNX export" in r.stderr
    (tmp_path / "keep.txt").write_text("mine")
    r = run_cli("export", text_run, "--format", "onnx", "--output", tmp_path)
    assert r.returncode == 2 and "not an earlier ONNX export" in r.stderr and (tmp_path / "keep.txt").exists()


@pytest.mark.parametrize("quantize", ["f16", "q8_0"])
def test_gguf_export_reads_back_with_the_same_answers_template_and_eos(tiny_llama_dir, tmp_path, quantize):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.export_gguf import export_gguf

    report = export_gguf(tiny_llama_dir, tmp_path / "g", quantize=quantize, quiet=True)
    check = report["check"]
    assert check["max_abs_logit_diff"] <= 1e-4 and check["greedy_same_as_rounded"] == check["prompts"] == 4
    assert check["chat_template_same"] and check["eos_in_metadata"] and check["vocab_same"]
    path = tmp_path / "g" / report["file"]
    reader = gguf.GGUFReader(str(path))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tok.convert_tokens_to_ids("<|im_end|>")
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == quantize.upper()
    assert "output.weight" not in types  # tied to token_embd, as llama.cpp writes it
    modelfile = (tmp_path / "g" / "Modelfile").read_text()
    assert f"FROM ./{report['file']}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=report["file"])
    assert loaded.config.num_key_value_heads == 2 and loaded.config.vocab_size == len(tok)


def test_a_wrong_gguf_layout_is_caught_and_nothing_is_kept(tiny_llama_dir, tmp_path, monkeypatch, run_cli):
    import tunesmith.export_gguf as ex

    monkeypatch.setattr(ex, "permute", lambda w, n_head: w)  # forget llama.cpp's q/k row order
    r = run_cli("export", tiny_llama_dir, "--format", "gguf", "--output", tmp_path / "g")
    assert r.returncode == 2 and "does not reproduce" in r.stderr and "logits differ" in r.stderr
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.tmp-*"))
