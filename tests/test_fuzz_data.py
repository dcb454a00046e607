"""Fuzz the data path: thousands of damaged files through `tunesmith validate`.

A seeded generator writes, per format (csv, tsv, jsonl, parquet), FILES[fmt] training files (500; tsv 200)
with known damage: broken or truncated JSON, wrong types, missing fields, bytes that are not
UTF-8, NUL bytes, huge lines, wrong delimiters, unclosed quotes, BOMs, mixed line endings, empty
files, random binary. It knows which rows it broke, so each file is checked twice:

- with data.bad_rows=skip, validate must succeed with exactly the expected usable-row count and
  name exactly the damaged lines (or, for a file that can't be read at all, fail as below);
- with the default data.bad_rows=error, validate must exit 2 with one `tunesmith: error:` line
  naming the file and the first damaged line.

Never a Python traceback: anything but a UserError escapes `main` and fails the test. The tiny
tokenizer is loaded once (a stand-in for `load_tokenizer`), which is what keeps 4,000 validate
calls within about a minute.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import make_texts
from tunesmith.cli import main
from tunesmith.tasks.text_classification import TextClassification

FILES_PER_FORMAT = 500
# TSV is CSV's generator and reader with another delimiter: fewer files (test-time budget of the default run)
FILES = {"csv": FILES_PER_FORMAT, "tsv": 200, "jsonl": FILES_PER_FORMAT, "parquet": FILES_PER_FORMAT}
FORMATS = ("csv", "tsv", "jsonl", "parquet")
MAX_LENGTH = 64


@dataclass
class Expect:
    kinds: list[str] = field(default_factory=list)
    valid: int = 0
    bad: list[int] = field(default_factory=list)  # damaged lines (parquet: row numbers)
    file_error: str | None = None  # a fragment the one-line error must hold, for an unreadable file
    truncated: int | None = None


def _huge(text: str) -> str:
    """About 140,000 characters: longer than the csv module's default field limit (131,072)."""
    return " ".join([text] * (140_000 // (len(text) + 1) + 1))


def _rows(rng: random.Random) -> list[tuple[str, str]]:
    return make_texts(rng.randint(10, 24), rng.randint(0, 10**6))


# -- delimited ------------------------------------------------------------------------------------
ROW_DAMAGE_DELIMITED = ["extra_field", "missing_field", "bad_utf8", "nul", "empty_text", "blank_text", "empty_label", "unclosed_quote"]


def _delimited(rng: random.Random, d: str) -> tuple[bytes, Expect]:
    rows = _rows(rng)
    e = Expect()
    kind = rng.choice(["rows", "rows", "rows", "huge", "clean", "file"])
    if kind == "file":
        which = rng.choice(["empty", "blank", "header_only", "wrong_delimiter", "binary", "missing_column"])
        e.kinds = [which]
        if which == "empty":
            return b"", Expect([which], file_error="is empty")
        if which == "blank":
            return b"\n \n\r\n", Expect([which], file_error="is empty")
        if which == "header_only":
            return f"text{d}label\n".encode(), Expect([which], file_error="no data rows")
        if which == "wrong_delimiter":
            other = {",": ";", "\t": ","}[d] if rng.random() < 0.5 else {",": "\t", "\t": ";"}[d]
            body = f"text{other}label\n" + "".join(f"{t}{other}{l}\n" for t, l in rows)
            frag = {"\t": "the header has tabs", ",": "the header has commas"}.get(other, "no column 'text'")
            return body.encode(), Expect([which], file_error=frag)
        if which == "binary":
            return bytes(rng.getrandbits(8) for _ in range(rng.randint(200, 3000))), Expect([which], file_error="")
        body = f"review{d}label\n" + "".join(f"{t}{d}{l}\n" for t, l in rows)
        return body.encode(), Expect([which], file_error="no column 'text'")
    lines = [f"text{d}label".encode()]
    damaged = set(rng.sample(range(len(rows)), rng.randint(1, 3))) if kind == "rows" else set()
    huge = rng.randrange(len(rows)) if kind == "huge" else None
    lost = False
    for i, (t, l) in enumerate(rows):
        line_no = i + 2
        if lost:
            lines.append(f"{t}{d}{l}".encode())
            continue
        if i == huge:
            lines.append(f"{_huge(t)}{d}{l}".encode())
            e.valid += 1
            e.truncated = 1
            continue
        if i not in damaged:
            lines.append(f"{t}{d}{l}".encode())
            e.valid += 1
            continue
        k = rng.choice(ROW_DAMAGE_DELIMITED)
        if k == "unclosed_quote" and i < len(rows) - 3:  # keep both classes in the readable part
            k = rng.choice(ROW_DAMAGE_DELIMITED[:-1])
        e.kinds.append(k)
        e.bad.append(line_no)
        if k == "extra_field":
            lines.append(f"{t}{d}{l}{d}extra".encode())
        elif k == "missing_field":
            lines.append(t.encode())
        elif k == "bad_utf8":
            cut = rng.randint(0, len(t))
            lines.append(t[:cut].encode() + b"\xff\xfe" + t[cut:].encode() + f"{d}{l}".encode())
        elif k == "nul":
            lines.append(f"{t[:3]}\x00{t[3:]}{d}{l}".encode())
        elif k == "empty_text":
            lines.append(f"{d}{l}".encode())
        elif k == "blank_text":
            lines.append(f"   {d}{l}".encode())
        elif k == "empty_label":
            lines.append(f"{t}{d}".encode())
        elif k == "unclosed_quote":  # the csv module can't read past it: the rest of the file is lost
            lines.append(f'"{t}{d}{l}'.encode())
            lost = True
    endings = rng.choice(["lf", "crlf", "mixed", "cr"])
    body = b""
    for line in lines:
        body += line + {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r", "mixed": rng.choice([b"\n", b"\r\n", b"\r"])}[endings]
    if rng.random() < 0.3:
        body = b"\xef\xbb\xbf" + body
        e.kinds.append("bom")
    e.kinds.append(endings)
    return body, e


# -- jsonl ----------------------------------------------------------------------------------------
ROW_DAMAGE_JSONL = [
    "truncated", "text_int", "text_list", "text_dict", "text_null", "text_bool", "no_text", "no_label", "label_null",
    "label_empty_list", "label_dict", "bad_utf8", "nul_raw", "nul_escape", "lone_surrogate", "not_object",
    "trailing_garbage", "empty_text", "deep_nesting", "huge_int",
]


def _jsonl(rng: random.Random) -> tuple[bytes, Expect]:
    rows = _rows(rng)
    e = Expect()
    kind = rng.choice(["rows", "rows", "rows", "huge", "clean", "file", "cut"])
    if kind == "file":
        which = rng.choice(["empty", "blank", "binary", "missing_column", "all_broken"])
        if which == "empty":
            return b"", Expect([which], file_error="is empty")
        if which == "blank":
            return b"\n\n  \n", Expect([which], file_error="is empty")
        if which == "binary":
            return bytes(rng.getrandbits(8) for _ in range(rng.randint(200, 3000))), Expect([which], file_error="")
        if which == "missing_column":
            return "".join(json.dumps({"review": t, "label": l}) + "\n" for t, l in rows).encode(), Expect([which], file_error="no column 'text'")
        return b"".join(b"{broken\n" for _ in rows), Expect([which], file_error=":1: not valid JSON")
    lines: list[bytes] = []
    damaged = set(rng.sample(range(len(rows)), rng.randint(1, 3))) if kind == "rows" else set()
    huge = rng.randrange(len(rows)) if kind == "huge" else None
    cut_at = rng.randrange(6, len(rows)) if kind == "cut" else None  # both classes stay
    for i, (t, l) in enumerate(rows):
        line_no = i + 1
        good = json.dumps({"text": t, "label": l}).encode()
        if i == cut_at:  # the file ends in the middle of this line
            lines.append(good[: rng.randint(1, len(good) - 1)])
            e.bad.append(line_no)
            e.kinds.append("cut_file")
            break
        if i == huge:
            lines.append(json.dumps({"text": _huge(t), "label": l}).encode())
            e.valid += 1
            e.truncated = 1
            continue
        if i not in damaged:
            lines.append(good)
            e.valid += 1
            continue
        k = rng.choice(ROW_DAMAGE_JSONL)
        e.kinds.append(k)
        e.bad.append(line_no)
        lines.append({
            "truncated": lambda: good[: rng.randint(1, len(good) - 2)],
            "text_int": lambda: json.dumps({"text": 123, "label": l}).encode(),
            "text_list": lambda: json.dumps({"text": [t], "label": l}).encode(),
            "text_dict": lambda: json.dumps({"text": {"t": t}, "label": l}).encode(),
            "text_null": lambda: json.dumps({"text": None, "label": l}).encode(),
            "text_bool": lambda: json.dumps({"text": True, "label": l}).encode(),
            "no_text": lambda: json.dumps({"label": l}).encode(),
            "no_label": lambda: json.dumps({"text": t}).encode(),
            "label_null": lambda: json.dumps({"text": t, "label": None}).encode(),
            "label_empty_list": lambda: json.dumps({"text": t, "label": []}).encode(),
            "label_dict": lambda: json.dumps({"text": t, "label": {"x": 1}}).encode(),
            "bad_utf8": lambda: good.replace(b'"text": "', b'"text": "\xc3\x28', 1),
            "nul_raw": lambda: good.replace(b'"text": "', b'"text": "\x00', 1),
            "nul_escape": lambda: good.replace(b'"text": "', b'"text": "\\u0000', 1),
            "lone_surrogate": lambda: good.replace(b'"text": "', b'"text": "\\ud800', 1),
            "not_object": lambda: rng.choice([b"[1, 2]", b'"just a string"', b"42", b"null"]),
            "trailing_garbage": lambda: good + b" extra",
            "empty_text": lambda: json.dumps({"text": "", "label": l}).encode(),
            "deep_nesting": lambda: b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b', "label": "pos"}',
            "huge_int": lambda: b'{"text": ' + b"9" * 5000 + b', "label": "pos"}',
        }[k]())
    endings = rng.choice(["lf", "crlf", "mixed", "cr"])
    body = b""
    for line in lines:
        body += line + {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r", "mixed": rng.choice([b"\n", b"\r\n", b"\r"])}[endings]
    if kind == "cut":
        body = body.rstrip(b"\r\n")
    if rng.random() < 0.3:
        body = b"\xef\xbb\xbf" + body
    e.kinds.append(endings)
    # a damaged row may leave no training row of a class, or no training row at all: not in this generator
    return body, e


# -- parquet --------------------------------------------------------------------------------------
def _parquet(rng: random.Random, path: Path) -> Expect:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(rng)
    texts: list = [t for t, _ in rows]
    labels: list = [l for _, l in rows]
    kind = rng.choice(["rows", "rows", "huge", "clean", "file"])
    e = Expect()
    if kind == "file":
        which = rng.choice(["truncated", "empty_table", "text_int", "text_binary", "missing_column", "not_parquet"])
        e.kinds = [which]
        if which == "truncated":
            pq.write_table(pa.table({"text": texts, "label": labels}), path)
            data = path.read_bytes()
            path.write_bytes(data[: rng.randint(0, len(data) - 1)])
            e.file_error = ""
        elif which == "empty_table":
            pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), path)
            e.file_error = "has no rows"
        elif which == "text_int":
            pq.write_table(pa.table({"text": list(range(len(rows))), "label": labels}), path)
            e.file_error = "no usable rows"
        elif which == "text_binary":
            pq.write_table(pa.table({"text": [t.encode() for t in texts], "label": labels}), path)
            e.file_error = "no usable rows"
        elif which == "missing_column":
            pq.write_table(pa.table({"review": texts, "label": labels}), path)
            e.file_error = "no column 'text'"
        else:
            path.write_bytes(b"PAR1" + bytes(rng.getrandbits(8) for _ in range(500)))
            e.file_error = ""
        return e
    damaged = set(rng.sample(range(len(rows)), rng.randint(1, 3))) if kind == "rows" else set()
    huge = rng.randrange(len(rows)) if kind == "huge" else None
    for i in range(len(rows)):
        if i == huge:
            texts[i] = _huge(texts[i])
            e.truncated = 1
        if i not in damaged:
            e.valid += 1
            continue
        k = rng.choice(["text_null", "label_null", "empty_text", "nul", "label_nan"])
        e.kinds.append(k)
        e.bad.append(i + 1)
        if k == "text_null":
            texts[i] = None
        elif k == "label_null":
            labels[i] = None
        elif k == "empty_text":
            texts[i] = " "
        elif k == "nul":
            texts[i] = texts[i][:2] + "\x00" + texts[i][2:]
        else:
            labels[i] = float("nan")
    if any(isinstance(l, float) for l in labels):
        labels = [None if isinstance(l, float) else l for l in labels]  # NaN can't share a string column: null instead
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), "label": pa.array(labels, pa.string())}), path)
    return e


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _clean(path: Path, fmt: str, seed: int) -> Path:
    rows = make_texts(12, seed)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [l for _, l in rows]}), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows), encoding="utf-8")
    else:
        d = "," if fmt == "csv" else "\t"
        path.write_text(f"text{d}label\n" + "".join(f"{t}{d}{l}\n" for t, l in rows), encoding="utf-8")
    return path


