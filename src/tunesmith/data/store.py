"""Data on disk rather than in memory: what keeps a run's memory flat as the data set grows.

A `Spill` is one unlinked temporary file in the cache folder that only grows: records are appended
with pwrite and read back with pread, through the page cache, never mapped into the process, so
they do not count in its resident memory (benchmarks/bench_memory.py measures it). The file has no
name once created: its space is freed when the process ends, even on SIGKILL.

`Records` are variable-length records in a spill (texts, token ids, decoded images): only their
start and end offsets, 16 bytes a record, stay in memory. A subset or a reordering is a new
`Records` over the same spill; nothing is copied.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

BLOCK = 8 << 20  # reads of neighbouring records are merged up to this many bytes


def spill_dir() -> Path:
    from tunesmith.models.cache import cache_root  # the cache folder: on disk, where /tmp may be in RAM

    return cache_root() / "tmp"


class Spill:
    """An append-only unlinked file: `append(bytes) -> offset`, `read(offset, size) -> bytes`. Appends
    are buffered (up to 1 MiB, one write a buffer rather than one a record)."""

    BUFFER = 1 << 20

    def __init__(self, directory: Path | None = None, prefix: str = "spill-"):
        directory = directory or spill_dir()
        directory.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=directory, prefix=prefix)
        self._written = 0  # bytes in the file; the rest of `size` is in the buffer
        self._buffer = bytearray()
        self.size = 0

    def append(self, data: bytes | memoryview) -> int:
        offset = self.size
        self._buffer += data
        self.size += memoryview(data).nbytes
        if len(self._buffer) >= self.BUFFER:
            self.flush()
        return offset

    def flush(self) -> None:
        view = memoryview(self._buffer)
        while view.nbytes:  # pwrite may write less than asked
            n = os.pwrite(self._file.fileno(), view, self._written)
            self._written += n
            view = view[n:]
        del view
        self._buffer.clear()

    def read(self, offset: int, size: int) -> bytes:
        if offset + size > self._written:
            self.flush()
        data = os.pread(self._file.fileno(), size, offset)
        while len(data) < size:  # a short read (signals, very large sizes): read the rest
            more = os.pread(self._file.fileno(), size - len(data), offset + len(data))
            if not more:
                raise OSError(f"spill file ended at {offset + len(data)} of {offset + size}")
            data += more
        return data


class Records:
    """Records i = spill bytes [starts[i], ends[i]); see the module docstring."""

    def __init__(self, spill: Spill, starts: np.ndarray, ends: np.ndarray):
        self.spill, self.starts, self.ends = spill, starts, ends

    @classmethod
    def write(cls, spill: Spill, items: Iterable[bytes]) -> "Records":
        out = RecordsBuilder(spill)
        for b in items:
            out.append(b)
        return out.done()

    @classmethod
    def join(cls, parts: Sequence["Records"]) -> "Records":
        """One Records of `parts` in order; parts on another spill than the first are copied into it."""
        spill = parts[0].spill
        starts, ends = [], []
        for p in parts:
            if p.spill is not spill:
                p = cls.write(spill, p.blocks())
            starts.append(p.starts)
            ends.append(p.ends)
        return cls(spill, np.concatenate(starts), np.concatenate(ends))

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, i: int) -> bytes:
        return self.spill.read(int(self.starts[i]), int(self.ends[i] - self.starts[i]))

    def take(self, idx: Sequence[int] | np.ndarray) -> "Records":
        idx = np.asarray(idx, dtype=np.int64)
        return Records(self.spill, self.starts[idx], self.ends[idx])

    @property
    def sizes(self) -> np.ndarray:
        return self.ends - self.starts

    def range(self, a: int, b: int) -> list[bytes]:
        """Records a..b-1, read in as few reads as their layout allows."""
        out: list[bytes] = []
        i = a
        while i < b:
            j, lo, hi = i + 1, int(self.starts[i]), int(self.ends[i])
            # extend while the next record lies after this one and the read stays small
            while j < b and self.starts[j] >= hi and self.ends[j] - lo <= BLOCK and self.starts[j] - hi <= 4096:
                hi = int(self.ends[j])
                j += 1
            data = memoryview(self.spill.read(lo, hi - lo))
            out.extend(bytes(data[self.starts[k] - lo : self.ends[k] - lo]) for k in range(i, j))
            i = j
        return out

    def blocks(self, rows: int = 4096) -> Iterator[bytes]:
        for a in range(0, len(self), rows):
            yield from self.range(a, min(a + rows, len(self)))


def encode(text: str) -> bytes:
    """UTF-8; a lone surrogate (a bad byte kept by surrogateescape) round-trips instead of failing."""
    return text.encode("utf-8", "surrogatepass")


class StoredStrings(Sequence):
    """A read-only list of strings kept in a spill (UTF-8); a slice reads back a list of str."""

    def __init__(self, records: Records):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            a, b, step = i.indices(len(self))
            if step != 1:
                return [self[k] for k in range(a, b, step)]
            return [x.decode("utf-8", "surrogatepass") for x in self.records.range(a, b)]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.records.get(i).decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        for a in range(0, len(self), 4096):
            yield from self[a : a + 4096]

    def take(self, idx: Sequence[int]) -> "StoredStrings":
        return StoredStrings(self.records.take(idx))


class RecordsBuilder:
    """Appends records to a spill as they come (a row at a time while a file is read); `done()` gives them."""

    def __init__(self, spill: Spill):
        self.spill, self.starts, self.ends = spill, array("q"), array("q")

    def append(self, data: bytes | memoryview) -> None:
        offset = self.spill.append(data)
        self.starts.append(offset)
        self.ends.append(offset + memoryview(data).nbytes)

    def done(self) -> Records:
        return Records(self.spill, as_int64(self.starts), as_int64(self.ends))


def as_int64(a: array) -> np.ndarray:
    """An array('q') as numpy without a copy (the array must not grow afterwards)."""
    return np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, np.int64)


def key_hash(*parts: str | bytes | None) -> int:
    """A 64-bit content hash (BLAKE2b) of a row's parts: what duplicate and overlap checks compare,
    8 bytes a row in place of the row itself (a false match needs ~4e9 rows to be likely)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if p is None:
            h.update(b"\xff")
            continue
        b = encode(p) if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return int.from_bytes(h.digest(), "little", signed=True)
