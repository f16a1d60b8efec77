"""The streaming ingest path: listed images read, decoded and augmented by Ray Data while training runs
(``StreamSource``), the counterpart of ``loaders.Shards`` behind the same seam (``set_epoch``, ``train``,
``val``, ``end_epoch``).

Per epoch each worker streams its own share of the training list: the positions a seeded
``DistributedSampler`` gives that rank for ``(seed, epoch)``, padded alike (``epoch_indices``), so both
ingest paths see the same images per rank and every rank runs the same number of steps (DDP would hang
otherwise). Ray Data tasks, on whichever node has CPUs (CPU-only nodes included), read each file through
fsspec, decode it with PIL and apply the transform seeded by ``(seed, epoch, index)`` as ``seeding`` lays out
(``Decoder``); order is preserved, so a run is reproducible. Validation is a strided, unpadded shard: each
image evaluated once. Unreadable files are found while decoding: in training replaced by another image of
the same batch (step counts stay equal), in validation dropped; both counted (``Unreadable``), a warning
below ``MAX_UNREADABLE_FRACTION``, a one-line TrainerError naming some files above it. Memory and disk stay
bounded: nothing is copied, and Ray Data's streaming executor holds only the blocks in flight.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from finetune_trainer.errors import TrainerError
from finetune_trainer.image_folder import MAX_UNREADABLE_FRACTION, READ_ERRORS, StreamedImages, decode_image, read_file
from finetune_trainer.seeding import seeded_sample

__all__ = ["Decoder", "StreamSource", "Unreadable", "epoch_indices", "steps_per_epoch"]

log = logging.getLogger(__name__)

EARLY_CHECK: Final = 1000
"""A worker that has read this many images checks the unreadable limit on its own, without waiting for the epoch's end."""
_EXAMPLES: Final = 3
_BLOCK_ROWS: Final = 64
"""Rows per Ray Data block and decode task: small enough that the first batch arrives in seconds."""


