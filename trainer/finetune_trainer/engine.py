"""One epoch of training and one pass of evaluation on one worker, in plain torch (no Ray here).

``train_one_epoch`` and ``evaluate`` follow torchvision's classification reference; ``Precision`` holds
the device settings (autocast on CUDA only, a live GradScaler only for fp16, the batches' memory format:
``gpu``); ``all_reduce`` sums numbers across the workers of a distributed run when there is one. Sums stay
on the device during a pass: the host waits for the GPU once per pass, not once per step. The loop (``loop.py``) runs
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
from finetune_trainer.gpu import amp_dtype, memory_format, to_device
from finetune_trainer.seeding import seed_everything
from finetune_trainer.strategy import set_train_mode

__all__ = ["EvalStats", "Precision", "all_reduce", "build_precision", "evaluate", "seed_everything", "train_one_epoch"]


@dataclass
class Precision:
    """AMP settings: autocast only on CUDA (bf16/fp16), a live GradScaler only for fp16; and the memory
    format image batches are copied in (channels_last for a conv net on CUDA, ``gpu.memory_format``)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    memory_format: torch.memory_format = torch.preserve_format

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def build_precision(spec: FineTuneJobSpec, device: torch.device, model: nn.Module | None = None) -> Precision:
    """The job's precision on ``device``; with ``model``, batches in the memory format it trains fastest in
    (the caller moves the model to the same format)."""
    dtype = amp_dtype(spec.hyperparameters.mixed_precision, device)
    fmt = memory_format(model, device) if model is not None else torch.preserve_format
    return Precision(device, dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), fmt)


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
    predictions, a device tensor like the loss; the hook must not read either each time).

    The loss is summed on the device and read once, at the end: a ``float(loss)`` per step would make
    the host wait for every step's kernels and leave the GPU idle while it queues the next."""
    set_train_mode(model, frozen_bn=frozen_bn)
    loss_sum = torch.zeros((), dtype=torch.float64, device=precision.device)
    seen = 0
    params = [p for p in model.parameters() if p.requires_grad]
    for batch, labels in loader:
        images = to_device(batch, precision.device, precision.memory_format)
        targets = to_device(labels, precision.device, precision.memory_format)
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
        loss_sum += loss.detach().double() * len(targets)
        seen += len(targets)
    return float(loss_sum), seen


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
    # Sums and labels stay on the device until the pass ends (one host sync, as in train_one_epoch).
    sums = torch.zeros(3, dtype=torch.float64, device=precision.device)  # loss, top-1 hits, top-5 hits
    count = 0
    labels: list[torch.Tensor] = []
    predictions: list[torch.Tensor] = []
    k = min(5, num_classes)
    for batch, batch_targets in loader:
        images = to_device(batch, precision.device, precision.memory_format)
        targets = to_device(batch_targets, precision.device, precision.memory_format)
        with precision.autocast():
            logits = model(images)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        sums += torch.stack(
            [
                criterion(logits, targets) * len(targets),
                (top[:, 0] == targets).sum(),
                (top == targets[:, None]).any(dim=1).sum(),
            ]
        ).double()
        count += len(targets)
        labels.append(targets)
        predictions.append(top[:, 0])
    loss_sum, correct1, correct5 = (float(v) for v in sums.tolist())
    y_true: list[int] = torch.cat(labels).tolist() if labels else []
    y_pred: list[int] = torch.cat(predictions).tolist() if predictions else []
    if reduce:
        loss_sum, correct1, correct5, total = all_reduce([loss_sum, correct1, correct5, float(count)], precision.device)
        count = int(total)
    n = max(count, 1)
    # Top-5 of five classes or fewer is always 1: reported only when it can say something.
    return EvalStats(loss_sum / n, correct1 / n, correct5 / n if num_classes > 5 else None, count, y_true, y_pred)
