"""Labelled text: rows -> (text, label) examples, label maps, stratified splits.

Bad rows (malformed lines, empty or non-string text, a missing label) either stop the run with
their line numbers (`data.bad_rows: error`, the default) or are skipped and counted (`skip`).
"""

from __future__ import annotations

import math
import random
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tunesmith.data.readers import SURROGATE, Rows, Table, location, open_rows
from tunesmith.data.store import RecordsBuilder, Spill, StoredStrings, as_int64, encode, key_hash
from tunesmith.errors import UserError, did_you_mean

if TYPE_CHECKING:  # type hints only: config imports nothing of data/ and data/ nothing of config
    from tunesmith.config import DataConfig


@dataclass
class TextSet:
    """Rows of labelled text. The texts live on disk (`StoredStrings`), so a set costs about 40 bytes a
    row of memory however long its texts: start and end offsets, a line number, a content hash and a
    reference to its (shared) label."""

    name: str  # train | validation | test
    source: str  # the file, or "split from <file>"
    texts: Sequence[str]
    pairs: Sequence[str] | None
    labels: list[Any]  # str, or list[str] for multi-label; None when unlabelled
    where: Sequence[str]  # file:line of each example
    keys: np.ndarray  # a 64-bit hash of each row's text (and pair): duplicate and overlap checks
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file:line, problem) of each skipped row

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int], name: str, source: str) -> "TextSet":
        return TextSet(
            name,
            source,
            _take(self.texts, idx),
            _take(self.pairs, idx) if self.pairs is not None else None,
            [self.labels[i] for i in idx],
            _take(self.where, idx),
            self.keys[np.asarray(idx, dtype=np.int64)],
        )


def _take(seq: Sequence[Any], idx: list[int]) -> Sequence[Any]:
    return seq.take(idx) if hasattr(seq, "take") else [seq[i] for i in idx]


class Lines(Sequence):
    """`file:line` of each row, made when asked for from one int64 line number a row."""

    def __init__(self, path: Path, lines: np.ndarray):
        self.path, self.lines = path, lines

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return location(self.path, int(self.lines[i]))

    def take(self, idx: list[int]) -> "Lines":
        return Lines(self.path, self.lines[np.asarray(idx, dtype=np.int64)])


def require_column(table: Table | Rows, column: str, key: str) -> None:
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
    if "\x00" in value or SURROGATE.search(value):
        return f"{what} holds a NUL or an unpaired surrogate character"
    return None


def read_text_set(path: str, cfg: DataConfig, name: str, labelled: bool = True) -> TextSet:
    """The file's usable rows, streamed: texts go to disk as they are read (see TextSet)."""
    bad: list[tuple[str, str]] = []
    rows = open_rows(path, cfg.max_rows, malformed=bad)
    spill = Spill(prefix="texts-")
    texts, pairs = RecordsBuilder(spill), RecordsBuilder(spill) if cfg.text_pair_column else None
    labels: list[Any] = []
    shared: dict[Any, Any] = {}  # one object per distinct label: a row costs a reference
    lines, keys = array("q"), array("q")
    needed = [(cfg.text_column, "text_column")] + ([(cfg.text_pair_column, "text_pair_column")] if cfg.text_pair_column else [])
    needed += [(cfg.label_column, "label_column")] if labelled else []
    for column, key in needed:  # CSV, TSV and Parquet know their columns now; JSON lines once read
        if rows.columns:
            require_column(rows, column, key)
    for line, row in rows:
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
            bad.append((location(rows.path, line), problem))
            continue
        texts.append(encode(text))
        if pairs is not None:
            pairs.append(encode(pair))
        labels.append(shared.setdefault(tuple(label) if isinstance(label, list) else label, label))
        lines.append(line)
        keys.append(key_hash(text, pair))
    for column, key in needed:
        require_column(rows, column, key)
    bad.sort(key=lambda b: line_of(b[0]))
    if bad and cfg.bad_rows == "error":
        raise UserError(bad_rows_message(str(path), bad))
    if not labels:
        raise UserError(f"{path}: no usable rows (all {len(bad)} rows are bad)" if bad else f"{path}: no data rows, only a header")
    return TextSet(name, str(path), StoredStrings(texts.done()), StoredStrings(pairs.done()) if pairs is not None else None,
                   labels, Lines(rows.path, as_int64(lines)), as_int64(keys), bad)


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
