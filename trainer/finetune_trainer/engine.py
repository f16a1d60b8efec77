"""One epoch of training and one pass of evaluation on one worker, in plain torch (no Ray here).

``train_one_epoch`` and ``evaluate`` follow torchvision's classification reference; ``Precision`` holds
the mixed-precision settings (autocast on CUDA only, a live GradScaler only for fp16); ``all_reduce``
sums numbers across the workers of a distributed run when there is one. The loop (``loop.py``) runs
them under Ray Train; ``bench/gpu_bench.py`` runs them in-process.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.seeding import seed_everything
from finetune_trainer.strategy import set_train_mode

__all__ = ["EvalStats", "Precision", "all_reduce", "build_precision", "evaluate", "seed_everything", "train_one_epoch"]


@dataclass
class Precision:
    """AMP settings: autocast only on CUDA (bf16/fp16), a live GradScaler only for fp16."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def build_precision(spec: FineTuneJobSpec, device: torch.device) -> Precision:
    mode = spec.hyperparameters.mixed_precision
    dtype = None
    if device.type == "cuda" and mode != "no":
        dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return Precision(device, dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed element-wise over every worker (unchanged outside a multi-worker process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
    grad_clip_norm: float | None,
    frozen_bn: bool,
    on_step: Callable[[torch.Tensor, int, torch.Tensor], None] | None = None,
) -> tuple[float, int]:
    """One pass over this worker's shard; returns (summed loss, images) for the cross-worker mean.
    ``on_step(loss, images, correct)`` after every step (rank 0's progress; ``correct``: the batch's right top-1
    predictions, a device tensor like the loss; the hook must not read either each time)."""
    set_train_mode(model, frozen_bn=frozen_bn)
    loss_sum, seen = 0.0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    for images, targets in loader:
        images, targets = images.to(precision.device, non_blocking=True), targets.to(precision.device, non_blocking=True)
        with precision.autocast():
            outputs = model(images)
            loss = criterion(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        if grad_clip_norm is not None:
            precision.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, grad_clip_norm)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        scheduler.step()
        if on_step is not None:
            on_step(loss, len(targets), (outputs.detach().argmax(dim=1) == targets).sum())
        loss_sum += float(loss.detach()) * len(targets)
        seen += len(targets)
    return loss_sum, seen


@dataclass
class EvalStats:
    """One evaluation pass: mean loss, top-1 and top-5 accuracy (None up to five classes), the number
    of images, and this worker's labels and top-1 predictions (for the final evaluation report)."""

    loss: float
    accuracy: float
    top5: float | None
    count: int
    y_true: list[int]
    y_pred: list[int]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader[Any], criterion: nn.Module, precision: Precision, num_classes: int, reduce: bool = True
) -> EvalStats:
    """Top-1, top-5 (more than five classes) and loss; summed across workers when ``reduce``.

    The loss is ``criterion`` without label smoothing: validation loss is the plain cross-entropy, so that
    it reads the same whatever smoothing the job trains with (smoothing puts a floor under it)."""
    if isinstance(criterion, nn.CrossEntropyLoss) and criterion.label_smoothing:
        criterion = nn.CrossEntropyLoss(weight=criterion.weight, ignore_index=criterion.ignore_index)
    model.eval()
    loss_sum, correct1, correct5, count = 0.0, 0.0, 0.0, 0
    y_true: list[int] = []
    y_pred: list[int] = []
    k = min(5, num_classes)
    for images, targets in loader:
        images, targets = images.to(precision.device), targets.to(precision.device)
        with precision.autocast():
            logits = model(images)
        logits = logits.float()
        loss_sum += float(criterion(logits, targets)) * len(targets)
        top = logits.topk(k, dim=1).indices
        correct1 += float((top[:, 0] == targets).sum())
        correct5 += float((top == targets[:, None]).any(dim=1).sum())
        count += len(targets)
        y_true += targets.tolist()
        y_pred += top[:, 0].tolist()
    if reduce:
        loss_sum, correct1, correct5, total = all_reduce([loss_sum, correct1, correct5, float(count)], precision.device)
        count = int(total)
    n = max(count, 1)
    # Top-5 of five classes or fewer is always 1: reported only when it can say something.
    return EvalStats(loss_sum / n, correct1 / n, correct5 / n if num_classes > 5 else None, count, y_true, y_pred)
