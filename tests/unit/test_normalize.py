"""The streaming path's fused normalisation (``normalize.BatchNormalize``, chosen by ``streaming.split_finish``) and
the per-image seeding both ingest paths share (``seeding.seeded_sample``)."""

from __future__ import annotations

import random

import pytest
import torch
from torchvision.transforms import v2 as T

from finetune_trainer.normalize import BatchNormalize
from finetune_trainer.seeding import sample_seed, seeded_sample
from finetune_trainer.streaming import split_finish

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_the_fused_normalisation_equals_torchvisions_steps() -> None:
    batch = torch.randint(0, 256, (5, 3, 17, 19), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    steps = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
    got = BatchNormalize(MEAN, STD)(batch)
    assert got.dtype == torch.float32 and got.shape == batch.shape
    assert torch.allclose(got, steps(batch), atol=1e-6, rtol=0)
    assert torch.equal(batch, batch.clone())  # the input is left as it was


def test_the_fused_normalisation_takes_uint8_only() -> None:
    with pytest.raises(TypeError, match="uint8"):
        BatchNormalize(MEAN, STD)(torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize(
    ("tail", "fused"),
    [
        ([T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)], True),
        ([T.ToDtype(torch.float32, scale=False), T.Normalize(MEAN, STD)], False),  # no 1/255: not what is fused
        ([T.ToDtype(torch.float64, scale=True), T.Normalize(MEAN, STD)], False),
        ([T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD, inplace=True)], False),
        ([T.Normalize(MEAN, STD)], False),
    ],
    ids=["preset", "unscaled", "float64", "inplace", "no-dtype-step"],
)
def test_only_a_presets_float_and_normalise_tail_is_fused(tail: list[object], fused: bool) -> None:
    transform = T.Compose([T.ToImage(), *tail])
    per_image, finish = split_finish(transform)
    assert isinstance(finish, BatchNormalize) is fused
    assert (per_image is transform) is not fused


def test_a_seeded_sample_draws_what_torch_manual_seed_draws_and_puts_the_generators_back() -> None:
    torch.manual_seed(sample_seed(4, 2, 9))
    random.seed(sample_seed(4, 2, 9))
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), random.getstate())
    with seeded_sample(4, 2, 9):
        got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
