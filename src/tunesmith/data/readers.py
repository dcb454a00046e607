"""Read tabular data files into rows, keeping each row's line number for error messages.

Formats by extension: .csv, .tsv, .jsonl (also .json lines), .parquet. Every problem that stops a
file from being read (bad encoding, a broken JSON line, a row with the wrong number of fields)
is a :class:`UserError` that names the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

SUPPORTED = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class Table:
    path: Path
    columns: list[str]
    rows: list[dict[str, Any]]
    lines: list[int]  # the line (csv/tsv/jsonl) or row number (parquet) of each row, 1-based

    def where(self, i: int) -> str:
        unit = "row" if self.path.suffix.lower() in (".parquet", ".pq") else "line"
        return f"{self.path}:{self.lines[i]}" if unit == "line" else f"{self.path} row {self.lines[i]}"


def read_table(path: str | Path, max_rows: int | None = None) -> Table:
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
    text = _decode(path)
    if not text.strip():
        raise UserError(f"{path} is empty")
    if fmt == "jsonl":
        return _read_jsonl(path, text, max_rows)
    return _read_delimited(path, text, "\t" if fmt == "tsv" else ",", max_rows)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is dropped
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-save the file as UTF-8"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise UserError(f"{path}:{line}: contains a NUL byte; is this a binary file?")
    return text


def _read_delimited(path: Path, text: str, delimiter: str, max_rows: int | None) -> Table:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except csv.Error as e:
        raise UserError(f"{path}:1: cannot parse the header: {e}") from None
    header = [h.strip() for h in header]
    if len(header) < 2 and delimiter == "," and "\t" in header[0]:
        raise UserError(f"{path}:1: the header has tabs but the file is read as CSV; rename it to .tsv")
    if len(header) < 2 and delimiter == "\t" and "," in header[0]:
        raise UserError(f"{path}:1: the header has commas but the file is read as TSV; rename it to .csv")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise UserError(f"{path}:1: duplicate column name(s) {', '.join(repr(d) for d in dupes)} in the header")
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise UserError(f"{path}:{start}: {e}") from None
        if not values or (len(values) == 1 and not values[0].strip()):
            continue  # a blank line
        if len(values) != len(header):
            raise UserError(
                f"{path}:{start}: {len(values)} fields, but the header has {len(header)}; "
                "quote fields that contain the delimiter"
            )
        rows.append(dict(zip(header, values)))
        lines.append(start)
        if max_rows and len(rows) >= max_rows:
            break
    return Table(path, header, rows, lines)


def _read_jsonl(path: Path, text: str, max_rows: int | None) -> Table:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    columns: dict[str, None] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{n}: each line must be a JSON object, got {type(obj).__name__}")
        columns.update(dict.fromkeys(obj))
        rows.append(obj)
        lines.append(n)
        if max_rows and len(rows) >= max_rows:
            break
    if not rows:
        raise UserError(f"{path} has no JSON lines")
    return Table(path, list(columns), rows, lines)


def _read_parquet(path: Path, max_rows: int | None) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    if max_rows:
        table = table.slice(0, max_rows)
    rows = table.to_pylist()
    if not rows:
        raise UserError(f"{path} has no rows")
    return Table(path, list(table.column_names), rows, list(range(1, len(rows) + 1)))
