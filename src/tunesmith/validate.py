"""Pre-flight data validation: read every data file once and report what training would meet.

Like OpenAI's fine-tuning file checks: per file the row count, label distribution, exact
duplicates, token-length statistics and how many rows `train.max_length` truncates, and every
unusable row with its file and line (the first 20 shown, the rest counted); across files, rows of
the validation or test data that also occur in the training data. `errors` are what stop training
(`tunesmith validate` exits 2, `train` stops before loading the model); `warnings` are printed and
training goes on.

A task supplies the checks (`task.validate(tokenizer) -> DataReport`); this module holds the
report, its thresholds and its rendering, the same for every task.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SHOWN = 20  # malformed rows listed per file; the rest are counted
IMBALANCE = 10.0  # warn when the largest class has this many times the rows of the smallest
FEW_ROWS = 10  # warn about classes with fewer training rows than this
TRUNCATED_WARN = 0.05  # warn when more than this share of a file's rows is cut at max_length


@dataclass
class FileReport:
    split: str  # train | validation | test | replay
    source: str  # the file, or "split from <file>"
    rows: int = 0  # usable rows
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file:line, problem) of each unusable row
    labels: Counter = field(default_factory=Counter)
    duplicates: int = 0  # rows whose text repeats an earlier row of the same file
    conflicts: int = 0  # texts that occur with more than one label
    lengths: list[int] | None = None  # tokens per row, before truncation
    truncated: int = 0
    error: str | None = None  # the file could not be read at all

    def length_stats(self) -> dict[str, float] | None:
        if not self.lengths:
            return None
        xs = sorted(self.lengths)
        pick = lambda q: xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]  # noqa: E731
        return {"min": xs[0], "median": pick(0.5), "p95": pick(0.95), "max": xs[-1], "mean": round(sum(xs) / len(xs), 1)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split, "source": self.source, "rows": self.rows, "bad_rows": len(self.bad),
            "bad": [{"where": w, "problem": p} for w, p in self.bad[:SHOWN]],
            "labels": dict(self.labels.most_common()), "duplicates": self.duplicates, "conflicts": self.conflicts,
            "tokens": self.length_stats(), "truncated": self.truncated, "error": self.error,
        }


@dataclass
class DataReport:
    files: list[FileReport] = field(default_factory=list)
    overlap: dict[str, int] = field(default_factory=dict)  # "test": test rows whose text is in train
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    max_length: int | None = None
    skip_bad: bool = False  # data.bad_rows=skip: unusable rows are dropped and counted, not errors

    @property
    def ok(self) -> bool:
        return not self.errors

    def file(self, split: str) -> FileReport | None:
        return next((f for f in self.files if f.split == split), None)

    def error_line(self) -> str:
        """The one line `train` stops with."""
        more = len(self.errors) - 1
        tail = f" ({more} more problem(s); `tunesmith validate` on this config lists them all)" if more else ""
        return self.errors[0] + tail

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "files": [f.to_dict() for f in self.files], "overlap": self.overlap,
                "errors": self.errors, "warnings": self.warnings, "max_length": self.max_length}

    # -- checks shared by the classification tasks --------------------------------------------
    def check_labels(self, multi_label: bool) -> None:
        train = self.file("train")
        if train is None or not train.labels:
            return
        counts = train.labels
        big, small = counts.most_common()[0], counts.most_common()[-1]
        if len(counts) >= 2 and big[1] >= IMBALANCE * small[1]:
            self.warnings.append(
                f"strong class imbalance in the training data: '{big[0]}' has {big[1]} rows, '{small[0]}' only {small[1]} "
                f"({big[1] / small[1]:.0f}x); consider more rows of the small classes, or watch macro-F1 rather than accuracy"
            )
        few = sorted((n, c) for c, n in counts.items() if n < FEW_ROWS)
        if few:
            listed = ", ".join(f"'{c}' ({n})" for n, c in few[:8]) + (" ..." if len(few) > 8 else "")
            self.warnings.append(f"{len(few)} class(es) with fewer than {FEW_ROWS} training rows: {listed}")

    def check_rows(self) -> None:
        for f in self.files:
            if f.duplicates:
                self.warnings.append(f"{f.source}: {f.duplicates} row(s) repeat an earlier row's text exactly")
            if f.conflicts:
                self.warnings.append(f"{f.source}: {f.conflicts} text(s) occur with more than one label")
            if f.lengths and f.truncated > TRUNCATED_WARN * len(f.lengths):
                self.warnings.append(
                    f"{f.source}: {f.truncated} of {len(f.lengths)} rows are longer than train.max_length={self.max_length} "
                    "tokens and will be cut; raise max_length if the end of the text matters"
                )
        for split, n in self.overlap.items():
            if n:
                self.warnings.append(
                    f"{n} {split} row(s) also occur in the training data: {split} scores will flatter the model; remove them"
                )

    # -- rendering ----------------------------------------------------------------------------
    def render(self, console: Any, *, full: bool = True) -> None:
        """The report as tables (full, for `tunesmith validate`), or its warnings alone (for `train`)."""
        if full:
            rows = [("split", "rows", "bad", "dupes", "tokens min/med/p95/max", "truncated", "file")]
            for f in self.files:
                st = f.length_stats()
                tokens = f"{st['min']}/{st['median']}/{st['p95']}/{st['max']}" if st else "-"
                rows.append((f.split, str(f.rows) if not f.error else "unreadable", str(len(f.bad)), str(f.duplicates),
                             tokens, str(f.truncated) if f.lengths else "-", f.source))
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
            for r in rows:
                console.print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                              + "  " + r[-1])
            if any(f.labels for f in self.files):
                console.print("labels:")
            for f in self.files:
                if f.labels:
                    shown = ", ".join(f"{k} {v}" for k, v in f.labels.most_common(12))
                    console.print(f"  {f.split:<{widths[0]}}  {shown}{' ...' if len(f.labels) > 12 else ''}")
            for f in self.files:
                if f.bad:
                    what = "row(s) skipped (data.bad_rows=skip)" if self.skip_bad else "unusable row(s)"
                    console.print(f"{len(f.bad)} {what} in {f.source}:")
                    for w, p in f.bad[:SHOWN]:
                        console.print(f"  {w}: {p}")
                    if len(f.bad) > SHOWN:
                        console.print(f"  ... and {len(f.bad) - SHOWN} more")
        for w in self.warnings:
            console.print(f"warning: {w}")
        if full:
            for e in self.errors:
                console.print(f"error: {e}")


@contextlib.contextmanager
def quiet_length_warnings() -> Iterator[None]:
    """Silence transformers' "sequence length is longer than the maximum": we count it ourselves."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def token_lengths(tokenizer: Any, texts: list[str], pairs: list[str] | None) -> list[int]:
    """Tokens per row without truncation (special tokens included), in batches."""
    out: list[int] = []
    with quiet_length_warnings():
        for i in range(0, len(texts), 2048):
            kw = {"text_pair": pairs[i : i + 2048]} if pairs is not None else {}
            ids = tokenizer(texts[i : i + 2048], truncation=False, **kw)["input_ids"]
            out.extend(len(x) for x in ids)
    return out


