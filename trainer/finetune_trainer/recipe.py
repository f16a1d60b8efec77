"""Defaults that depend on the data a job gets: the batch size and how many passes over the training set
make an epoch (``plan_batches``), when the spec leaves ``batchSize`` open, with the line that tells the
log what was chosen and why.

Why: a fixed batch of 64 gives 25 few-shot images one optimiser step per epoch, so 15 epochs are 15 steps
and nothing converges. Small sets get small batches (noisier steps generalise better there) and, below a
minimum number of optimiser steps for the job, several passes per epoch. An explicit ``batchSize`` is
taken as it is: whoever sets it has chosen the steps too. Pure: no torch, no Ray; table-tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec

__all__ = ["MAX_AUTO_BATCH", "MIN_AUTO_BATCH", "MIN_STEPS", "BatchPlan", "batch_size", "plan_batches", "with_batch_plan"]

MAX_AUTO_BATCH: Final = 64
MIN_AUTO_BATCH: Final = 8
STEPS_PER_PASS: Final = 8
"""The automatic batch gives one pass over the training set at least this many steps (above the minimum batch)."""
MIN_STEPS: Final = 200
"""Optimiser steps a job gets at least with the automatic batch (more passes per epoch on small sets)."""
MAX_PASSES: Final = 16


@dataclass(frozen=True)
class BatchPlan:
    """The global batch size, the passes over the training set per epoch, and what to log (None when the
    spec set the batch size itself)."""

    batch_size: int
    passes: int
    chosen: str | None

    def steps_per_epoch(self, train_images: int, workers: int) -> int:
        """Optimiser steps of one epoch (the last batch of a worker is dropped only when it holds one image)."""
        per_worker = max(1, self.batch_size // workers)
        shard = math.ceil(train_images * self.passes / workers)
        return shard // per_worker + (1 if shard % per_worker > 1 else 0)


def _power_of_two_below(value: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(1.0, value))))


def plan_batches(batch_size: int | None, epochs: int, train_images: int, workers: int) -> BatchPlan:
    """``batchSize`` as given, else the largest power of two up to ``MAX_AUTO_BATCH`` that gives a pass at
    least ``STEPS_PER_PASS`` steps (never below ``MIN_AUTO_BATCH``, a multiple of ``workers`` with at least
    two images each), and as many passes per epoch as it takes to reach ``MIN_STEPS`` over the job."""
    if batch_size is not None:
        return BatchPlan(batch_size, 1, None)
    batch = min(MAX_AUTO_BATCH, max(MIN_AUTO_BATCH, _power_of_two_below(train_images / STEPS_PER_PASS)))
    batch = max(batch, 2 * workers)
    batch = math.ceil(batch / workers) * workers
    plan = BatchPlan(batch, 1, None)
    steps = plan.steps_per_epoch(train_images, workers) * epochs
    passes = min(MAX_PASSES, math.ceil(MIN_STEPS / max(1, steps))) if steps < MIN_STEPS else 1
    plan = BatchPlan(batch, passes, None)
    total = plan.steps_per_epoch(train_images, workers) * epochs
    why = f"batch size {batch} (automatic: {train_images} training images"
    if passes > 1:
        why += f"; {passes} passes per epoch to reach {total} optimiser steps over {epochs} epochs)"
    else:
        why += f"; {total} optimiser steps over {epochs} epochs)"
    return BatchPlan(batch, passes, why)


def with_batch_plan(cfg: TrainerConfig, train_images: int, workers: int) -> tuple[TrainerConfig, BatchPlan]:
    """``cfg`` with the planned batch size written into its spec (from here on loaders, checkpoints and
    the model card all read the batch size in use), and the plan."""
    hp = cfg.spec.hyperparameters
    plan = plan_batches(hp.batch_size, hp.epochs, train_images, workers)
    spec = cfg.spec.model_copy(update={"hyperparameters": hp.model_copy(update={"batch_size": plan.batch_size})})
    return cfg.model_copy(update={"spec": spec}), plan


def batch_size(spec: FineTuneJobSpec) -> int:
    """The global batch size of a spec that went through ``with_batch_plan``."""
    if spec.hyperparameters.batch_size is None:
        raise ValueError("the batch size is chosen by with_batch_plan before training starts")
    return spec.hyperparameters.batch_size
