"""A run that fails after epoch k resumes at epoch k+1 when the same job is launched again, keeping its
best metric and every finished epoch, and trains on exactly as the uninterrupted run does; a checkpoint
of another spec is refused, not resumed."""

from __future__ import annotations

import pytest
from ray.train import TrainingFailedError

from finetune_trainer import driver
from finetune_trainer.artifacts import read_metrics
from finetune_trainer.checkpoint import read_checkpoint
from finetune_trainer.errors import TrainerError
from tests.slow.conftest import MakeConfig
from tests.support.runs import curve, same_weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def test_relaunch_continues_after_the_last_checkpoint(make_config: MakeConfig) -> None:
    cfg = driver.absolute_output(make_config("resume", hyperparameters={"epochs": 4}))

    with pytest.raises(TrainingFailedError, match="injected failure after epoch 2"):
        driver.build_trainer(cfg, fail_after_epoch=2, local=True).fit()
    before = read_metrics(cfg.run_dir)
    assert [r.epoch for r in before] == [1, 2]

    result = driver.build_trainer(cfg, local=True).fit()

    assert result.metrics is not None
    assert result.metrics["resumed_from"] == 2
    after = read_metrics(cfg.run_dir)
    assert [r.epoch for r in after] == [1, 2, 3, 4]
    # Epochs 1 and 2 were not trained again: their records are untouched, timings included.
    assert after[:2] == before
    assert result.checkpoint is not None
    state = read_checkpoint(result.checkpoint.path, cfg.spec_fingerprint(), cfg.run_dir)["train_state"]
    assert state.epoch == 4
    # The best metric carried over the restart: it is the best of all four epochs, not of the last two
    # (the later one on ties, as Ray's checkpoint retention ranks them).
    best = max(after, key=lambda r: (r.val_accuracy, r.epoch))
    assert (state.best_val_accuracy, state.best_epoch) == (best.val_accuracy, best.epoch)
    assert result.metrics["best_val_accuracy"] == best.val_accuracy


# Random numbers every epoch: crops and flips, and dropout in MobileNet's classifier.
RANDOM_JOB = {"model": {"name": "mobilenet_v3_small"}, "dataset": {"augmentation": "standard"}, "hyperparameters": {"epochs": 4}}


def test_a_resumed_run_matches_the_uninterrupted_one(make_config: MakeConfig) -> None:
    straight = driver.absolute_output(make_config("straight", **RANDOM_JOB))
    driver.build_trainer(straight, local=True).fit()
    resumed = driver.absolute_output(make_config("resumed", **RANDOM_JOB))
    with pytest.raises(TrainingFailedError, match="injected failure after epoch 2"):
        driver.build_trainer(resumed, fail_after_epoch=2, local=True).fit()

    result = driver.build_trainer(resumed, local=True).fit()

    assert result.metrics is not None and result.metrics["resumed_from"] == 2
    # Exactly, on CPU: the same numbers are drawn and summed in the same order. Epochs 1-2 of both runs
    # start from the seed alone: this is also the one-worker case of test_reproducibility.
    assert curve(read_metrics(resumed.run_dir)) == curve(read_metrics(straight.run_dir))
    assert same_weights(straight.run_dir, resumed.run_dir)


def test_a_checkpoint_of_another_spec_is_refused(make_config: MakeConfig) -> None:
    cfg = make_config("changed", hyperparameters={"epochs": 1})
    driver.run(cfg, local=True)
    changed = make_config("changed", hyperparameters={"epochs": 1, "learningRate": 0.01})

    with pytest.raises(TrainerError, match="holds checkpoints of a different spec") as raised:
        driver.run(changed, local=True)
    assert "\n" not in str(raised.value)
