"""One evaluation pass and the precision settings, on fixed logits on the CPU (no process group, no Ray)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.engine import build_precision, evaluate

CPU = torch.device("cpu")


def spec(mixed_precision: str) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "fake", "imageSize": 32},
            "output": {"uri": "/tmp/out"},
            "hyperparameters": {"mixedPrecision": mixed_precision},
        }
    )


@pytest.mark.parametrize(
    ("logits", "targets", "accuracy", "top5", "y_pred"),
    [
        # three classes: top-1 only (top-5 of three classes would always be 1)
        ([[3, 2, 1], [1, 3, 2], [1, 2, 3], [3, 1, 2]], [0, 2, 2, 1], 0.5, None, [0, 1, 2, 0]),
        # five classes: top-5 is always 1, so none is reported
        ([[3, 2, 1, 0, 0], [1, 3, 2, 0, 0]], [0, 4], 0.5, None, [0, 1]),
        # six classes: class 0 ranked last is a top-5 miss, ranked second a top-5 hit
        (
            [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [5, 0, 0, 0, 0, 6], [0, 0, 9, 0, 0, 0]],
            [0, 5, 0, 2],
            0.5,
            0.75,
            [5, 5, 5, 2],
        ),
    ],
)
def test_evaluate(logits: list[list[float]], targets: list[int], accuracy: float, top5: float | None, y_pred: list[int]) -> None:
    x, y = torch.tensor(logits, dtype=torch.float32), torch.tensor(targets)
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(TensorDataset(x, y), batch_size=3)  # batches of 3 and 1
    criterion = nn.CrossEntropyLoss()
    stats = evaluate(nn.Identity(), loader, criterion, build_precision(spec("no"), CPU), num_classes=len(logits[0]))
    assert stats.accuracy == pytest.approx(accuracy)
    assert stats.top5 == (None if top5 is None else pytest.approx(top5))
    assert stats.loss == pytest.approx(float(criterion(x, y)))  # the mean over images, not over batches
    assert (stats.count, stats.y_true, stats.y_pred) == (len(targets), targets, y_pred)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_validation_loss_is_plain_cross_entropy(smoothing: float) -> None:
    """Label smoothing shapes training only: the validation loss of confident right answers is near 0."""
    x, y = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0]]), torch.tensor([0, 1])
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(TensorDataset(x, y), batch_size=2)
    smoothed = nn.CrossEntropyLoss(label_smoothing=smoothing)
    stats = evaluate(nn.Identity(), loader, smoothed, build_precision(spec("no"), CPU), num_classes=3)
    assert stats.loss == pytest.approx(float(nn.functional.cross_entropy(x, y)))


@pytest.mark.parametrize("mode", ["no", "bf16", "fp16"])
def test_mixed_precision_is_cuda_only(mode: str) -> None:
    precision = build_precision(spec(mode), CPU)
    assert precision.dtype is None
    assert not precision.scaler.is_enabled()
