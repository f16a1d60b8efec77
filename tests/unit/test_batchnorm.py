"""BatchNorm statistics: precise BN recomputes the running estimates of the layers that train from
training batches, and a collapse (evaluation at chance while training fits) is recognised. No Ray."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from finetune_trainer.batchnorm import (
    PRECISE_BN_BATCHES,
    PRECISE_BN_IMAGES,
    batch_norm_collapse,
    precise_batch_norm,
    recompute_batch_norm,
)

CPU = torch.device("cpu")


def _batches(mean: float, std: float, count: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(mean + std * torch.randn(size, 3, 4, 4, generator=gen), torch.zeros(size)) for _ in range(count)]


def _model(momentum: float = 0.01) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(3, momentum=momentum), nn.Flatten(), nn.Linear(48, 2))


def test_precise_bn_replaces_stale_running_statistics() -> None:
    # MobileNetV3's momentum 0.01: after a few training steps the estimates are still near their start (0, 1).
    model = _model().train()
    batches = _batches(mean=5.0, std=3.0, count=8)
    for images, _ in batches[:3]:
        model(images)
    bn = model[0]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
    assert bn.running_mean.max() < 1.0  # stale: the data's mean is 5

    used = precise_batch_norm(model, batches, CPU, max_batches=8)

    assert used == 8
    everything = torch.cat([b for b, _ in batches])
    assert torch.allclose(bn.running_mean, everything.mean(dim=(0, 2, 3)), atol=0.05)
    assert torch.allclose(bn.running_var, everything.var(dim=(0, 2, 3)), rtol=0.05)
    assert bn.momentum == 0.01 and model.training  # settings and mode as found


@pytest.mark.parametrize(("max_batches", "used"), [(3, 3), (100, 8), (0, 0)])
def test_precise_bn_uses_at_most_max_batches(max_batches: int, used: int) -> None:
    assert precise_batch_norm(_model().train(), _batches(1.0, 1.0, 8), CPU, max_batches) == used


@pytest.mark.parametrize(("max_images", "used"), [(40, 3), (48, 3), (49, 4), (None, 8)])
def test_precise_bn_stops_once_it_has_max_images(max_images: int | None, used: int) -> None:
    assert precise_batch_norm(_model().train(), _batches(1.0, 1.0, 8), CPU, 8, max_images=max_images) == used  # 16 a batch


def test_the_recomputation_takes_512_images_not_a_whole_small_epoch_again() -> None:
    # 64 batches of 16 (1024 images): before, min(50, 64) batches; 512 images evaluate as well (bench/precise_bn.py).
    assert recompute_batch_norm(_model(), _batches(1.0, 1.0, 64), CPU, frozen_bn=True) == PRECISE_BN_IMAGES // 16
    assert recompute_batch_norm(_model(), _batches(1.0, 1.0, 64, size=2), CPU, frozen_bn=True) == PRECISE_BN_BATCHES


def test_precise_bn_leaves_frozen_layers_alone() -> None:
    # A layer in eval mode is a frozen one (set_train_mode): its statistics are the source model's.
    model = _model().train()
    model[0].eval()
    before = model[0].state_dict()
    assert precise_batch_norm(model, _batches(5.0, 3.0, 4), CPU, max_batches=4) == 0
    after = model[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("train_loss", "val_accuracy", "classes", "has_bn", "warns"),
    [
        (0.05, 1 / 7, 7, True, True),  # the mobilenet_v3_small case: fits, evaluates at chance
        (0.05, 0.20, 7, True, True),  # within 0.1 of chance
        (0.05, 0.30, 7, True, False),  # above chance: a weak model, not a collapse
        (0.05, 1 / 7, 7, False, False),  # no BatchNorm: another problem
        (0.5 * math.log(7) + 0.01, 1 / 7, 7, True, False),  # training has not fitted either: early days
        (0.30, 0.50, 2, True, True),
        (0.30, 0.61, 2, True, False),
    ],
)
def test_batch_norm_collapse(train_loss: float, val_accuracy: float, classes: int, has_bn: bool, warns: bool) -> None:
    model = _model() if has_bn else nn.Linear(2, 2)
    message = batch_norm_collapse(train_loss, val_accuracy, classes, model)
    assert (message is not None) is warns
    if message is not None:
        assert "BatchNorm" in message and "preciseBatchNorm" in message
