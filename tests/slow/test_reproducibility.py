"""Two Ray Train workers (DDP over gloo) train on the digits: metrics reduced over both, artifacts written; and a
job run twice with one seed on one machine computes the same run, with one worker or two (DDP): every epoch's
losses and accuracies, and the final model. One test: each Ray Train fit costs ~10-20 s of start-up on the slow
tier's two cores, so the DDP run's checks ride on the first of the two seeded runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from finetune_trainer import driver
from finetune_trainer.artifacts import read_metrics
from tests.slow.conftest import MakeConfig
from tests.support.runs import curve, same_weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


# Two workers (DDP) only: one worker's run is reproduced exactly by test_resume's resumed run, which
# starts again from the seed, so a run that is not reproducible on one worker fails there.
def test_two_workers_train_write_artifacts_and_one_seed_gives_one_run(make_config: MakeConfig) -> None:
    runs = []
    for name in ("first", "again"):
        cfg = driver.absolute_output(
            make_config(
                f"{name}-2",
                # Random numbers every epoch: crops and flips, and dropout in MobileNet's classifier.
                model={"name": "mobilenet_v3_small"},
                dataset={"augmentation": "standard"},
                resources={"workers": 2, "cpusPerWorker": 1},
                output={"exports": ["state_dict", "torchscript"]},
            )
        )
        result = driver.build_trainer(cfg, local=True).fit()
        assert result.metrics is not None and result.metrics["world_size"] == 2
        runs.append(cfg.run_dir)
        if name == "first":
            check_ddp_run(cfg.run_dir, result, driver.read_result(cfg))

    first, again = (curve(read_metrics(run)) for run in runs)
    assert len(first) == 2 and first == again
    assert same_weights(*runs)


def check_ddp_run(run: str, result: Any, summary: driver.RunResult) -> None:
    """What a 2-worker run leaves: metrics reduced over both workers, artifacts, plain weights."""
    metrics = result.metrics  # ray.train's Result
    assert metrics["epoch"] == 2
    records = read_metrics(run)
    assert [r.epoch for r in records] == [1, 2]
    assert all(r.stage == "fine-tune" and r.train_loss > 0 and 0 <= r.val_accuracy <= 1 for r in records)
    assert records[-1].train_loss < records[0].train_loss

    run_dir = Path(run)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    # Each worker evaluated its own half; summed, every held-out image counted exactly once (20% of the
    # digits 0-2, uncapped), and the accuracy agrees with rank 0's final pass over the whole set, which
    # evaluates the shipped weights: the best epoch's (the later one on ties).
    best = max(records, key=lambda r: (r.val_accuracy, r.epoch))
    assert metrics["val_images"] == evaluation["numSamples"] > 100
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
    torchvision.models.mobilenet_v3_small(num_classes=3).load_state_dict(state)
    assert result.checkpoint is not None and Path(result.checkpoint.path).name.startswith("checkpoint_epoch_")

    assert summary.last_epoch == 2
    assert (summary.best_val_accuracy, summary.best_epoch) == (best.val_accuracy, best.epoch)
