"""Read tabular data files into rows, keeping each row's line number for error messages.

Formats by extension: .csv, .tsv, .jsonl (also .json lines), .parquet. A problem with the whole
file (missing, empty, not UTF-8 text at all, an unreadable header) is a :class:`UserError` naming
the file. A malformed row (a broken JSON line, a row with the wrong number of fields, bytes that
are not UTF-8, a NUL byte) is a :class:`UserError` naming file and line, or, when the caller
passes a `malformed` list, is recorded there as ``(where, problem)`` and the reading goes on.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any, TextIO

from tunesmith.errors import UserError

csv.field_size_limit(2**31 - 1)  # the default, 131,072 characters, refuses long documents

SUPPORTED = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class Table:
    path: Path
    columns: list[str]
    rows: list[dict[str, Any]]
    lines: list[int]  # the line (csv/tsv/jsonl) or row number (parquet) of each row, 1-based

    def where(self, i: int) -> str:
        return location(self.path, self.lines[i])


def location(path: Path, line: int) -> str:
    """`file:line`, or `file row N` for Parquet (no lines)."""
    return f"{path} row {line}" if path.suffix.lower() in (".parquet", ".pq") else f"{path}:{line}"


class Rows:
    """A data file read as a stream: iterating yields (line, row) and never holds the file, nor its
    rows, in memory. `columns` are the header's (CSV/TSV), the schema's (Parquet), or for JSON lines
    every key met so far (complete once iterated)."""

    def __init__(self, path: Path, columns: list[str], it: Iterator[tuple[int, dict[str, Any]]]):
        self.path, self.columns, self._it = path, columns, it

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        return self._it


Malformed = list[tuple[str, str]]


def read_table(path: str | Path, max_rows: int | None = None, malformed: Malformed | None = None) -> Table:
    """The whole file in memory (small files: image listings, conversations); `open_rows` streams."""
    rows = open_rows(path, max_rows, malformed)
    items = list(rows)
    return Table(rows.path, rows.columns, [r for _, r in items], [n for n, _ in items])


def open_rows(path: str | Path, max_rows: int | None = None, malformed: Malformed | None = None) -> Rows:
    """The file's rows as a stream; problems with the whole file (missing, not text, a bad header) raise now."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    if path.is_dir():
        raise UserError(f"{path} is a directory; text data must be a .csv, .tsv, .jsonl or .parquet file")
    fmt = SUPPORTED.get(path.suffix.lower())
    if fmt is None:
        raise UserError(
            f"{path}: unsupported file type '{path.suffix or '(none)'}'; use one of {', '.join(sorted(set(SUPPORTED)))}"
        )
    if fmt == "parquet":
        return _read_parquet(path, max_rows)
    _check_sample(path)
    report = _Reporter(path, malformed)
    f = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    try:
        if fmt == "jsonl":
            return _read_jsonl(path, f, max_rows, report)
        return _read_delimited(path, f, "\t" if fmt == "tsv" else ",", max_rows, report)
    except BaseException:
        f.close()
        raise


