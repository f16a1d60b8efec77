"""A run that fails after epoch k resumes at epoch k+1 when the same job is launched again, keeping its
best metric and every finished epoch, and trains on exactly as the uninterrupted run does, its TensorBoard steps
going on from the checkpoint's; a checkpoint of another spec is refused, not resumed."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.train import TrainingFailedError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune_trainer import driver
from finetune_trainer.artifacts import read_metrics
from finetune_trainer.checkpoint import read_checkpoint
from finetune_trainer.errors import TrainerError
from tests.slow.conftest import MakeConfig
from tests.support.runs import curve, same_weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


# Random numbers every epoch: crops and flips, and dropout in MobileNet's classifier. TensorBoard at every step,
# to see that the relaunch goes on from the checkpoint's step.
RANDOM_JOB = {
    "model": {"name": "mobilenet_v3_small"},
    "dataset": {"augmentation": "standard"},
    "hyperparameters": {"epochs": 4},
    "tracking": {"tensorboard": {"logEverySteps": 1}},
}


# Four fits: measured 767 s at load 20-35 beside a unit-tier run (over the tier's 600 s); the limit is for a wedged run.
@pytest.mark.timeout(1500)
def test_a_relaunch_resumes_after_the_last_checkpoint_as_the_uninterrupted_run_trains(make_config: MakeConfig) -> None:
    """One crashed-and-relaunched run (each Ray Train fit costs ~10-20 s of start-up on the slow tier's two cores,
    so the relaunch, its bookkeeping, its exactness and the refusal of another spec share it)."""
    straight = driver.absolute_output(make_config("straight", **RANDOM_JOB))
    driver.build_trainer(straight, local=True).fit()
    resumed = driver.absolute_output(make_config("resumed", **RANDOM_JOB))
    with pytest.raises(TrainingFailedError, match="injected failure after epoch 2"):
        driver.build_trainer(resumed, fail_after_epoch=2, local=True).fit()
    before = read_metrics(resumed.run_dir)
    assert [r.epoch for r in before] == [1, 2]

    result = driver.build_trainer(resumed, local=True).fit()
    assert result.metrics is not None and result.metrics["resumed_from"] == 2
    after = read_metrics(resumed.run_dir)
    assert [r.epoch for r in after] == [1, 2, 3, 4]
    # Epochs 1 and 2 were not trained again: their records are untouched, timings included.
    assert after[:2] == before
    assert result.checkpoint is not None
    state = read_checkpoint(result.checkpoint.path, resumed.spec_fingerprint(), resumed.run_dir)["train_state"]
    assert state.epoch == 4
    # The best metric carried over the restart: it is the best of all four epochs, not of the last two
    # (the later one on ties, as Ray's checkpoint retention ranks them).
    best = max(after, key=lambda r: (r.val_accuracy, r.epoch))
    assert (state.best_val_accuracy, state.best_epoch) == (best.val_accuracy, best.epoch)
    assert result.metrics["best_val_accuracy"] == best.val_accuracy

    # Exactly, on CPU: the same numbers are drawn and summed in the same order. Epochs 1-2 of both runs
    # start from the seed alone: this is also the one-worker case of test_reproducibility.
    assert curve(after) == curve(read_metrics(straight.run_dir))
    assert same_weights(straight.run_dir, resumed.run_dir)

    # TensorBoard: one point per optimizer step across both launches, the relaunch going on from epoch 2's last step.
    tensorboard = EventAccumulator(str(Path(resumed.run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    tensorboard.Reload()
    epochs = tensorboard.Scalars("epoch/epoch")
    assert [e.value for e in epochs] == [1.0, 2.0, 3.0, 4.0]
    assert [e.step for e in tensorboard.Scalars("step/train_loss")] == list(range(1, int(epochs[-1].step) + 1))
    assert epochs[2].step - epochs[1].step == epochs[0].step

    # The same job relaunched with another spec finds these checkpoints and refuses them in one line.
    changed = make_config("resumed", **{**RANDOM_JOB, "hyperparameters": {"epochs": 4, "learningRate": 0.01}})
    with pytest.raises(TrainerError, match="holds checkpoints of a different spec") as raised:
        driver.run(changed, local=True)
    assert "\n" not in str(raised.value)