def _validate(capsys, config: Path, *overrides: str) -> tuple[int, str, str]:
    rc = main(["validate", str(config), "--json", *overrides])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_files_validate_with_exact_counts_or_fail_in_one_line(fmt, tmp_path, tiny_model_dir, tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(TextClassification, "load_tokenizer", lambda self, resolved: tokenizer)
    rng = random.Random(f"fuzz-{fmt}")
    val, test = _clean(tmp_path / f"val.{fmt}", fmt, 1), _clean(tmp_path / f"test.{fmt}", fmt, 2)
    config = tmp_path / "run.yaml"
    seen: dict[str, int] = {}
    for n in range(FILES[fmt]):
        train = tmp_path / f"train{n}.{fmt}"
        if fmt == "parquet":
            e = _parquet(rng, train)
        else:
            body, e = _jsonl(rng) if fmt == "jsonl" else _delimited(rng, "," if fmt == "csv" else "\t")
            train.write_bytes(body)
        for k in e.kinds or ["clean"]:
            seen[k] = seen.get(k, 0) + 1
        config.write_text(yaml.safe_dump({
            "task": "text-classification", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
            "data": {"train": str(train), "validation": str(val), "test": str(test)},
            "train": {"max_length": MAX_LENGTH},
        }))
        what = f"file {n} ({train.name}, damage {e.kinds})"
        where = (lambda line: f"{train} row {line}") if fmt == "parquet" else (lambda line: f"{train}:{line}")
        for mode in ("skip", "error"):
            rc, out, err = _validate(capsys, config, f"data.bad_rows={mode}")
            if e.file_error is not None or (mode == "error" and e.bad):
                assert rc == 2, f"{what}, bad_rows={mode}: expected an error, got {out[-300:]}"
                lines = err.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("tunesmith: error: "), f"{what}: {err[-500:]}"
                assert str(train) in lines[0], f"{what}: the error does not name the file: {lines[0]}"
                if e.file_error is not None:
                    assert e.file_error in lines[0], f"{what}: {lines[0]}"
                else:
                    assert where(e.bad[0]) + ":" in lines[0], f"{what}: {lines[0]}"
                continue
            assert rc == 0 and not err, f"{what}, bad_rows={mode}: {err[-500:]}"
            report = json.loads(out)
            f = next(f for f in report["files"] if f["split"] == "train")
            assert f["rows"] == e.valid, f"{what}: {f['rows']} usable rows, expected {e.valid}"
            assert [b["where"] for b in f["bad"]] == [where(line) for line in e.bad], f"{what}: {f['bad']}"
            assert f["bad_rows"] == len(e.bad)
            if e.truncated is not None:
                assert f["truncated"] == e.truncated and f["tokens"]["max"] > MAX_LENGTH, f"{what}: {f['tokens']}"
        train.unlink()
    # the generator must have exercised every kind of damage it knows for the format
    expected = {
        "csv": ROW_DAMAGE_DELIMITED, "tsv": ROW_DAMAGE_DELIMITED, "jsonl": ROW_DAMAGE_JSONL + ["cut_file"],
        "parquet": ["text_null", "label_null", "empty_text", "nul", "label_nan", "truncated", "not_parquet"],
    }[fmt]
    missing = [k for k in expected if k not in seen]
    assert not missing, f"kinds never generated: {missing}"


def test_damaged_images_are_each_named_and_counted(tmp_path, capsys):
    """image-classification: 1,000 image files, about a third damaged (truncated at a random byte,
    random bytes under an image name, zero bytes, a text file, a valid image under a wrong
    extension is fine); validate with bad_rows=skip lists exactly the damaged ones, and with the
    default fails in one line naming the first."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    timm.models.save_for_hf(timm.create_model("test_efficientnet", pretrained=False), str(model_dir), safe_serialization=True)
    rng = random.Random("fuzz-images")
    nprng = np.random.default_rng(0)
    root = tmp_path / "train"
    damaged: set[str] = set()
    kinds: dict[str, int] = {}
    for n in range(1000):
        cls = ("a", "b", "c")[n % 3]
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        fmt = rng.choice(["png", "jpg", "bmp", "webp"])
        f = d / f"{n:04d}.{fmt}"
        arr = nprng.integers(0, 255, (rng.randint(8, 40), rng.randint(8, 40), 3), dtype=np.uint8)
        Image.fromarray(arr).save(f, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
        kind = rng.choice(["ok", "ok", "truncated", "random", "empty", "text", "mislabelled_ext"])
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "truncated":
            data = f.read_bytes()
            f.write_bytes(data[: rng.randint(1, len(data) // 2)])
        elif kind == "random":
            f.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 500))))
        elif kind == "empty":
            f.write_bytes(b"")
        elif kind == "text":
            f.unlink()
            f = d / f"{n:04d}.txt"
            f.write_text("notes")
        elif kind == "mislabelled_ext":  # a PNG named .jpg: Pillow reads the content, so it is fine
            g = f.with_suffix(".jpg" if fmt != "jpg" else ".png")
            Image.fromarray(arr).save(g, format="PNG" if fmt != "jpg" else "JPEG")
            f.unlink()
        if kind in ("truncated", "random", "empty", "text"):
            damaged.add(str(f))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"task": "image-classification", "model": str(model_dir),
                                      "output_dir": str(tmp_path / "run"), "data": {"train": str(root)}}))
    rc, out, err = _validate(capsys, config, "data.bad_rows=skip")
    assert rc == 0, err[-2000:]
    report = json.loads(out)
    train = next(f for f in report["files"] if f["split"] == "train")
    rows = sum(f["rows"] for f in report["files"])
    assert train["bad_rows"] == len(damaged) and rows == 1000 - len(damaged), (train["bad_rows"], len(damaged))
    rc, out, err = _validate(capsys, config)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("tunesmith: error: ") and f"{len(damaged)} bad image(s)" in lines[0]
    assert any(p in lines[0] for p in damaged)
    assert all(kinds.get(k) for k in ("truncated", "random", "empty", "text", "mislabelled_ext"))
