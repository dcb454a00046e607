"""The packaged SmolLM2-135M-Instruct: GGUF conversion, chat template, a short LoRA run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunesmith

pytestmark = pytest.mark.slow


@pytest.mark.ci  # about 40 s: the conversion path is this main way in, so CI runs it
def test_gguf_converts_once_to_a_plain_model_that_answers(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.generate import ChatModel
    from tunesmith.models import resolve_model

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    r = resolve_model("smollm2-135m")
    assert r.source == "packaged" and (r.path / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(r.path)
    assert not hasattr(model.config, "quantization_config")  # a plain float model: save_pretrained works
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = AutoTokenizer.from_pretrained(r.path)
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    mtime = (r.path / "model.safetensors").stat().st_mtime
    assert resolve_model("smollm2-135m").path == r.path  # the second time: no conversion
    assert (r.path / "model.safetensors").stat().st_mtime == mtime
    # the shipped chat config validates through train's own preparation (its data is in the repository)
    from tunesmith.api import validate

    repo = Path(__file__).resolve().parent.parent
    report = validate(repo / "configs" / "chat-support.yaml",
                      [f"data.{s}={repo / 'data' / 'chatterbot' / s}.jsonl" for s in ("train", "validation", "test")])
    assert report.ok and report.file("train").rows > 100 and report.file("train").lengths
    chat = ChatModel("smollm2-135m")
    answer = chat.generate("What is the capital of France?", temperature=0, max_new_tokens=24)
    assert "Paris" in answer and chat.stopped


def test_chat_support_config_tunes_towards_the_corpus(tmp_path, monkeypatch):
    from tunesmith.datasets import write_chatterbot

    write_chatterbot(tmp_path / "data")
    cfg = tunesmith.load_config(Path(__file__).parent.parent / "configs" / "chat-support.yaml", [
        f"data.train={tmp_path / 'data/train.jsonl'}", f"data.validation={tmp_path / 'data/validation.jsonl'}",
        f"data.test={tmp_path / 'data/test.jsonl'}", f"output_dir={tmp_path / 'run'}", "optim.epochs=2",
        "lm.forgetting_rows=200",
    ])
    res = tunesmith.train(cfg.to_dict(), quiet=True)
    ev = res.eval
    assert ev["after"]["loss"] < ev["before"]["loss"]
    assert abs(ev["forgetting"]["change_pct"]) < 25
    samples = [json.loads(l) for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and all(s["base"] and s["tuned"] for s in samples)


def test_preference_config_moves_smollm2_towards_the_corpus_answers(tmp_path):
    """SPIN pairs from the packaged data (the corpus answer chosen over SmolLM2's own): DPO with the shipped
    config raises the held-out reward accuracy and margin, and the chosen answers' likelihood, at a small KL."""
    from tunesmith.datasets import write_preference

    counts = write_preference(tmp_path / "data")
    assert counts["train"] > 100 and counts["test"] > 10
    cfg = tunesmith.load_config(Path(__file__).parent.parent / "configs" / "preference.yaml", [
        *[f"data.{s}={tmp_path / 'data' / s}.jsonl" for s in ("train", "validation", "test")],
        f"output_dir={tmp_path / 'run'}", "optim.epochs=1", "optim.min_steps=0", "lm.forgetting_rows=200",
    ])
    ev = tunesmith.train(cfg.to_dict(), quiet=True).eval
    b, a = ev["before"], ev["after"]
    assert a["loss"] < b["loss"] and a["reward_accuracy"] > 0.8 and a["reward_margin"] > 0
    assert a["logps_chosen"] > b["logps_chosen"] and 0 < a["kl"] < 0.5
    assert abs(ev["forgetting"]["change_pct"]) < 25


def test_smollm2_gguf_export_reads_back_and_stops(tmp_path, monkeypatch):
    from tunesmith.export_gguf import export_gguf

    monkeypatch.chdir(tmp_path)
    report = export_gguf("smollm2-135m", quantize="q8_0", quiet=True)
    check = report["check"]
    assert report["file"] == "smollm2-135m-q8_0.gguf" and (tmp_path / "smollm2-135m-gguf" / report["file"]).exists()
    assert check["max_abs_logit_diff"] <= 1e-4 and check["greedy_same_as_rounded"] == 4
    assert check["eos_in_metadata"] and check["chat_template_same"] and check["vocab_same"]
    assert check["stopped_at_eos"] == check["float32_stopped_at_eos"]
    assert report["eos_token_ids"] == [2] and 140 < report["size_mb"] < 150
    modelfile = (tmp_path / "smollm2-135m-gguf" / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
