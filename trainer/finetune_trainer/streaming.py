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
the same batch (step counts stay equal), in validation dropped; both counted, a warning below
``MAX_UNREADABLE_FRACTION``, a one-line TrainerError naming some files above it (``unreadable``). Memory and disk stay
bounded: nothing is copied, and Ray Data's streaming executor holds only the blocks in flight.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler
from torchvision.transforms import v2 as T

from finetune_trainer.errors import TrainerError
from finetune_trainer.gpu_decode import decode_on_device, transform_on_device
from finetune_trainer.image_bounds import short_side_resize
from finetune_trainer.image_folder import READ_ERRORS, StreamedImages, decode_image, fetch, read_file
from finetune_trainer.normalize import BatchNormalize
from finetune_trainer.sample_rows import PositionRows, SampleTable, pieces
from finetune_trainer.seeding import seeded_sample
from finetune_trainer.unreadable import BLANK_SIDE, Unreadable, blank_images, fill_unreadable

__all__ = [
    "Decoder",
    "EpochRows",
    "StreamSource",
    "Unreadable",
    "check_block",
    "epoch_indices",
    "split_finish",
    "steps_per_epoch",
]

log = logging.getLogger(__name__)

_BLOCK_ROWS: Final = 64
"""Rows per Ray Data block: small enough that the first batch arrives in seconds."""
_READ_TASKS: Final = 256
"""Read tasks an epoch aims at (``sample_rows.PositionRows``: Ray Data puts each in the object store before the first
one runs, ~0.5 ms each)..."""
_MAX_BLOCKS_PER_TASK: Final = 2
"""...with at most this many blocks a task. More cost throughput: the order being kept, the blocks of the task beside
the first wait until it is done, and Ray Data pauses a task two blocks ahead of what it has taken. Measured (100k
JPEGs, 2 cores; bench/README.md "The start grows little with the dataset now"): 7 blocks a task 689-705 images/s
against 872-901 for one; 2 blocks 825-909. (``_stream``'s other settings, the order kept, no reservation and the
block size, go on the training worker's DataContext, process-wide: only this pipeline runs there.)"""
_RAW_ROW_BYTES: Final = 64 * 1024
"""A JPEG's size, guessed, for ``jpegDecode: gpu`` blocks (file bytes, decoded on the worker)."""


