"""The stratified train/validation split of a labelled set: ``stratified_split(labels, fraction, seed)``.

It picks the very indices scikit-learn's ``train_test_split(range(n), test_size=fraction, stratify=labels,
random_state=seed)`` picks (its ``StratifiedShuffleSplit``: per-class counts from the approximate mode of
the multivariate hypergeometric, then each class's members drawn, all from one ``RandomState(seed)`` in
the same order), written with numpy alone: importing ``sklearn.model_selection`` cost every training
worker about a second of CPU at start-up (bench/README.md, "Start-up"), for some twenty lines. Inputs that
scikit-learn refuses are refused here too, in the same order of checks. ``tests/unit/test_split.py``
compares both on many label sets; the split no longer changes with the installed scikit-learn version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = ["stratified_split"]


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted (train, validation) indices into ``labels``, every class keeping its share of both; ValueError,
    saying why, when ``fraction`` of these labels cannot be held out that way."""
    n = len(labels)
    if not 0 < fraction < 1:
        raise ValueError(f"the fraction {fraction} is not in (0, 1)")
    n_val = math.ceil(fraction * n)  # scikit-learn's rounding: validation up, training takes the rest
    n_train = n - n_val
    if n_train == 0:
        raise ValueError(f"{n} image(s) leave none for training")
    classes, per_class, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    if counts.min() < 2:
        raise ValueError(f"classes {classes[counts < 2].tolist()} have a single image, too few to split")
    if n_train < len(classes) or n_val < len(classes):
        side, size = ("training", n_train) if n_train < len(classes) else ("validation", n_val)
        raise ValueError(f"{size} {side} image(s) for {len(classes)} classes")
    members = np.split(np.argsort(per_class, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    train_counts = _approximate_mode(counts, n_train, rng)
    val_counts = _approximate_mode(counts - train_counts, n_val, rng)
    train: list[int] = []
    val: list[int] = []
    for i in range(len(classes)):
        drawn = members[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(int(j) for j in drawn[: train_counts[i]])
        val.extend(int(j) for j in drawn[train_counts[i] : train_counts[i] + val_counts[i]])
    return sorted(train), sorted(val)


def _approximate_mode(counts: NDArray[np.int64], draws: int, rng: np.random.RandomState) -> NDArray[np.int64]:
    """How many of ``draws`` each class gets: floors of the proportional shares, then one more to the largest
    remainders, ties drawn at random (scikit-learn's ``utils.extmath._approximate_mode``, same draws)."""
    continuous: NDArray[np.float64] = counts / counts.sum() * draws
    floored: NDArray[np.float64] = np.floor(continuous)
    missing = int(draws - floored.sum())
    if missing > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            now = min(len(tied), missing)
            floored[rng.choice(tied, size=now, replace=False)] += 1
            missing -= now
            if missing == 0:
                break
    return floored.astype(np.int64)
