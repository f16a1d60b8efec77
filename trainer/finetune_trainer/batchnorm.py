"""BatchNorm statistics the model is evaluated and exported with: ``precise_batch_norm`` recomputes them
over training batches, ``batch_norm_collapse`` recognises evaluation ruined by bad ones.

Why: BatchNorm keeps running estimates of each channel's mean and variance, updated with ``momentum``
per training step. Few steps (a tiny dataset), a small momentum (torchvision builds MobileNetV3 and
EfficientNet with 0.01) or weights that move fast leave those estimates far from the statistics the
trained weights produce, and the model that trained well predicts at chance in eval mode. Recomputing
the estimates as plain averages over a few training batches with the final weights ("precise BN",
Wu & Johnson 2021) fixes that for the price of some forward passes. Torch only; called by the loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sized
from typing import Any, Final, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from finetune_trainer.strategy import set_train_mode

__all__ = [
    "PRECISE_BN_BATCHES",
    "PRECISE_BN_IMAGES",
    "batch_norm_collapse",
    "batch_norm_layers",
    "precise_batch_norm",
    "precise_bn_share",
    "recompute_batch_norm",
    "sync_batch_norm",
]


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that track running statistics (those whose estimates evaluation uses)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def precise_batch_norm(
    model: nn.Module, batches: Iterable[Any], device: torch.device, max_batches: int, max_images: int | None = None
) -> int:
    """Replace the running mean and variance of every BatchNorm layer that is in train mode in ``model``
    by their average over up to ``max_batches`` of ``batches`` ((images, labels) pairs), computed with the
    weights as they are now, stopping once ``max_images`` images are in. Layers in eval mode (frozen ones,
    see ``strategy.set_train_mode``) keep theirs. Returns the number of batches used (0: nothing changed).
    The model's modes are left as found."""
    layers = [m for m in batch_norm_layers(model) if m.training]
    if not layers or max_batches < 1:
        return 0
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in layers]  # type: ignore[union-attr]
    for m in layers:
        # momentum None: a cumulative average over the batches seen since the reset, equally weighted.
        m.reset_running_stats()
        m.momentum = None
    used = seen = 0
    for images, _ in batches:
        if used >= max_batches or (max_images is not None and seen >= max_images):
            break
        images = images.to(device) if isinstance(images, Tensor) else images
        model(images)
        used += 1
        seen += len(images)
    for m, (momentum, mean, var) in zip(layers, saved, strict=True):
        m.momentum = momentum
        if used == 0:
            m.running_mean.copy_(mean)  # type: ignore[union-attr]
            m.running_var.copy_(var)  # type: ignore[union-attr]
    return used


def batch_norm_collapse(train_loss: float, val_accuracy: float, num_classes: int, model: nn.Module) -> str | None:
    """The warning to give when evaluation sits at chance although training fits the data, in a ``model`` with
    BatchNorm (the signature of running statistics that do not match the weights), else None.

    Training fits: its loss is below half that of a uniform guess (ln K). At chance: validation accuracy
    within 0.1 of 1/K. Both are far apart in a healthy run; label smoothing keeps the training loss above
    its floor, which for the usual smoothing (≤ 0.2) stays well below half of ln K."""
    if num_classes < 2 or not batch_norm_layers(model):
        return None
    chance = 1.0 / num_classes
    if train_loss < 0.5 * math.log(num_classes) and val_accuracy <= chance + 0.1:
        return (
            f"validation accuracy {val_accuracy:.1%} is at chance ({chance:.1%} for {num_classes} classes) while the "
            f"training loss is {train_loss:.3f}: the BatchNorm running statistics likely do not fit the trained weights "
            "(small BatchNorm momentum, few steps or tiny feature maps); set strategy.preciseBatchNorm: true to "
            "recompute them over training batches before evaluation and export"
        )
    return None


PRECISE_BN_BATCHES: Final = 50
"""At most this many batches per worker and recomputation: about a third of an epoch of 150 steps in forward passes."""
PRECISE_BN_IMAGES: Final = 512
"""Images per recomputation, over all workers, beyond which more batches change nothing measurable: on the digits
at 32 px (1×1 feature maps in the last layers, the fewest values per image), statistics over 512 images evaluate
within 0.005 of those over the whole epoch (bench/precise_bn.py; bench/README.md). Small epochs, where the
forward passes were a whole epoch again, pay for 512 images instead."""


def recompute_batch_norm(model: nn.Module, batches: Sized, device: torch.device, frozen_bn: bool) -> int:
    """``precise_batch_norm`` of ``model`` (not a DDP wrapper: it would broadcast rank 0's buffers at every
    forward) over up to ``PRECISE_BN_BATCHES`` of this worker's ``batches`` and its share of ``PRECISE_BN_IMAGES``,
    then the statistics averaged over the workers so that every replica evaluates and saves the same model.
    Returns the batches used."""
    set_train_mode(model, frozen_bn=frozen_bn)
    layers = [m for m in batch_norm_layers(model) if m.training]
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    share = precise_bn_share(world)
    used = precise_batch_norm(model, cast(Iterable[Any], batches), device, min(PRECISE_BN_BATCHES, len(batches)), share)
    if used and world > 1:
        for m in layers:
            for buffer in (m.running_mean, m.running_var):
                assert buffer is not None
                dist.all_reduce(buffer)
                buffer /= world
    return used


def precise_bn_share(world: int) -> int:
    """Images of ``PRECISE_BN_IMAGES`` each of ``world`` workers recomputes the statistics over."""
    return math.ceil(PRECISE_BN_IMAGES / world)


def sync_batch_norm(model: nn.Module, enabled: bool, workers: int) -> nn.Module:
    """``model`` with SyncBatchNorm layers sharing its parameters when ``enabled`` and there are several
    workers (``strategy.syncBatchNorm``; validation allows it only with GPUs, where torch runs it)."""
    return cast(nn.Module, nn.SyncBatchNorm.convert_sync_batchnorm(model)) if enabled and workers > 1 else model  # type: ignore[no-untyped-call]