def duplicates_and_conflicts(keys: np.ndarray, labels: list[Any]) -> tuple[int, int]:
    """(rows repeating an earlier key, keys seen with more than one label), from 64-bit row hashes:
    sorted arrays, not a dictionary of the rows, so the check's memory is a few bytes a row."""
    codes: dict[Any, int] = {}
    lab = np.fromiter((codes.setdefault(tuple(l) if isinstance(l, list) else l, len(codes)) for l in labels),
                      dtype=np.int64, count=len(labels))
    order = np.lexsort((lab, keys))
    k, c = keys[order], lab[order]
    same_key = k[1:] == k[:-1]
    group = np.concatenate([[0], np.cumsum(~same_key)])  # one id per distinct key
    differs = same_key & (c[1:] != c[:-1])  # sorted by label within a key: a change is a second label
    return int(same_key.sum()), len(np.unique(group[1:][differs]))


def read_files(
    files: list[tuple[str, str | None]], read: Callable[[str, str], Any], data: Any, unit: str = "row(s)",
    max_length: int | None = None,
) -> tuple[DataReport, dict[str, Any]]:
    """Read each (split, path) with `read(path, split)` (bad rows collected in `.bad`, a UserError for
    a file that can't be read at all) into a report with one FileReport per file; returns the
    report and the readable, non-empty sets by split."""
    from tunesmith.data.text import bad_rows_message
    from tunesmith.errors import UserError

    rep = DataReport(skip_bad=data.bad_rows == "skip", max_length=max_length)
    sets: dict[str, Any] = {}
    for split, path in files:
        if not path:
            continue
        f = FileReport(split, str(path))
        rep.files.append(f)
        try:
            s = read(path, split)
        except UserError as e:
            f.error = str(e)
            rep.errors.append(str(e))
            continue
        f.bad = list(s.bad)
        if s.bad and data.bad_rows == "error":
            rep.errors.append(bad_rows_message(str(path), s.bad, shown=3, unit=unit))
        if not len(s):
            rep.errors.append(f"{path}: no usable {unit} (all {len(s.bad)} are bad)")
            continue
        sets[split] = s
    return rep, sets


