"""Tiny models and data built in code: nothing is downloaded, every test runs in seconds."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub


@pytest.fixture(autouse=True)
def _feature_cache(tmp_path, monkeypatch):
    """Feature caches go to the test's own directory, never ~/.cache."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))

POS = "great superb lovely moving brilliant delightful charming fresh witty wonderful".split()
NEG = "dull boring awful tedious clumsy bland messy stale weak terrible".split()
NEU = "the a film movie story plot actor scene script director it was is and of this".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_texts(n: int, seed: int, classes: tuple[str, ...] = ("pos", "neg")) -> list[tuple[str, str]]:
    """Synthetic reviews whose label is decided by which sentiment words they contain."""
    rng = random.Random(seed)
    words = {"pos": POS, "neg": NEG, "neu": NEU}
    pools = [POS, NEG, NEU]
    for i, c in enumerate(classes):  # any other class name gets a word pool of its own
        words.setdefault(c, pools[i % 3])
    rows = []
    for i in range(n):
        label = classes[i % len(classes)]
        k = rng.randint(3, 14)
        toks = [rng.choice(NEU) for _ in range(k)] + [rng.choice(words[label]) for _ in range(rng.randint(1, 3))]
        rng.shuffle(toks)
        rows.append((" ".join(toks), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label"), delimiter=",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT, hidden size 32, with a word-level tokenizer, saved in Hugging Face format."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = SPECIAL + sorted(set(POS + NEG + NEU))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # exact comparisons across runs
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_timm_dir(tmp_path_factory) -> Path:
    """timm's test_efficientnet (356k parameters, batch norm), random weights, as a timm directory."""
    import timm
    import torch

    d = tmp_path_factory.mktemp("tiny-timm")
    torch.manual_seed(0)
    timm.models.save_for_hf(timm.create_model("test_efficientnet", pretrained=False), str(d), safe_serialization=True)
    return d


@pytest.fixture
def run_cli(capsys):
    """The command line in this process: the same (returncode, stdout, stderr) as a subprocess, without
    the 3-4 s of a Python start-up per call. The subprocess form (test_cli.cli) stays where the process
    itself is under test: end to end, signals, exit codes from the shell."""
    from types import SimpleNamespace

    from tunesmith.cli import main

    def call(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)

    return call


def write_text_data(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    write_csv(d / "train.csv", make_texts(96, seed=1))
    write_csv(d / "validation.csv", make_texts(32, seed=2))
    write_csv(d / "test.csv", make_texts(32, seed=3))
    return d


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return write_text_data(tmp_path / "data")


def text_config(model_dir: Path, data_dir: Path, out: Path, **sections) -> dict:
    """A config dict for the tiny model and data; keyword sections update it."""
    cfg = {
        "task": "text-classification",
        "model": str(model_dir),
        "data": {k: str(data_dir / f"{k}.csv") for k in ("train", "validation", "test")},
        # lp_ft off: these tests pin one stage's exact behaviour; tests/test_defaults.py covers LP-FT
        "strategy": {"name": "full", "lp_ft": False},
        "optim": {"lr": 3e-3, "batch_size": 16, "epochs": 3, "warmup": 0, "min_steps": 0},
        # fp32 everywhere: exact comparisons must not depend on whether this CPU has fast bf16
        "train": {"max_length": 32, "seed": 0, "log_every": 1, "precision": "fp32"},
        # report.html off (0.4-3 s a run): tests/test_run_report.py covers it
        "eval": {"linear_probe": False, "report": False},
        "output_dir": str(out),
    }
    return with_sections(cfg, sections)


def with_sections(cfg: dict, sections: dict) -> dict:
    """`cfg` with each keyword section merged into its own (a dict) or set (a value)."""
    for k, v in sections.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    return cfg


@pytest.fixture
def make_config(tiny_model_dir, data_dir, tmp_path):
    """A config dict for the tiny model and data; keyword sections update it."""
    return lambda **sections: text_config(tiny_model_dir, data_dir, tmp_path / "run", **sections)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LM_CORPUS = [
    "how do I reset my password", "use the reset link on the login page", "my printer is offline",
    "turn the printer off and on again", "the wifi keeps dropping", "move closer to the router",
    "hello there", "hi, how can I help", "what is the capital of france", "paris is the capital of france",
    "the quick brown fox jumps over the lazy dog", "support team answers every ticket within a day",
]


def make_chat_rows() -> list[dict]:
    """Question/answer conversations the tiny model can memorise."""
    pairs = [(LM_CORPUS[i], LM_CORPUS[i + 1]) for i in range(0, 10, 2)]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer and a ChatML chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(LM_CORPUS * 3 + ["user assistant system\n"] * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def lm_data_dir(tmp_path) -> Path:
    d = tmp_path / "lmdata"
    d.mkdir()
    rows = make_chat_rows()
    write_jsonl(d / "train.jsonl", rows * 8)
    write_jsonl(d / "validation.jsonl", rows[:2])
    write_jsonl(d / "test.jsonl", rows[2:])
    return d


@pytest.fixture
def make_lm_config(tiny_llama_dir, lm_data_dir, tmp_path):
    def make(**sections) -> dict:
        cfg = {
            "task": "causal-lm",
            "model": str(tiny_llama_dir),
            "data": {k: str(lm_data_dir / f"{k}.jsonl") for k in ("train", "validation", "test")},
            "strategy": {"name": "full"},
            "optim": {"lr": 3e-3, "batch_size": 4, "epochs": 3, "warmup": 0, "min_steps": 0},
            "train": {"max_length": 64, "seed": 0, "log_every": 1, "precision": "fp32"},
            "lm": {"forgetting": None, "max_new_tokens": 24},
            "eval": {"report": False},
            "output_dir": str(tmp_path / "lmrun"),
        }
        return with_sections(cfg, sections)

    return make