def epoch_indices(n: int, world: int, rank: int, seed: int, epoch: int) -> list[int]:
    """Rank ``rank``'s positions among ``n`` training images in ``epoch``: exactly a seeded DistributedSampler's
    (shuffled by ``(seed, epoch)``, padded with repeats to the same length on every rank)."""
    sampler: DistributedSampler[Any] = DistributedSampler(cast(Dataset[Any], range(n)), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def steps_per_epoch(share: int, per_worker: int) -> tuple[int, bool]:
    """(batches of a rank's ``share``, drop_last): as ``loaders``, a last batch of one image is dropped
    (BatchNorm cannot train on it), any other is kept."""
    drop_last = share % per_worker == 1
    return (share // per_worker if drop_last else math.ceil(share / per_worker)), drop_last


@dataclass(frozen=True)
class Decoder:
    """Ray Data's batch function: ``{path, label, key}`` rows to ``{image, label, bad}``. ``epoch`` set: training,
    each image augmented under ``seeded_sample(seed, epoch, key)`` and an unreadable one replaced by the next
    readable image of the batch; ``epoch`` None: evaluation, an unreadable row keeps a zero image. ``bad``
    names the unreadable file of a row ('' when it was read), for ``Unreadable`` to count and drop."""

    transform: Callable[[Any], Tensor]
    seed: int
    epoch: int | None

    def _one(self, path: str, key: int) -> Tensor | None:
        try:
            image = decode_image(read_file(path))
        except READ_ERRORS:  # fsspec raises FileNotFoundError / OSError subclasses: in READ_ERRORS too
            return None
        if self.epoch is None:
            return self.transform(image)
        with seeded_sample(self.seed, self.epoch, key):
            return self.transform(image)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        labels = np.asarray(batch["label"], dtype=np.int64).copy()
        images = [self._one(path, int(key)) for path, key in zip(paths, batch["key"], strict=True)]
        bad = np.asarray(["" if image is not None else path for path, image in zip(paths, images, strict=True)], dtype=object)
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            if self.epoch is not None:
                raise TrainerError(f"dataset: none of the {len(paths)} images of a batch can be read (e.g. {paths[0]})")
            return {"image": np.zeros((len(paths), 1), np.float32), "label": labels, "bad": bad}
        filled: list[Tensor] = []
        for i, image in enumerate(images):
            if image is None and self.epoch is not None:
                # The next readable image of the batch (its label too): the batch keeps its size, every rank its steps.
                j = next((g for g in good if g > i), good[0])
                image, labels[i] = images[j], labels[j]
            filled.append(image if image is not None else torch.zeros_like(cast(Tensor, images[good[0]])))
        return {"image": torch.stack(filled).numpy(), "label": labels, "bad": bad}


@dataclass
class Unreadable:
    """Unreadable files this worker met, with a few of their paths; ``check`` applies the limit."""

    seen: int = 0
    bad: int = 0
    examples: list[str] = field(default_factory=list)
    warned: bool = False

    def add(self, bad: np.ndarray) -> None:
        self.seen += len(bad)
        names = [str(b) for b in bad if b]
        self.bad += len(names)
        self.examples.extend(n for n in names if n not in self.examples and len(self.examples) < _EXAMPLES)
        if self.seen >= EARLY_CHECK and self.bad > MAX_UNREADABLE_FRACTION * self.seen:
            raise self._error(self.bad, self.seen, self.examples)

    @staticmethod
    def _error(bad: int, seen: int, examples: list[str]) -> TrainerError:
        return TrainerError(
            f"dataset: {bad} of {seen} images read cannot be decoded (e.g. {', '.join(examples[:_EXAMPLES])}); "
            f"at most {MAX_UNREADABLE_FRACTION:.0%} may be, and they are skipped: fix or remove them"
        )

    def check(self, device: torch.device) -> str | None:
        """Every worker's counts summed (a collective: all must call it): a TrainerError above the limit, else the
        warning to give once (None when there is nothing new to say)."""
        bad, seen, examples = self.bad, self.seen, list(self.examples)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = torch.tensor([bad, seen], dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            bad, seen = (int(v) for v in counts.tolist())
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, examples)
            examples = list(dict.fromkeys(e for part in gathered for e in part))
        if bad > MAX_UNREADABLE_FRACTION * max(seen, 1):
            raise self._error(bad, seen, examples)
        if bad and not self.warned:
            self.warned = True
            return f"dataset: skipped {bad} of {seen} images that cannot be decoded (e.g. {', '.join(examples[:_EXAMPLES])})"
        return None


def _decode_resources() -> dict[str, Any]:
    """Decode tasks take a CPU each where the cluster has one free (a data-worker group, a CPU-only node): Ray
    spreads them over the nodes. Where every CPU is held by training workers (one pod per worker, a small local
    run) a task asking for a CPU would wait forever: they then run without a reservation, a few at a time."""
    import ray

    if ray.available_resources().get("CPU", 0.0) >= 1:  # type: ignore[no-untyped-call]
        return {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
    return {"num_cpus": 0, "concurrency": 2}


def _stream(rows: list[dict[str, Any]], decoder: Decoder, per_batch: int, drop_last: bool) -> Iterator[dict[str, np.ndarray]]:
    import ray.data

    # In order: the batches, and so the run, do not depend on which task finished first.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    blocks = max(1, math.ceil(len(rows) / _BLOCK_ROWS))
    items = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = items.map_batches(decoder, batch_size=_BLOCK_ROWS, batch_format="numpy", **_decode_resources())
    return iter(ds.iter_batches(batch_size=per_batch, batch_format="numpy", drop_last=drop_last, prefetch_batches=2))


class _Batches:
    """An iterable of ``(images, labels)`` with a length (the scheduler and the progress bar need one)."""

    def __init__(self, length: int, make: Callable[[], Iterator[tuple[Tensor, Tensor]]]) -> None:
        self.length = length
        self.make = make

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.make()


class StreamSource:
    """This worker's training and validation batches on the streaming path (see the module docstring)."""

    def __init__(
        self, train: StreamedImages, val: StreamedImages, *, seed: int, rank: int, world: int, per_worker: int, passes: int = 1
    ) -> None:
        self.train_images, self.val_images = train, val
        self.seed, self.rank, self.world, self.per_worker, self.passes = seed, rank, world, per_worker, passes
        self.epoch = 0
        self.unreadable = Unreadable()
        share = math.ceil(len(train) * passes / world)
        steps, self.drop_last = steps_per_epoch(share, per_worker)
        if steps == 0:
            raise TrainerError(f"dataset: {len(train)} training images are too few for {world} workers (each needs at least 2)")
        self.train = _Batches(steps, self._train_batches)
        val_count = len(range(rank, len(val), world))
        self.val = _Batches(math.ceil(val_count / (2 * per_worker)), self._val_batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def end_epoch(self, device: torch.device) -> str | None:
        """The unreadable limit over every worker (a collective); the warning to give, if any."""
        return self.unreadable.check(device)

    def _rows(self, images: StreamedImages, positions: list[int]) -> list[dict[str, Any]]:
        n = len(images.samples)
        return [{"path": images.samples[p % n][0], "label": images.samples[p % n][1], "key": p} for p in positions]

    def _train_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        # Positions in the list repeated ``passes`` times, as loaders' Subset: the seed follows the position.
        positions = epoch_indices(len(self.train_images) * self.passes, self.world, self.rank, self.seed, self.epoch)
        decoder = Decoder(self.train_images.transform, self.seed, self.epoch)
        for batch in _stream(self._rows(self.train_images, positions), decoder, self.per_worker, self.drop_last):
            self.unreadable.add(batch["bad"])
            yield torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"])

    def _val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        positions = list(range(self.rank, len(self.val_images), self.world))
        decoder = Decoder(self.val_images.transform, self.seed, None)
        for batch in _stream(self._rows(self.val_images, positions), decoder, 2 * self.per_worker, False):
            self.unreadable.add(batch["bad"])
            keep = torch.from_numpy(np.asarray([not b for b in batch["bad"]], dtype=bool))
            if bool(keep.any()):
                yield torch.from_numpy(batch["image"])[keep], torch.from_numpy(batch["label"])[keep]