def classification_report(
    files: list[tuple[str, str | None]],
    read: Callable[[str, str], Any],
    keys: Callable[[Any], np.ndarray],
    multi_label: Callable[[list[Any]], bool],
    data: Any,
    seed: int,
    noun: str = "label",
    unit: str = "row(s)",
) -> tuple[DataReport, dict[str, Any], list[str], bool]:
    """The report the classification tasks share; returns (report, sets by split, label names, multi-label).

    `files` are (split, path) pairs; `read(path, split)` reads one with bad rows skipped (a
    UserError for a file that can't be read at all) and returns a set with `labels`, `where`,
    `bad` and `subset`; `keys(set)` gives each row's exact-duplicate key, a 64-bit hash (`key_hash`
    of the text, of the pixels).
    Validation and test parts missing from `files` are split from train, as training does.
    """
    from tunesmith.data.text import label_names, stratified_split
    from tunesmith.errors import UserError

    rep, sets = read_files(files, read, data, unit)
    if "train" not in sets:
        return rep, sets, [], False
    multi = multi_label(list(sets.values()))
    names = label_names(sets["train"], multi)
    if len(names) < 2:
        rep.errors.append(f"{data.train}: only one {noun} ('{names[0]}') in the training data; a classifier needs at least 2 classes")
    known, plural = set(names), noun + ("es" if noun.endswith("s") else "s")
    for split, s in sets.items():
        if split == "train":
            continue
        unknown = [(w, l) for w, ls in zip(s.where, s.labels) for l in (ls if multi else [ls]) if l not in known]
        if unknown:
            (w, l), more = unknown[0], len(unknown) - 1
            rep.errors.append(
                f"{w}: {noun} '{l}' in the {split} data never occurs in the training data "
                f"{f'(nor do {more} more) ' if more else ''}"
                f"(training {plural}: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}); "
                f"fix the {noun} or add training {unit} with it"
            )
    missing = {n: getattr(data, f"{n}_size") for n in ("validation", "test") if n not in sets}
    if missing and len(names) >= 2:
        try:
            parts = stratified_split(sets["train"], missing, seed, multi)
        except UserError as e:
            rep.errors.append(str(e))
        else:
            sets.update(parts)
            rep.files[1:1] = [FileReport(n, parts[n].source) for n in missing]
    row_keys = {split: np.asarray(keys(s), dtype=np.int64) for split, s in sets.items()}
    for f in rep.files:
        s = sets.get(f.split)
        if s is None:
            continue
        f.rows = len(s)
        f.labels = Counter(l for ls in s.labels for l in (ls if multi else [ls]))
        f.duplicates, f.conflicts = duplicates_and_conflicts(row_keys[f.split], s.labels)
    if "train" in sets:
        for split in ("validation", "test"):
            if split in sets:
                rep.overlap[split] = int(np.isin(row_keys[split], row_keys["train"]).sum())
    rep.check_labels(multi)
    return rep, sets, names, multi
