"""The trainer's numpy-only split and digits loader give what scikit-learn's give (``split``, ``digits``): the
same images in each split for the same seed, the same inputs refused, the same digits."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.datasets import load_digits as sklearn_load_digits
from sklearn.model_selection import train_test_split

from finetune_trainer.digits import load_digits
from finetune_trainer.split import stratified_split

# What each side says when a split cannot be made.
OURS = r"have a single image, too few to split|leave none for training|image\(s\) for \d+ classes"
SKLEARN = r"least populated class|should be greater or equal to the number of classes|resulting train set will be empty"


def sklearn_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """What ``data._split`` called before: scikit-learn's stratified train_test_split, sorted."""
    train, val = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=np.asarray(labels), random_state=seed)
    return sorted(int(i) for i in train), sorted(int(i) for i in val)


def label_sets() -> list[tuple[list[int], float, int]]:
    """Balanced, skewed, tiny and large sets, ties in the class counts and in the remainders, many seeds."""
    rng = np.random.default_rng(7)
    cases: list[tuple[list[int], float, int]] = []
    for _ in range(300):
        classes = int(rng.integers(2, 12))
        counts = rng.integers(2, int(rng.choice([4, 12, 60, 400])), size=classes)
        labels = [int(c) for c in rng.permutation(np.repeat(np.arange(classes) * 3, counts))]  # gaps in the ids
        cases.append(
            (
                labels,
                float(rng.choice([0.1, 0.2, 0.25, 1 / 3, 0.5, 0.7, float(rng.uniform(0.05, 0.9))])),
                int(rng.integers(0, 2**31)),
            )
        )
    digits = [int(t) for t in sklearn_load_digits().target]
    cases += [(digits, 0.25, seed) for seed in (0, 1, 42, 2**32 - 1)]
    return cases


def test_the_split_is_scikit_learns() -> None:
    agreed = refused = 0
    for labels, fraction, seed in label_sets():
        try:
            expected = sklearn_split(labels, fraction, seed)
        except ValueError:
            with pytest.raises(ValueError, match=OURS):
                stratified_split(labels, fraction, seed)
            refused += 1
            continue
        assert stratified_split(labels, fraction, seed) == expected, (fraction, seed, np.bincount(labels).tolist())
        agreed += 1
    # Both kinds of case were exercised, not only one.
    assert agreed > 200 and refused > 5, (agreed, refused)


@pytest.mark.parametrize(
    ("labels", "fraction", "message"),
    [
        ([0, 0, 1], 0.5, "classes [1] have a single image, too few to split"),
        ([0, 0, 1, 1], 0.9, "4 image(s) leave none for training"),
        ([0, 0, 1, 1, 2, 2], 0.2, "2 validation image(s) for 3 classes"),
        ([0, 0, 1, 1, 2, 2], 0.7, "1 training image(s) for 3 classes"),
    ],
)
def test_a_split_that_cannot_be_made_says_why(labels: list[int], fraction: float, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        stratified_split(labels, fraction, 0)
    with pytest.raises(ValueError, match=SKLEARN):  # scikit-learn refuses these too
        sklearn_split(labels, fraction, 0)


def test_the_digits_are_scikit_learns() -> None:
    images, targets = load_digits()
    bunch = sklearn_load_digits()
    assert images.dtype == bunch.images.dtype and np.array_equal(images, bunch.images)
    assert np.array_equal(targets, bunch.target)
