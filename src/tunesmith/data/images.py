"""Labelled images: a folder per class (the ImageFolder convention) or a CSV/JSONL/Parquet of
`path,label` with paths relative to that file; decoding and the model's own preprocessing.

Every image is decoded once, in the pre-flight scan: an unreadable, truncated or non-image file
is reported by path (`data.bad_rows: error`, the default, stops before training with the list;
`skip` drops and counts them). Decoded images are kept, resized so the shorter side is the
model's evaluation resize (`size / crop_pct`, as timm's eval transform does), as uint8 pixels in
an on-disk store (`ImageStore`: memory stays flat however many images there are): evaluation and
prediction centre-crop them, training augments them, and no image is decoded twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from tunesmith.data.readers import SUPPORTED, read_table
from tunesmith.data.store import Spill
from tunesmith.data.text import require_column, label_value, line_of
from tunesmith.errors import UserError

if TYPE_CHECKING:  # type hints only: config imports nothing of data/ and data/ nothing of config
    from tunesmith.config import DataConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageSet:
    name: str  # train | validation | test
    source: str
    paths: list[Path]
    labels: list[Any]
    where: list[str]  # the path, or file:line for a CSV/JSONL row
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: list[int], name: str, source: str) -> "ImageSet":
        return ImageSet(name, source, [self.paths[i] for i in idx], [self.labels[i] for i in idx], [self.where[i] for i in idx])


@dataclass(frozen=True)
class Preprocess:
    """timm's evaluation transform, in numbers: resize the shorter side to `resize`, centre-crop
    `size`, scale to [0, 1], normalise with `mean`/`std`."""

    size: int
    resize: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_timm(cls, data_config: dict[str, Any], size: int | None = None) -> "Preprocess":
        size = size or int(data_config["input_size"][-1])
        crop_pct = float(data_config.get("crop_pct") or 0.875)
        return cls(size, int(math.floor(size / crop_pct)), crop_pct, data_config.get("interpolation") or "bicubic",
                   tuple(data_config["mean"]), tuple(data_config["std"]))

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "resize": self.resize, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}


def to_rgb(im: Any) -> Any:
    """Any Pillow mode as 8-bit RGB. 16- and 32-bit integer images are scaled to 0-255 (Pillow's
    own conversion would clip everything above 255 to white); palette, grayscale, CMYK, alpha:
    Pillow's conversion, as timm's and torchvision's loaders do."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else (65535.0 if a.max(initial=0) > 255 else 255.0)
        if im.mode == "F":
            top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(a, "L")
    return im.convert("RGB")


def decode(path: Path | BinaryIO, pre: Preprocess) -> torch.Tensor:
    """The image at `path` (or in an open binary file) as uint8 (3, H, W), shorter side resized to `pre.resize`.

    Raises ValueError with a reason when the file is not a readable image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not in the middle of training
            rgb = to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ValueError(f"too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        msg = str(e).replace(str(path), "").strip(" :'\"") or type(e).__name__
        raise ValueError(f"not a readable image ({msg})") from None
    w, h = rgb.size
    if w < 1 or h < 1:
        raise ValueError("has no pixels")
    # torchvision's Resize(int): the shorter side becomes `resize`, the longer one is truncated
    size = (pre.resize, int(pre.resize * h / w)) if w <= h else (int(pre.resize * w / h), pre.resize)
    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
              "lanczos": Image.LANCZOS}.get(pre.interpolation, Image.BICUBIC)
    if size != (w, h):
        rgb = rgb.resize(size, method)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageStore:
    """Decoded images on disk, not in memory (a `Spill`: see tunesmith.data.store), so a training run's
    memory does not grow with the number of images. 20,000 images at a 256-pixel resize are about
    4 GB of pixels. The index (offset and shape of each image, 24 bytes) stays in memory."""

    def __init__(self, directory: Path | None = None):
        self._spill = Spill(directory, prefix="images-")
        self._index: list[tuple[int, int, int, int]] = []  # (offset, channels, height, width)

    def add(self, img: torch.Tensor) -> int:
        """Store a uint8 (C, H, W) image; returns its id."""
        self._index.append((self._spill.append(img.contiguous().numpy().tobytes()), *img.shape))
        return len(self._index) - 1

    def get(self, i: int) -> torch.Tensor:
        offset, c, h, w = self._index[i]
        return torch.frombuffer(bytearray(self._spill.read(offset, c * h * w)), dtype=torch.uint8).view(c, h, w)


class StoredImages(Sequence):
    """A list of images that lives in an ImageStore: indexing reads one image back."""

    def __init__(self, store: ImageStore, ids: list[int]):
        self.store, self.ids = store, list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.store.get(self.ids[i])

    def take(self, idx: list[int]) -> "StoredImages":
        return StoredImages(self.store, [self.ids[i] for i in idx])

    def __add__(self, other: "StoredImages") -> "StoredImages":
        if other.store is not self.store:
            raise ValueError("images of two stores cannot be joined")
        return StoredImages(self.store, self.ids + other.ids)


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop arithmetic (the offsets timm's eval transform uses)."""
    _, h, w = img.shape
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[:, top : top + size, left : left + size]


