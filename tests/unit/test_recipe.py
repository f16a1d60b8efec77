"""Defaults that adapt to the data: the automatic batch size and passes per epoch (``plan_batches``).
Pure arithmetic, table-driven."""

from __future__ import annotations

import pytest

from finetune_trainer.recipe import MIN_STEPS, BatchPlan, plan_batches


@pytest.mark.parametrize(
    ("batch_size", "epochs", "images", "workers", "batch", "passes"),
    [
        # an explicit batch size is taken as it is, one pass per epoch, nothing to report
        (64, 15, 25, 1, 64, 1),
        (16, 6, 50, 1, 16, 1),
        # 5 few-shot images per class: the smallest batch, and passes until the job has MIN_STEPS steps
        (None, 15, 25, 1, 8, 5),  # 3 steps a pass (the 25th image dropped), 16 an epoch
        # 20 per class: 100 images, batches of 8 (a pass of 12 steps), two passes
        (None, 15, 100, 1, 8, 2),
        # a mid-sized set: 720 images → 64 per batch would give 11 steps; 64 is the cap
        (None, 15, 720, 1, 64, 2),
        (None, 40, 720, 1, 64, 1),
        # large sets: the cap, one pass
        (None, 10, 50_000, 1, 64, 1),
        # a batch for several workers is a multiple of them with at least two images each
        (None, 15, 25, 3, 9, 5),
        (None, 15, 25, 8, 16, 7),
        (None, 10, 50_000, 3, 66, 1),
        # very short jobs are capped at 16 passes
        (None, 1, 10, 1, 8, 16),
    ],
)
def test_plan_batches(batch_size: int | None, epochs: int, images: int, workers: int, batch: int, passes: int) -> None:
    plan = plan_batches(batch_size, epochs, images, workers)
    assert (plan.batch_size, plan.passes) == (batch, passes)
    assert plan.batch_size % workers == 0
    assert (plan.chosen is None) is (batch_size is not None)
    if plan.chosen is not None:
        assert f"batch size {batch}" in plan.chosen and f"{images} training images" in plan.chosen


@pytest.mark.parametrize(("images", "epochs"), [(25, 15), (100, 15), (720, 15), (250, 5)])
def test_automatic_plan_reaches_the_minimum_steps(images: int, epochs: int) -> None:
    plan = plan_batches(None, epochs, images, 1)
    assert plan.steps_per_epoch(images, 1) * epochs >= MIN_STEPS


@pytest.mark.parametrize(
    ("plan", "images", "workers", "steps"),
    [
        (BatchPlan(8, 1, None), 25, 1, 3),  # 8+8+8+1: the last batch of one image is dropped
        (BatchPlan(8, 1, None), 26, 1, 4),  # 8+8+8+2: kept
        (BatchPlan(8, 4, None), 25, 1, 13),  # 100 images
        (BatchPlan(8, 1, None), 32, 2, 4),  # 16 per worker in batches of 4
    ],
)
def test_steps_per_epoch(plan: BatchPlan, images: int, workers: int, steps: int) -> None:
    assert plan.steps_per_epoch(images, workers) == steps
