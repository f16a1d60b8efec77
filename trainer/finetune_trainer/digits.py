"""scikit-learn's bundled handwritten digits as arrays: ``load_digits() -> (images, targets)``.

The ``digits`` dataset of a job (``data``) is the file scikit-learn ships, read here as its
``sklearn.datasets.load_digits`` reads it (``np.loadtxt`` of ``digits.csv.gz``: 64 pixels 0–16 and the
digit per row), without importing scikit-learn: that import cost every training worker of a digits job
about a second of CPU at start-up (bench/README.md, "Start-up"). If a scikit-learn release moves the file,
its own loader is used. ``tests/unit/test_split.py`` compares both.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = ["load_digits"]

# Where scikit-learn keeps the file, inside its package (sklearn/datasets/_base.py: DATA_MODULE, load_digits).
_FILE = ("datasets", "data", "digits.csv.gz")


def load_digits() -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """(images: N×8×8 floats 0–16, targets: N ints 0–9), as ``load_digits().images`` and ``.target`` hold them."""
    path = _bundled_file()
    if path is None:
        from sklearn.datasets import load_digits as sklearn_load_digits

        bunch = sklearn_load_digits()
        return bunch.images, bunch.target
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _bundled_file() -> Path | None:
    # find_spec of a top-level package locates it without importing it.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *_FILE)
    return path if path.is_file() else None