def normalize(batch: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalised float32, channels-last (the fast layout for CPU convolutions)."""
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0
    x = (batch.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


# -- reading -------------------------------------------------------------------------------------
def read_image_set(path: str, cfg: DataConfig, name: str, labelled: bool = True) -> ImageSet:
    """The images and labels a folder or table names; problems found without decoding (missing
    paths, non-image files, empty class folders) are in `bad` (the caller decides error or skip)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data path {p} does not exist")
    if p.is_dir():
        return _read_folder(p, cfg, name)
    if p.suffix.lower() in SUPPORTED:
        return _read_listing(p, cfg, name, labelled)
    raise UserError(
        f"{p}: image data is a folder with one sub-folder per class, or a .csv/.tsv/.jsonl/.parquet file of "
        f"'{cfg.image_column}' and '{cfg.label_column}' columns"
    )


def _visible(p: Path | str) -> bool:
    name = p if isinstance(p, str) else p.name
    return not name.startswith(".") and not name.startswith("__")


def _read_folder(root: Path, cfg: DataConfig, name: str) -> ImageSet:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and _visible(d))
    loose = [f for f in root.iterdir() if f.is_file() and _visible(f) and f.suffix.lower() in IMAGE_SUFFIXES]
    if not classes:
        raise UserError(
            f"{root} has no class sub-folders{f' ({len(loose)} images lie directly in it)' if loose else ''}; "
            "put each class's images in a folder named after the class: "
            f"{root}/cat/1.jpg, {root}/dog/2.jpg"
        )
    paths, labels, where, bad = [], [], [], []
    for d in classes:
        files = sorted(f for f in d.rglob("*") if f.is_file() and all(_visible(x) for x in f.relative_to(d).parts))
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        bad += [(str(f), f"not an image file ('{f.suffix or f.name}'); remove it or move it out of the class folder")
                for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            bad.append((str(d), "class folder has no images"))
            continue
        paths += images
        labels += [d.name] * len(images)
        where += [str(f) for f in images]
    if not paths:
        raise UserError(f"{root}: no images in any class folder ({', '.join(d.name for d in classes[:10])})")
    return ImageSet(name, str(root), paths, labels, where, bad)


def _read_listing(table_path: Path, cfg: DataConfig, name: str, labelled: bool) -> ImageSet:
    bad: list[tuple[str, str]] = []
    table = read_table(table_path, cfg.max_rows, malformed=bad)
    require_column(table, cfg.image_column, "image_column")
    if labelled:
        require_column(table, cfg.label_column, "label_column")
    base = table_path.parent
    paths, labels, where = [], [], []
    for i, row in enumerate(table.rows):
        rel = row.get(cfg.image_column)
        w = table.where(i)
        if not isinstance(rel, str) or not rel.strip():
            bad.append((w, f"'{cfg.image_column}' is empty or not a string"))
            continue
        f = (base / rel.strip()).resolve() if not Path(rel.strip()).is_absolute() else Path(rel.strip())
        if not f.is_file():
            bad.append((w, f"image not found: {f}"))
            continue
        label = label_value(row.get(cfg.label_column), None) if labelled else None
        if labelled and (label is None or isinstance(label, list)):
            bad.append((w, "label is missing or not a string/integer"))
            continue
        paths.append(f)
        labels.append(label)
        where.append(w)
    bad.sort(key=lambda b: line_of(b[0]))
    if not paths and not bad:
        raise UserError(f"{table_path}: no data rows, only a header")
    return ImageSet(name, str(table_path), paths, labels, where, bad)