def epoch_indices(n: int, world: int, rank: int, seed: int, epoch: int) -> list[int]:
    """Rank ``rank``'s positions among ``n`` training images in ``epoch``: exactly a seeded DistributedSampler's
    (shuffled by ``(seed, epoch)``, padded with repeats to the same length on every rank)."""
    sampler: DistributedSampler[Any] = DistributedSampler(
        cast(Dataset[Any], range(n)), num_replicas=world, rank=rank, shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def split_finish(transform: Callable[[Any], Tensor]) -> tuple[Callable[[Any], Tensor], Callable[[Tensor], Tensor] | None]:
    """(per-image part, batch part) of a ``data`` preset: the float conversion and normalisation that end it run on the
    training worker, on a whole batch, so images cross Ray's object store as uint8 (a quarter of float32's bytes,
    measured in bench/ingest_bench.py), fused into one operation (``normalize.BatchNormalize``). A transform of another
    shape is applied whole in the decode tasks."""
    steps = transform.transforms if isinstance(transform, T.Compose) else []
    if len(steps) >= 2 and _scales_to_float(steps[-2]) and isinstance(steps[-1], T.Normalize) and not steps[-1].inplace:
        return T.Compose(steps[:-2]), BatchNormalize(steps[-1].mean, steps[-1].std)
    return transform, None


def _scales_to_float(step: Any) -> bool:
    """``ToDtype(torch.float32, scale=True)``: uint8 [0, 255] to float32 [0, 1], what ``BatchNormalize`` fuses."""
    return isinstance(step, T.ToDtype) and step.dtype == torch.float32 and bool(step.scale)


def steps_per_epoch(share: int, per_worker: int) -> tuple[int, bool]:
    """(batches of a rank's ``share``, drop_last): as ``loaders``, a last batch of one image is dropped
    (BatchNorm cannot train on it), any other is kept."""
    drop_last = share % per_worker == 1
    return (share // per_worker if drop_last else math.ceil(share / per_worker)), drop_last


@dataclass(frozen=True)
class Decoder:
    """Ray Data's batch function: ``{path, label, key}`` rows to ``{image, label, bad}`` (``fill_unreadable``). ``epoch``
    set: training, each image augmented under ``seeded_sample(seed, epoch, key)``; None: evaluation. ``raw``
    (``jpegDecode: gpu``): the files' bytes only, as ``{data, path, label, key}``, for the worker to decode."""

    transform: Callable[[Any], Tensor]
    seed: int
    epoch: int | None
    raw: bool = False

    def _one(self, path: str, key: int, resize: int | None) -> Tensor | None:
        data = fetch(path, read_file)  # a storage error: retried, then the job fails naming the file
        if data is None:
            return None
        try:
            image = decode_image(data, resize)
        except READ_ERRORS:  # a file that cannot be decoded, or too large once resized: skipped and counted
            return None
        if self.epoch is None:
            return self.transform(image)
        with seeded_sample(self.seed, self.epoch, key):
            return self.transform(image)

    @staticmethod
    def _bytes(path: str) -> bytes:
        data = fetch(path, read_file)
        # A file gone since the listing: b"" decodes to None on the worker, counted there with the undecodable ones.
        return b"" if data is None else data

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The decoded block, with an ``error`` column: empty, or on every row the one line of a user error met here
        (a storage error past its retries, a training block with nothing readable), for the training worker to raise
        (``check_block``). Raised in a Ray Data task it would print Ray Data's tracebacks, several times, before the
        job's one line; a block of the usual columns keeps the blocks concatenable."""
        try:
            out, message = self._decoded(batch), ""
        except TrainerError as e:
            out, message = self._failed(batch), str(e)
        out["error"] = np.full(len(batch["key"]), message, dtype=object)
        return out

    def _failed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["key"])
        if self.raw:
            data = np.empty(rows, dtype=object)
            data[:] = [b""] * rows
            return {"data": data, "path": np.asarray(batch["path"], dtype=object), "label": batch["label"], "key": batch["key"]}
        blank = Image.new("RGB", (BLANK_SIDE, BLANK_SIDE))
        images = blank_images(self.transform, rows, blank).numpy()
        return {"image": images, "label": batch["label"], "bad": np.asarray([str(p) for p in batch["path"]], dtype=object)}

    def _decoded(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        if self.raw:
            data = np.empty(len(paths), dtype=object)
            data[:] = [self._bytes(p) for p in paths]
            return {"data": data, "path": np.asarray(paths, dtype=object), "label": batch["label"], "key": batch["key"]}
        resize = short_side_resize(self.transform)  # an image too large once resized is refused from its header
        images = [self._one(path, int(key), resize) for path, key in zip(paths, batch["key"], strict=True)]
        filled, labels, bad = fill_unreadable(images, batch["label"], paths, train=self.epoch is not None)
        blank = Image.new("RGB", (BLANK_SIDE, BLANK_SIDE))  # shapes the placeholders of a block with nothing readable
        if filled is None:
            return {"image": blank_images(self.transform, len(paths), blank).numpy(), "label": labels, "bad": bad}
        # Stacked by NumPy: a block's buffer gets huge pages (see normalize), torch's would be faulted in page by page.
        return {"image": np.stack([image.numpy() for image in filled]), "label": labels, "bad": bad}


def check_block(batch: dict[str, Any]) -> None:
    """Raise here, on the training worker, the user error a decode task met (``Decoder``'s ``error`` column)."""
    for message in batch.get("error", ()):
        if message:
            raise TrainerError(str(message))


def _decode_resources() -> dict[str, Any]:
    """Decode tasks take a CPU each where the cluster has one free (a data-worker group, a CPU-only node): Ray
    Data spreads them over the nodes (its tasks' default scheduling strategy is SPREAD). Where every CPU is held
    by training workers (one pod per worker, a small local run) a task asking for a CPU would wait forever: they
    then run without a reservation, at most two at a time. Only ``map_batches``' named parameters: Ray 2.60
    deprecates remote options passed through ``**ray_remote_args`` (``scheduling_strategy``; removed in 2.64),
    and ``concurrency`` since 2.51 (``compute`` replaces it)."""
    import ray
    from ray.data import TaskPoolStrategy

    if ray.available_resources().get("CPU", 0.0) >= 1:  # type: ignore[no-untyped-call]
        return {"num_cpus": 1}
    return {"num_cpus": 0, "compute": TaskPoolStrategy(size=2)}


@dataclass(frozen=True)
class BlockDecoder:
    """``decoder`` over a read task's rows ``rows`` at a time, each decoded block handed on as soon as it is done (a
    generator: Ray Data sends a task's output on while the task runs), so a task of many rows delays nobody's first
    batch."""

    decoder: Decoder
    rows: int

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for start, stop in pieces(len(batch["key"]), self.rows):  # no block of a few rows at the end (``pieces``)
            yield self.decoder({name: column[start:stop] for name, column in batch.items()})


def _decoded(items: Any, decoder: Decoder, resources: dict[str, Any]) -> Any:
    """``items`` (a Ray Data Dataset of rows) decoded ``_BLOCK_ROWS`` at a time in the tasks that read them. The batch
    is the read task's rows (``batch_size=None``): with a batch size Ray Data would not fuse the decoding into the
    read (it never fuses a read into a ``map_batches`` that asks for a number of rows), and every block would be
    read by one task and decoded by another."""
    return items.map_batches(BlockDecoder(decoder, _BLOCK_ROWS), batch_size=None, batch_format="numpy", **resources)


@dataclass(frozen=True)
class EpochRows:
    """What one pass streams: the listing (``table``) and the positions in it, in order (a position past the table's
    end wraps around: the list repeated ``passes`` times)."""

    table: SampleTable
    positions: np.ndarray


def _stream(rows: EpochRows, decoder: Decoder, per_batch: int, drop_last: bool) -> Iterator[dict[str, np.ndarray]]:
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    # In order: the batches, and so the run, do not depend on which task finished first.
    context.execution_options.preserve_order = True
    # One stage does all the work (decode + augment; reading the rows costs nothing): Ray Data's reservation of
    # resources per operator held half the CPUs back for operators this pipeline does not have (2 cores: one
    # decode task at a time; 320 -> 554 images/s, bench/README.md "Ingest").
    context.op_resource_reservation_enabled = False
    resources = _decode_resources()
    count = len(rows.positions)
    # A task's output goes on once more than this is buffered, and a block of 1.5 times it is cut in pieces: at three
    # quarters of a decoded block, each block goes on alone and whole, as soon as it is decoded (Ray Data's default,
    # 128 MiB, held 13 blocks of 224 px images back before the first went out).
    context.target_max_block_size = max(1, _row_bytes(decoder.transform, decoder.raw) * _BLOCK_ROWS * 3 // 4)
    # The rows are built in the read tasks from the listing put once (``sample_rows``), and the read asks for what the
    # decoding asks for, so Ray Data fuses the two (and where no CPU is free, neither waits for one).
    blocks = math.ceil(count / _BLOCK_ROWS)
    per_task = min(_MAX_BLOCKS_PER_TASK, max(1, math.ceil(blocks / _READ_TASKS)))
    source = PositionRows(rows.table.placed(), ray.put(rows.positions), count, per_task * _BLOCK_ROWS)
    # As many as the source gives: asked for more, Ray Data splits the blocks it reads, and no longer fuses the decoding
    # into the read.
    tasks = len(pieces(count, per_task * _BLOCK_ROWS))
    items = ray.data.read_datasource(source, override_num_blocks=max(1, tasks), **resources)
    batches = _decoded(items, decoder, resources)
    return iter(batches.iter_batches(batch_size=per_batch, batch_format="numpy", drop_last=drop_last, prefetch_batches=2))


def _tensor(images: Any) -> Tensor:
    """A batch's images as a tensor, without a copy. Ray hands a block over read-only (it lives in the object store)
    and torch warns about that once per process, a line in every run's log; nothing writes into these images (the
    normalisation and the device copy make new tensors; the engine only reads its inputs), so the warning is dropped
    here and only here."""
    if isinstance(images, Tensor):  # decoded on the device already (``jpegDecode: gpu``)
        return images
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(images)


def _row_bytes(transform: Callable[[Any], Tensor], raw: bool) -> int:
    """Bytes of one decoded row: what ``transform`` makes of an image (its output has one shape: the presets end in a
    fixed-size crop); for ``raw`` rows (a file's bytes) a guess, whose only effect is how many blocks go on together."""
    if raw:
        return _RAW_ROW_BYTES
    like = blank_images(transform, 1, Image.new("RGB", (BLANK_SIDE, BLANK_SIDE)))
    return like.element_size() * like.numel()


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
        self,
        train: StreamedImages,
        val: StreamedImages,
        *,
        seed: int,
        rank: int,
        world: int,
        per_worker: int,
        passes: int = 1,
        decode_device: torch.device | None = None,
        device: torch.device | None = None,
    ) -> None:
        """``decode_device``: decode JPEGs on this device (``jpegDecode: gpu``) instead of in the Ray Data tasks.
        ``device``: where a batch's uint8 images become normalised floats (``split_finish``; the CPU by default)."""
        self.train_images, self.val_images = train, val
        self.decode_device = decode_device
        self.device = device or torch.device("cpu")
        self.seed, self.rank, self.world, self.per_worker, self.passes = seed, rank, world, per_worker, passes
        self.epoch = 0
        self.unreadable = Unreadable()
        self._tables: dict[int, SampleTable] = {}
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

    def _table(self, images: StreamedImages) -> SampleTable:
        """``images``' listing packed once for the object store (``sample_rows``), reused by every epoch."""
        if id(images) not in self._tables:
            self._tables[id(images)] = SampleTable(images.samples)
        return self._tables[id(images)]

    def _train_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        # Positions in the list repeated ``passes`` times, as loaders' Subset: the seed follows the position.
        positions = epoch_indices(len(self.train_images) * self.passes, self.world, self.rank, self.seed, self.epoch)
        return self._batches(self.train_images, positions, self.epoch, self.per_worker, self.drop_last)

    def first_batches(self, images: int, most: int) -> _Batches:
        """This epoch's first training batches, enough for ``images`` in at most ``most`` (precise BatchNorm's), as a
        stream of those rows alone: the same images, augmented alike, as the epoch's own first batches. Not a second
        stream of the whole epoch dropped after a few batches: Ray Data planned every read task of it and decoded
        blocks ahead for nothing, and the images it read were counted again against the unreadable limit."""
        steps = min(len(self.train), most, math.ceil(images / self.per_worker))

        def make() -> Iterator[tuple[Tensor, Tensor]]:
            positions = epoch_indices(len(self.train_images) * self.passes, self.world, self.rank, self.seed, self.epoch)
            rows = positions[: steps * self.per_worker]
            return self._batches(self.train_images, rows, self.epoch, self.per_worker, False, Unreadable())

        return _Batches(steps, make)

    def _val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        positions = list(range(self.rank, len(self.val_images), self.world))
        return self._batches(self.val_images, positions, None, 2 * self.per_worker, False)

    def evaluation_batches(self, per_batch: int, tally: Unreadable) -> Iterator[tuple[Tensor, Tensor]]:
        """Every validation image, in order, on this worker alone (rank 0's final evaluation), decoded by Ray Data as
        the per-epoch evaluation is, on whichever nodes have the cores; an unreadable one is dropped and counted in
        ``tally`` (its own: the per-epoch count is a collective). Before, rank 0 read them one at a time in its own
        process: for ImageNet's 50,000 from an object store, one request's latency after another."""
        positions = list(range(len(self.val_images)))
        return self._batches(self.val_images, positions, None, per_batch, False, tally)

    def _batches(
        self,
        images: StreamedImages,
        positions: list[int],
        epoch: int | None,
        per_batch: int,
        drop_last: bool,
        tally: Unreadable | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        tally = self.unreadable if tally is None else tally
        raw = self.decode_device is not None
        per_image, finish = (images.transform, None) if raw else split_finish(images.transform)
        decoder = Decoder(per_image, self.seed, epoch, raw=raw)
        rows = EpochRows(self._table(images), np.asarray(positions, dtype=np.int64))
        for batch in _stream(rows, decoder, per_batch, drop_last):
            check_block(batch)
            if self.decode_device is not None:
                batch = self._decode_here(batch, images.transform, epoch, self.decode_device)
            tally.add(batch["bad"])
            images_out, labels = _tensor(batch["image"]), torch.as_tensor(np.array(batch["label"]))
            keep = torch.from_numpy(np.asarray([not b for b in batch["bad"]], dtype=bool))
            if epoch is None and not bool(keep.all()):  # evaluation: each image counted once, an unreadable one not at all
                if not bool(keep.any()):
                    continue
                images_out, labels = images_out[keep.to(images_out.device)], labels[keep]
            # Training: unreadable images were replaced already.
            if finish is not None:
                images_out = finish(images_out.to(self.device, non_blocking=True))
            yield images_out, labels

    def _decode_here(
        self, batch: dict[str, Any], transform: Callable[[Any], Tensor], epoch: int | None, device: torch.device
    ) -> dict[str, Any]:
        """``jpegDecode: gpu``: a batch of file bytes decoded and transformed on this worker's ``device``."""
        paths = [str(p) for p in batch["path"]]
        decoded = decode_on_device(list(batch["data"]), device, short_side_resize(transform))
        filled, labels, bad = fill_unreadable(decoded, batch["label"], paths, train=epoch is not None)
        if filled is None:
            blank = torch.zeros((3, BLANK_SIDE, BLANK_SIDE), dtype=torch.uint8, device=device)
            return {"image": blank_images(transform, len(paths), blank), "label": labels, "bad": bad}
        keys = [int(k) for k in batch["key"]]
        return {"image": transform_on_device(filled, keys, transform, self.seed, epoch), "label": labels, "bad": bad}
