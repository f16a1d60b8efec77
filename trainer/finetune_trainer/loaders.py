"""The data loaders of one Ray Train worker: ``build_loaders`` -> ``Shards``.

The training images are sharded by a seeded ``DistributedSampler`` that ``ray.train.torch.prepare_data_loader``
keeps (it adds one only when there is none), augmented by ``(seed, epoch, index)`` as ``seeding`` lays
out; validation is a strided, unpadded shard, so that every image is evaluated exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import ray.train
import ray.train.torch
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.errors import TrainerError
from finetune_trainer.recipe import batch_size
from finetune_trainer.seeding import EpochSampler, SeededSamples, loader_generator, seed_loader_worker

__all__ = ["EpochOrder", "Shards", "Source", "build_loaders", "workers"]

Labelled = Dataset[tuple[Tensor, int]]


class EpochOrder(Protocol):
    """A sampler told which epoch comes next: it reshuffles by it."""

    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class Shards:
    """This worker's view of the data: a seeded sampler (a DistributedSampler over the images; over cached
    features, ``feature_cache.RankShuffle``) and a strided, unpadded validation shard. Images are
    augmented as ``seeding`` says: by ``(seed, epoch, index)``, the epoch coming from the sampler."""

    train: DataLoader[Any]
    sampler: EpochOrder
    val: DataLoader[Any]

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def end_epoch(self, device: torch.device) -> str | None:
        """Nothing to check: unreadable files were skipped when the folder was scanned (``image_folder``)."""
        return None

    def first_batches(self, images: int, most: int) -> Any:
        """This epoch's training batches, of which precise BatchNorm takes the first (a DataLoader stops its workers
        when the iteration is dropped)."""
        return self.train


class Source(Protocol):
    """What the loop trains and evaluates on: ``Shards`` (map-style) or ``streaming.StreamSource``. ``train`` has a
    length (steps per epoch: the schedule is sized by it) and is iterated once per epoch after ``set_epoch``;
    ``end_epoch`` runs on every worker after evaluation (it may be a collective) and returns a warning to give."""

    @property
    def train(self) -> Any: ...

    @property
    def val(self) -> Any: ...

    def set_epoch(self, epoch: int) -> None: ...

    def end_epoch(self, device: torch.device) -> str | None: ...

    def first_batches(self, images: int, most: int) -> Any:
        """This epoch's first training batches, enough for ``images`` images in at most ``most`` batches, as an
        iterable with a length: what precise BatchNorm forwards (``batchnorm.recompute_batch_norm``)."""
        ...


def workers() -> tuple[int, int]:
    """(world rank, world size) of this Ray Train worker."""
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def build_loaders(
    spec: FineTuneJobSpec,
    train: Labelled,
    val: Labelled,
    loader_workers: int | None = None,
    *,
    passes: int = 1,
) -> Shards:
    """``train`` holds images, randomly augmented unless the preset is ``none``; only then does each image
    get its own seed (``seeding.SeededSamples``). (Cached features have their own: ``feature_cache``.)
    ``passes`` > 1: an epoch goes that many times over the training images (``recipe``), each pass
    drawing its own augmentation (the seed follows the position in the repeated list)."""
    rank, world = workers()
    seed = spec.hyperparameters.seed
    augmented = spec.dataset.augmentation != "none"
    if passes > 1:
        train = Subset(train, [i for _ in range(passes) for i in range(len(train))])  # type: ignore[arg-type]
    per_worker = max(1, batch_size(spec) // world)
    kind = EpochSampler if augmented else DistributedSampler
    sampler: DistributedSampler[Any] = kind(train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    # A last batch of one image breaks BatchNorm in train mode; drop it, and only it.
    drop_last = len(sampler) % per_worker == 1
    if len(sampler) // per_worker == 0 and drop_last:
        raise TrainerError(f"dataset: {len(train)} training images are too few for {world} workers (each needs at least 2)")  # type: ignore[arg-type]
    processes = spec.dataset.loader_workers if loader_workers is None else loader_workers
    common: dict[str, Any] = {
        "num_workers": processes,
        "persistent_workers": processes > 0,
        "pin_memory": torch.cuda.is_available(),
        "generator": loader_generator(seed, rank),
        "worker_init_fn": seed_loader_worker,
    }
    images = SeededSamples(train, seed) if augmented else train
    train_loader: DataLoader[Any] = DataLoader(images, batch_size=per_worker, sampler=sampler, drop_last=drop_last, **common)
    # prepare_data_loader keeps our sampler (it adds one only when there is none) and moves batches to the device.
    train_loader = ray.train.torch.prepare_data_loader(train_loader)
    # Validation: every image exactly once across workers (a DistributedSampler would pad with repeats).
    val_shard = Subset(val, range(rank, len(val), world))  # type: ignore[arg-type]
    val_loader: DataLoader[Any] = DataLoader(val_shard, batch_size=per_worker * 2, shuffle=False, **common)
    return Shards(train_loader, sampler, val_loader)
