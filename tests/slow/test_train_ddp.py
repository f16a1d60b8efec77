"""Two Ray Train workers (DDP over gloo) train on the digits: metrics reduced over both, artifacts written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from finetune_trainer import driver
from finetune_trainer.artifacts import read_metrics
from tests.slow.conftest import MakeConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def test_two_workers_train_and_write_artifacts(make_config: MakeConfig) -> None:
    cfg = driver.absolute_output(
        make_config(
            "ddp",
            dataset={"augmentation": "light"},
            resources={"workers": 2, "cpusPerWorker": 1},
            hyperparameters={"epochs": 3},
            output={"exports": ["state_dict", "torchscript"]},
        )
    )
    result = driver.build_trainer(cfg, local=True).fit()

    assert result.metrics is not None
    assert result.metrics["world_size"] == 2
    assert result.metrics["epoch"] == 3
    records = read_metrics(cfg.run_dir)
    assert [r.epoch for r in records] == [1, 2, 3]
    assert all(r.stage == "fine-tune" and r.train_loss > 0 and 0 <= r.val_accuracy <= 1 for r in records)
    assert records[-1].train_loss < records[0].train_loss

    run_dir = Path(cfg.run_dir)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    # Each worker evaluated its own half; summed, every held-out image counted exactly once (20% of the
    # digits 0-2, uncapped), and the accuracy agrees with rank 0's final pass over the whole set, which
    # evaluates the shipped weights: the best epoch's (the later one on ties).
    best = max(records, key=lambda r: (r.val_accuracy, r.epoch))
    assert result.metrics["val_images"] == evaluation["numSamples"] > 100
    assert abs(evaluation["accuracy"] - best.val_accuracy) <= 1.5 / evaluation["numSamples"]
    for name in (
        "model.pt",
        "model.torchscript.pt",
        "model.json",
        "evaluation.json",
        "confusion_matrix.png",
        "training_curves.png",
    ):
        assert (run_dir / name).stat().st_size > 0, name
    card = json.loads((run_dir / "model.json").read_text())
    assert card["classNames"] == ["0", "1", "2"]

    # model.pt is a plain state_dict of the unwrapped model: no DDP "module." prefixes.
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(state)
    assert result.checkpoint is not None and Path(result.checkpoint.path).name.startswith("checkpoint_epoch_")

    summary = driver.read_result(cfg)
    assert summary.last_epoch == 3
    assert (summary.best_val_accuracy, summary.best_epoch) == (best.val_accuracy, best.epoch)
