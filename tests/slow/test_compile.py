"""``hyperparameters.compile: true`` for real on the CPU (inductor, ~1 min on two busy cores): the compiled
model trains the same weights as the eager one, and what is saved is the plain model's state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune_trainer.artifacts import unwrap_model
from finetune_trainer.engine import Precision, train_one_epoch
from finetune_trainer.gpu import compile_model

pytestmark = pytest.mark.slow


def _train(model: nn.Module, trained: nn.Module) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    precision = Precision(torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False))
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8, 3, 8, 8, generator=generator), torch.randint(0, 3, (8,), generator=generator))
    loss_sum, _ = train_one_epoch(
        trained, DataLoader(data, batch_size=4), nn.CrossEntropyLoss(), optimizer, scheduler, precision, None, False
    )
    return loss_sum


def test_compiled_training_matches_eager_and_saves_plain_weights() -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model = copy.deepcopy(eager)
    compiled = compile_model(model, True)
    assert _train(model, compiled) == pytest.approx(_train(eager, eager), rel=1e-4)
    saved = unwrap_model(compiled).state_dict()
    assert list(saved) == list(eager.state_dict())  # no "_orig_mod." prefix
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(saved[name], value, rtol=1e-4, atol=1e-5)
