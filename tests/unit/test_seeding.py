"""Seeds per worker, per loader process and per image, and generator states that survive a checkpoint:
the loaders of two workers never augment their k-th images alike, augmentation does not depend on loader
processes or on what else drew random numbers, and a restored state draws what the saved one would have."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer import loaders
from finetune_trainer.checkpoint import TrainState, read_checkpoint
from finetune_trainer.data import DigitsDataset, train_transform
from finetune_trainer.inputs import InputSpec
from finetune_trainer.seeding import (
    EpochSampler,
    SeededSamples,
    rank_seed,
    rng_state,
    sample_seed,
    seed_everything,
    seed_loader_worker,
    set_rng_state,
)
from tests.support.checkpoints import save_checkpoint

SPEC = InputSpec(image_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", grayscale_to_rgb=True)


def same_images(n: int = 8) -> DigitsDataset:
    """``n`` copies of one image under the "standard" augmentation: only the random crop and flip differ."""
    image = torch.arange(16 * 16, dtype=torch.uint8).reshape(1, 16, 16)
    return DigitsDataset(image.repeat(n, 1, 1, 1), [0] * n, train_transform(SPEC, "standard", resized=True))


def job(loader_workers: int = 0) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "digits", "loaderWorkers": loader_workers},
            "hyperparameters": {"batchSize": 8, "seed": 3},
            "resources": {"workers": 2},
            "output": {"uri": "/tmp/unused"},
        }
    )


def first_batch(monkeypatch: pytest.MonkeyPatch, rank: int, world: int, loader_workers: int = 0, epoch: int = 1) -> Tensor:
    """The first training batch of worker ``rank`` of ``world``, built by the trainer's own ``build_loaders``
    (Ray's part stubbed), after every worker seeded its global generators alike."""
    monkeypatch.setattr(loaders, "workers", lambda: (rank, world))
    monkeypatch.setattr(loaders.ray.train.torch, "prepare_data_loader", lambda loader: loader)
    shards = loaders.build_loaders(job(loader_workers), same_images(), same_images(), loader_workers)
    shards.sampler.set_epoch(epoch)
    seed_everything(0)
    images: Tensor = next(iter(shards.train))[0]
    return images


def test_seeds_differ_per_rank_and_per_image() -> None:
    ranks = [rank_seed(seed, rank) for seed in range(4) for rank in range(8)]
    assert len(set(ranks)) == len(ranks)  # rank 1 of seed 0 is not rank 0 of seed 1
    samples = [sample_seed(0, epoch, index) for epoch in range(1, 4) for index in range(100)]
    assert len(set(samples)) == len(samples)
    assert all(0 <= s < 2**63 for s in ranks + samples)


def test_two_workers_do_not_augment_their_kth_images_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    rank0, rank1 = first_batch(monkeypatch, 0, 2), first_batch(monkeypatch, 1, 2)
    assert rank0.shape == rank1.shape == (4, 3, 16, 16)
    # Every image is the same picture: equal tensors would be equal crops and flips.
    assert not any(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))


def test_augmentation_depends_on_seed_epoch_and_image_only(monkeypatch: pytest.MonkeyPatch) -> None:
    in_process = first_batch(monkeypatch, 0, 2, loader_workers=0)
    assert torch.equal(first_batch(monkeypatch, 0, 2, loader_workers=2), in_process)  # loader processes or not
    assert not torch.equal(first_batch(monkeypatch, 0, 2, epoch=2), in_process)  # a new epoch, new crops
    seeded = SeededSamples(same_images(), seed=3)
    torch.manual_seed(123)  # whatever the global generator stands at
    assert torch.equal(seeded[(5, 2)][0], SeededSamples(same_images(), seed=3)[(5, 2)][0])


def test_augmenting_leaves_the_global_generators_alone() -> None:
    seed_everything(7)
    expected = (torch.rand(3), random.random())
    seed_everything(7)
    SeededSamples(same_images(), seed=3)[(1, 0)]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_epoch_sampler_shards_like_a_distributed_sampler() -> None:
    ds = list(range(10))
    sampler = EpochSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    plain = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    sampler.set_epoch(4)
    plain.set_epoch(4)
    assert list(sampler) == [(4, i) for i in plain]


class NumpyDraw(Dataset[float]):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> float:
        return float(np.random.rand())


def test_loader_processes_draw_different_numpy_numbers() -> None:
    loader = DataLoader(NumpyDraw(), batch_size=1, num_workers=2, worker_init_fn=seed_loader_worker)
    first, second = (float(batch) for batch in loader)  # one item per loader process
    assert first != second


def test_generator_states_survive_a_checkpoint(tmp_path: Path) -> None:
    seed_everything(11)
    torch.rand(5), np.random.rand(5), random.random()  # advance them somewhere
    saved = rng_state()
    expected = (torch.rand(4), np.random.rand(4), random.random())
    save_checkpoint(tmp_path, torch.nn.Linear(2, 2), TrainState(epoch=2), "f", rng=[saved])
    seed_everything(99)
    data: dict[str, Any] = read_checkpoint(tmp_path, "f", "run")  # weights_only: plain values and tensors

    set_rng_state(data["rng"][0])

    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert random.random() == expected[2]
