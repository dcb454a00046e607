"""Labelled text: rows -> (text, label) examples, label maps, stratified splits.

Bad rows (malformed lines, empty or non-string text, a missing label) either stop the run with
their line numbers (`data.bad_rows: error`, the default) or are skipped and counted (`skip`).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunesmith.data.readers import Table, read_table
from tunesmith.errors import UserError, did_you_mean

if TYPE_CHECKING:  # type hints only: config imports nothing of data/ and data/ nothing of config
    from tunesmith.config import DataConfig


@dataclass
class TextSet:
    name: str  # train | validation | test
    source: str  # the file, or "split from <file>"
    texts: list[str]
    pairs: list[str] | None
    labels: list[Any]  # str, or list[str] for multi-label; None when unlabelled
    where: list[str]  # file:line of each example
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file:line, problem) of each skipped row
    released: int | None = None  # rows, once the texts are dropped (see `release`)

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def __len__(self) -> int:
        return self.released if self.released is not None else len(self.texts)

    def release(self) -> None:
        """Drop the texts and their file:line once the set is tokenized: training reads only the token ids,
        and a run's memory should not grow with the size of the corpus (benchmarks/bench_memory.py)."""
        self.released = len(self)
        self.texts, self.where = [], []
        self.pairs = [] if self.pairs is not None else None

    def subset(self, idx: list[int], name: str, source: str) -> "TextSet":
        return TextSet(
            name,
            source,
            [self.texts[i] for i in idx],
            [self.pairs[i] for i in idx] if self.pairs is not None else None,
            [self.labels[i] for i in idx],
            [self.where[i] for i in idx],
        )


def require_column(table: Table, column: str, key: str) -> None:
    if column not in table.columns:
        raise UserError(
            f"{table.path}: no column '{column}' (set by data.{key}){did_you_mean(column, table.columns)}; "
            f"columns in the file: {', '.join(table.columns) or '(none)'}"
        )


def label_value(value: Any, separator: str | None) -> Any:
    """Normalise a label cell: str for single-label, list[str] for multi-label, None when missing."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (list, tuple)):
        items = [label_value(v, None) for v in value]
        if any(i is None or isinstance(i, list) for i in items):
            return None
        return sorted(set(items))
    if isinstance(value, (int, str)):
        s = str(value).strip()
        if separator is not None:
            return sorted({p.strip() for p in s.split(separator) if p.strip()})
        return s or None
    return None


def text_problem(value: Any, what: str) -> str | None:
    if not isinstance(value, str):
        return f"{what} is {'missing' if value is None else type(value).__name__ + ', not a string'}"
    if not value.strip():
        return f"{what} is empty"
    if "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value):
        return f"{what} holds a NUL or an unpaired surrogate character"
    return None


def read_text_set(path: str, cfg: DataConfig, name: str, labelled: bool = True) -> TextSet:
    bad: list[tuple[str, str]] = []
    table = read_table(path, cfg.max_rows, malformed=bad)
    require_column(table, cfg.text_column, "text_column")
    if cfg.text_pair_column:
        require_column(table, cfg.text_pair_column, "text_pair_column")
    if labelled:
        require_column(table, cfg.label_column, "label_column")
    texts, pairs, labels, where = [], [] if cfg.text_pair_column else None, [], []
    for i, row in enumerate(table.rows):
        text = row.get(cfg.text_column)
        problem = text_problem(text, "text")
        pair = None
        if cfg.text_pair_column and problem is None:
            pair = row.get(cfg.text_pair_column)
            problem = text_problem(pair, f"'{cfg.text_pair_column}'")
        label = label_value(row.get(cfg.label_column), cfg.label_separator) if labelled else None
        if labelled and problem is None and (label is None or label == []):
            problem = "label is missing or not a string/integer/list"
        if problem:
            bad.append((table.where(i), problem))
            continue
        texts.append(text)
        if pairs is not None:
            pairs.append(pair)
        labels.append(label)
        where.append(table.where(i))
    bad.sort(key=lambda b: line_of(b[0]))
    if bad and cfg.bad_rows == "error":
        raise UserError(bad_rows_message(str(path), bad))
    if not texts:
        raise UserError(f"{path}: no usable rows (all {len(bad)} rows are bad)" if bad else f"{path}: no data rows, only a header")
    return TextSet(name, str(path), texts, pairs, labels, where, bad=bad)


def line_of(where: str) -> int:
    tail = where.rsplit(":", 1)[-1].rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def bad_rows_message(path: str, bad: list[tuple[str, str]], shown: int = 5, unit: str = "row(s)") -> str:
    listed = "; ".join(f"{w}: {p}" for w, p in bad[:shown])
    more = f" (and {len(bad) - shown} more)" if len(bad) > shown else ""
    return f"{len(bad)} bad {unit} in {path}: {listed}{more}; fix them, or set data.bad_rows=skip to drop and count them"


def is_multi_label(sets: list[TextSet], cfg: DataConfig) -> bool:
    return cfg.label_separator is not None or any(isinstance(l, list) for s in sets for l in s.labels)


def label_names(train: TextSet, multi_label: bool) -> list[str]:
    """Sorted label names: numerically when every label is an integer, else alphabetically."""
    counts = Counter(l for ls in train.labels for l in (ls if multi_label else [ls]))
    names = list(counts)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def check_known_labels(s: TextSet, names: list[str], multi_label: bool) -> None:
    known = set(names)
    for labels, where in zip(s.labels, s.where):
        for label in labels if multi_label else [labels]:
            if label not in known:
                raise UserError(
                    f"{where}: label '{label}' in the {s.name} data never occurs in the training data "
                    f"(training labels: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}); "
                    "fix the label or add training rows with it"
                )


def stratified_split(
    s: TextSet, fractions: dict[str, float], seed: int, multi_label: bool
) -> dict[str, TextSet]:
    """Split `s` into the named parts (the rest stays 'train'), stratified by label, seeded.

    Each class keeps at least one row in train and gets at least one row in every split part;
    a class too small for that is an error that names it.
    """
    rng = random.Random(seed)
    need = 1 + len(fractions)
    groups: dict[Any, list[int]] = {}
    for i, label in enumerate(s.labels):
        key = tuple(label) if multi_label else label
        groups.setdefault(key, []).append(i)
    if multi_label:  # label sets are too many to stratify on: one seeded shuffle
        groups = {"all": list(range(len(s)))}
    parts: dict[str, list[int]] = {name: [] for name in fractions}
    train: list[int] = []
    for key in sorted(groups, key=str):
        idx = groups[key]
        if len(idx) < need:
            raise UserError(
                f"class '{key}' has only {len(idx)} row(s) in {s.source}; splitting "
                f"{' and '.join(fractions)} from it needs at least {need} per class: add rows, "
                f"or give {' and '.join('data.' + n for n in fractions)} file(s)"
            )
        rng.shuffle(idx)
        start = 0
        for name, frac in fractions.items():
            k = max(1, round(len(idx) * frac))
            k = min(k, len(idx) - start - 1 - (len(fractions) - 1 - list(fractions).index(name)))
            parts[name].extend(idx[start : start + k])
            start += k
        train.extend(idx[start:])
    out = {"train": s.subset(sorted(train), "train", s.source)}
    out["train"].bad = s.bad
    for name, idx in parts.items():
        out[name] = s.subset(sorted(idx), name, f"split from {s.source}")
    return out
