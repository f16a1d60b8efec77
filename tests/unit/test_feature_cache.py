"""The linear-probe feature cache per rank (issue 14 item 4): float16 features on the host, this rank's share
only, in order, nothing gathered; each rank reshuffles its own share per epoch, all ranks run the same number
of steps, and validation covers every image exactly once. On the CPU, without Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.data import build_datasets
from finetune_trainer.feature_cache import Float32Input, RankShuffle, cached_shards, extract_features
from finetune_trainer.image_folder import StreamedImages
from finetune_trainer.listing import Ingest


def job(batch: int = 4) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "fake", "augmentation": "none", "loaderWorkers": 0},
            "strategy": {"method": "linear-probe"},
            "hyperparameters": {"epochs": 2, "batchSize": batch, "seed": 3},
            "output": {"uri": "file:///tmp/x"},
        }
    )


def images(n: int) -> TensorDataset:
    """Image i is filled with i (so that its feature says which it was), label i % 3."""
    return TensorDataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(), torch.arange(n) % 3)


class Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def no_collectives(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the feature cache called a collective")

    for name in ("all_gather", "all_gather_object", "all_reduce", "broadcast", "gather"):
        monkeypatch.setattr(dist, name, refuse)


def test_extract_features_keeps_float16_on_the_host_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    no_collectives(monkeypatch)
    ds = images(7)
    cached = extract_features(Mean(), DataLoader(ds, batch_size=3), torch.device("cpu"))
    features, labels = cached.tensors
    assert features.dtype == torch.float16 and labels.dtype == torch.int64
    assert features.device.type == "cpu" and labels.device.type == "cpu"
    assert features[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6] and labels.tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_features_past_the_float16_range_are_clamped_not_infinite() -> None:
    batch = [(torch.full((1, 3, 2, 2), 1e6), torch.tensor([0]))]
    (features, _) = extract_features(Mean(), batch, torch.device("cpu")).tensors
    assert torch.isfinite(features).all()


def test_each_rank_shuffles_its_own_share_with_equal_steps() -> None:
    # 5 images on 2 ranks: shares of 3 and 2, both padded to 3 (as DistributedSampler pads).
    samplers = [RankShuffle(size, length=3, seed=3, rank=rank) for rank, size in enumerate((3, 2))]
    orders = {}
    for epoch in (1, 2):
        for rank, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert len(order) == len(sampler) == 3
            assert set(order) == set(range(sampler.size))  # its own share, every feature of it
            assert order == list(sampler)  # reproducible from (seed, epoch, rank)
            orders[epoch, rank] = order
    big = RankShuffle(50, length=50, seed=3, rank=0)
    epochs = []
    for epoch in (1, 2):
        big.set_epoch(epoch)
        epochs.append(list(big))
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == list(range(50))
    assert list(RankShuffle(50, 50, seed=3, rank=1)) != list(RankShuffle(50, 50, seed=3, rank=0))


def test_passes_repeat_the_share_with_fresh_orders() -> None:
    order = list(RankShuffle(4, length=8, seed=0, rank=0, passes=2))
    assert sorted(order[:4]) == sorted(order[4:]) == [0, 1, 2, 3]


def test_cached_shards_on_two_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    no_collectives(monkeypatch)
    train, val = images(9), images(5)
    shards = [cached_shards(job(batch=6), Mean(), train, val, torch.device("cpu"), rank, 2) for rank in (0, 1)]
    # Training: each rank only its strided share (0, 2, 4, … and 1, 3, …), and the same number of steps.
    assert len(shards[0].train) == len(shards[1].train) == 2  # 5 per rank (9 padded to 10), batches of 3
    for rank, shard in enumerate(shards):
        shard.sampler.set_epoch(1)
        seen = {int(v) for batch, _ in shard.train for v in batch[:, 0]}
        assert seen == set(range(rank, 9, 2))
        features, _ = next(iter(shard.train))
        assert features.dtype == torch.float16
    # Validation: every image exactly once over both ranks, no padding.
    evaluated = sorted(int(v) for shard in shards for batch, _ in shard.val for v in batch[:, 0])
    assert evaluated == [0, 1, 2, 3, 4]


def test_the_head_trains_in_float32_on_float16_features() -> None:
    head = Float32Input(nn.Linear(3, 2))
    out = head(torch.ones(4, 3, dtype=torch.float16))
    assert out.dtype == torch.float32 and head.head.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ streamed images
def test_feature_cache_on_the_streaming_path_skips_an_unreadable_image(tmp_path: Path) -> None:
    """A streamed dataset is listed, never scanned: one corrupt validation file of 200 (within the 1% allowed) is
    dropped and counted, as the streamed epochs do, not a failure before the first epoch."""
    for split, count in (("train", 20), ("val", 100)):
        for label in ("cat", "dog"):
            for i in range(count):
                path = tmp_path / split / label / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    (tmp_path / "val" / "dog" / "050.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {
                "format": "imagefolder",
                "trainUri": str(tmp_path / "train"),
                "validationUri": str(tmp_path / "val"),
                "ingest": "streaming",
                "imageSize": 16,
                "augmentation": "none",
                "loaderWorkers": 0,
            },
            "strategy": {"method": "linear-probe", "cacheFeatures": True},
            "hyperparameters": {"batchSize": 16},
            "output": {"uri": str(tmp_path / "runs")},
        }
    )
    cfg = TrainerConfig(job_name="job", spec=spec, output_root=str(tmp_path / "runs"))
    train, val, _, _ = build_datasets(cfg, Ingest("streaming", "test"))
    assert isinstance(val, StreamedImages)
    shards = cached_shards(cfg.spec, nn.Flatten(), train, val, torch.device("cpu"), rank=0, world=1)
    assert sum(len(labels) for _, labels in shards.val) == 199
    assert len(shards.train.dataset) == 40  # type: ignore[arg-type]
