"""The linear-probe fast path: a frozen backbone's features computed once per rank, and the head trained on them.

``extract_features`` runs the backbone over this rank's batches and keeps the features as float16 on the
host: each rank holds its own share only (images ÷ workers × feature size × 2 bytes), nothing is gathered
(before, every worker all-gathered the whole float32 matrix on its device: ≈10 GB for resnet50 on ImageNet).
``cached_shards`` feeds it this rank's strided share of the training and validation images (the training
images under the evaluation transform: the cache is used only without random augmentation, ``stages``) and
builds the loaders the head trains on: each rank reshuffles its own share every epoch, seeded by
``(seed, epoch, rank)``, padded as ``DistributedSampler`` pads, so that every rank runs the same number of
steps (DDP needs it); validation stays a strided, unpadded shard, every image evaluated exactly once. The
head trains in float32: ``Float32Input`` casts each batch up on the device. Streamed (listed, never scanned)
images are read with ``unreadable.readable_batches``: an unreadable one is dropped and counted, under the same limit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, Final

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.errors import TrainerError
from finetune_trainer.image_folder import StreamedImages
from finetune_trainer.loaders import Shards
from finetune_trainer.recipe import batch_size
from finetune_trainer.seeding import derive_seed
from finetune_trainer.unreadable import Unreadable, readable_batches

__all__ = ["Float32Input", "RankShuffle", "cached_shards", "extract_features"]

log = logging.getLogger(__name__)

_FP16_MAX: Final = float(torch.finfo(torch.float16).max)


@torch.no_grad()
def extract_features(extractor: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> TensorDataset:
    """``extractor``'s outputs for ``batches`` (this rank's share), in iteration order: features float16 on
    the host, labels int64. No collective: a rank never waits for, nor holds, another's share."""
    features: list[Tensor] = []
    labels: list[Tensor] = []
    for images, targets in batches:
        out = extractor(images.to(device, non_blocking=True)).float()
        # Clamped: a feature past float16's range would become inf, and the head's loss NaN.
        features.append(out.clamp_(-_FP16_MAX, _FP16_MAX).to("cpu", torch.float16))
        labels.append(torch.as_tensor(targets).to("cpu", torch.int64))
    if not features:
        return TensorDataset(torch.empty(0, dtype=torch.float16), torch.empty(0, dtype=torch.int64))
    return TensorDataset(torch.cat(features), torch.cat(labels))


class Float32Input(nn.Module):
    """``head`` on float32 inputs: the cache holds float16, the head trains and evaluates in float32."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: Tensor) -> Tensor:
        out: Tensor = self.head(features.float())
        return out


class RankShuffle(Sampler[int]):
    """Indices into this rank's ``size`` cached features: ``passes`` fresh permutations per epoch, seeded by
    ``(seed, epoch, rank)``, the whole padded from its start to ``length`` (as ``DistributedSampler`` pads)."""

    def __init__(self, size: int, length: int, seed: int, rank: int, passes: int = 1) -> None:
        self.size, self.length, self.seed, self.rank, self.passes = size, length, seed, rank, passes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.seed, self.epoch, self.rank))
        order = [i for _ in range(self.passes) for i in torch.randperm(self.size, generator=generator).tolist()]
        while len(order) < self.length:
            order += order[: self.length - len(order)]
        return iter(order[: self.length])


def _share(ds: Dataset[Any], rank: int, world: int) -> Subset[Any]:
    return Subset(ds, range(rank, len(ds), world))  # type: ignore[arg-type]


def cached_shards(
    spec: FineTuneJobSpec,
    extractor: nn.Module,
    train: Dataset[Any],
    val: Dataset[Any],
    device: torch.device,
    rank: int,
    world: int,
    passes: int = 1,
) -> Shards:
    """This rank's loaders over the features ``extractor`` computes (in eval mode) of its strided shares of
    ``train`` (images under the evaluation transform) and ``val``."""
    n = len(train)  # type: ignore[arg-type]
    per_worker = max(1, batch_size(spec) // world)
    length = -(-n // world) * passes
    # A last batch of one breaks BatchNorm in train mode (a head may hold one); drop it, and only it.
    drop_last = length % per_worker == 1
    if n < world or (length // per_worker == 0 and drop_last):
        raise TrainerError(f"dataset: {n} training images are too few for {world} workers (each needs at least 2)")
    extractor.eval()

    workers = spec.dataset.loader_workers

    def batches(ds: Dataset[Any], tally: Unreadable) -> Iterable[tuple[Tensor, Tensor]]:
        if isinstance(ds, StreamedImages):
            # Listed, never scanned (the streaming path): an unreadable image is dropped and counted, as the
            # streamed epochs do, instead of failing the job before its first epoch.
            share = StreamedImages(ds.samples[rank::world], ds.transform)
            return readable_batches(share, batch_size(spec), tally, workers)
        # Its own generator: drawing the loader's base seed from the global one would shift the numbers a
        # resumed run draws after it (resume is exact only if nothing but training draws from it).
        return DataLoader(_share(ds, rank, world), batch_size=batch_size(spec), num_workers=workers, generator=torch.Generator())

    # Each rank judges its own share against the limit (no collective here: ranks extract at their own pace).
    tally = Unreadable()
    cached_train = extract_features(extractor, batches(train, tally), device)
    cached_val = extract_features(extractor, batches(val, tally), device)
    warning = tally.check_here()
    if warning:
        log.warning("%s", warning)
    sampler = RankShuffle(len(cached_train), length, spec.hyperparameters.seed, rank, passes)
    # Tensors in memory: loader processes would only add start-up and copying.
    pin = torch.cuda.is_available()
    train_loader: DataLoader[Any] = DataLoader(
        cached_train, batch_size=per_worker, sampler=sampler, drop_last=drop_last, pin_memory=pin
    )
    val_loader: DataLoader[Any] = DataLoader(cached_val, batch_size=per_worker * 2, shuffle=False, pin_memory=pin)
    return Shards(train_loader, sampler, val_loader)