def _limited(f: TextIO, rows: Iterator[tuple[int, dict[str, Any]]], max_rows: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """The first `max_rows` of `rows` (all when None); the file closes when they end."""
    with f:
        for n, item in enumerate(rows, start=1):
            yield item
            if max_rows and n >= max_rows:
                return


SAMPLE = 1 << 20  # the first MiB decides whether a file is text at all
ESCAPED = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8, kept by surrogateescape
SURROGATE = re.compile("[\ud800-\udfff]")  # any lone surrogate: not text a tokenizer can take


def _check_sample(path: Path) -> None:
    """Refuse an empty file, or one that is mostly not UTF-8 text, from its first MiB (decode_text's rules)."""
    with open(path, "rb") as f:
        data = f.read(SAMPLE)
        more = bool(f.read(1))
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not more and not data.strip():
        raise UserError(f"{path} is empty")
    _as_text(path, data, cut=more)


class _Reporter:
    """Raise on a malformed row, or record it when the caller collects them."""

    def __init__(self, path: Path, malformed: Malformed | None):
        self.path, self.malformed = path, malformed

    def __call__(self, line: int, problem: str) -> None:
        if self.malformed is None:
            raise UserError(f"{self.path}:{line}: {problem}")
        self.malformed.append((f"{self.path}:{line}", problem))


def decode_text(path: Path) -> str:
    """The file as text. Bytes that are not UTF-8 survive as lone surrogates (surrogateescape), so
    the row that holds them can be reported by line; a file that is mostly not text is refused."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a leading BOM is dropped
    return _as_text(path, data)


def _as_text(path: Path, data: bytes, cut: bool = False) -> str:
    """`data` decoded (bad bytes as lone surrogates); refused when mostly not UTF-8 or full of NULs.
    `cut`: data is the start of a longer file, so only a character split at its very end is forgiven."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        text = data.decode("utf-8", errors="surrogateescape")
        bad = len(ESCAPED.findall(text))
        if bad > max(16, len(text) // 20) and not (cut and e.start >= len(data) - 3):
            line = data[: e.start].count(b"\n") + 1
            raise UserError(
                f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-save the file as UTF-8"
            ) from None
    if text.count("\x00") > max(16, len(text) // 20):
        line = text[: text.index("\x00")].count("\n") + 1
        raise UserError(f"{path}:{line}: contains NUL bytes; is this a binary file?")
    return text


def _bad_text(values: list[Any]) -> str | None:
    """Why a row's text cannot be used: undecodable bytes or a NUL byte; None when fine."""
    for v in values:
        if not isinstance(v, str):
            continue
        found = ESCAPED.search(v)
        if found:
            return f"not valid UTF-8 (byte 0x{ord(found.group()) - 0xDC00:02x}); re-save the file as UTF-8"
        if "\x00" in v:
            return "contains a NUL byte"
    return None


def _read_delimited(path: Path, f: TextIO, delimiter: str, max_rows: int | None, report: _Reporter) -> Rows:
    reader = csv.reader(f, delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except csv.Error as e:
        raise UserError(f"{path}:1: cannot parse the header: {e}") from None
    if _bad_text(header):
        raise UserError(f"{path}:1: the header is {_bad_text(header)}")
    header = [h.strip() for h in header]
    if len(header) < 2 and delimiter == "," and "\t" in header[0]:
        raise UserError(f"{path}:1: the header has tabs but the file is read as CSV; rename it to .tsv")
    if len(header) < 2 and delimiter == "\t" and "," in header[0]:
        raise UserError(f"{path}:1: the header has commas but the file is read as TSV; rename it to .csv")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise UserError(f"{path}:1: duplicate column name(s) {', '.join(repr(d) for d in dupes)} in the header")

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        while True:
            start = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                # the csv module stops for good at a broken quote: report it, the rest can't be read
                report(start, f"{e}; the rows after it cannot be read")
                return
            if not values or (len(values) == 1 and not values[0].strip()):
                continue  # a blank line
            if len(values) != len(header):
                report(start, f"{len(values)} fields, but the header has {len(header)}; quote fields that contain the delimiter")
                continue
            problem = _bad_text(values)
            if problem:
                report(start, problem)
                continue
            yield start, dict(zip(header, values))

    return Rows(path, header, _limited(f, rows(), max_rows))


def _read_jsonl(path: Path, f: TextIO, max_rows: int | None, report: _Reporter) -> Rows:
    head = f.read(SAMPLE)
    if head.lstrip()[:1] == "[" and "\n" in head.strip():  # a pretty-printed .json array saved as .jsonl
        try:
            whole = json.loads(head + f.read())
        except ValueError:
            whole = None
        if isinstance(whole, list):
            raise UserError(f"{path}: the file is one JSON array of {len(whole)} item(s), not JSON lines; a .jsonl file holds "
                            f"one JSON object per line: convert it with jq -c '.[]' {path.name} > {path.stem}-lines.jsonl")
    f.seek(0)
    columns: list[str] = []
    seen: set[str] = set()

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        read = 0
        # lines end at \r\n, \n or a lone \r (a raw \r can't be inside a JSON string): a text file's own
        # line splitting with newline="", not splitlines(), which would also break at \x1c, \x85 or
        # U+2028, all legal inside a JSON string
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            problem = _bad_text([raw])
            if problem:
                report(n, problem)
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                report(n, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            except ValueError as e:  # e.g. an integer with more digits than Python converts
                report(n, f"not valid JSON ({str(e).split(';')[0]})")
                continue
            except RecursionError:
                report(n, "not valid JSON (nested too deeply)")
                continue
            if not isinstance(obj, dict):
                report(n, _not_an_object(obj, n))
                continue
            for k in obj:
                if k not in seen:
                    seen.add(k)
                    columns.append(k)
            read += 1
            yield n, obj
        if not read and not report.malformed:
            raise UserError(f"{path} has no JSON lines")
        if not read:  # every line is malformed: nothing to check columns against, so say what the lines are
            where, problem = report.malformed[0]
            raise UserError(f"{where}: {problem} (no line of {path.name} could be read: {len(report.malformed)} malformed)")

    return Rows(path, columns, _limited(f, rows(), max_rows))


_JSON_TYPES = {list: "a JSON array", str: "a JSON string", int: "a JSON number", float: "a JSON number",
               bool: "a JSON boolean", type(None): "JSON null"}


def _not_an_object(obj: Any, line: int) -> str:
    """What a JSONL line that is not an object is, and what a line should be."""
    what = _JSON_TYPES.get(type(obj), type(obj).__name__)
    hint = "a .jsonl file holds one JSON object per line, such as {\"text\": \"...\", \"label\": \"...\"}"
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        hint += f"; this line is an array of {len(obj)} object(s): write one per line (jq -c '.[]' FILE.json > FILE.jsonl)"
    elif isinstance(obj, list) and line == 1:
        hint += "; a file that is one JSON array converts with jq -c '.[]' FILE.json > FILE.jsonl"
    return f"{what}, not an object: {hint}"


def _read_parquet(path: Path, max_rows: int | None) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    if not pf.metadata.num_rows:
        raise UserError(f"{path} has no rows")

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        n = 0
        try:
            for batch in pf.iter_batches(batch_size=4096):  # a record batch at a time, never the whole table
                for row in batch.to_pylist():
                    n += 1
                    yield n, row
                    if max_rows and n >= max_rows:
                        return
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path} row {n + 1}: not readable ({e})") from None

    return Rows(path, list(pf.schema_arrow.names), rows())
