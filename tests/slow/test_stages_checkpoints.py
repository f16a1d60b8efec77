"""Issue 11 items 1, 2, 3, 9 end to end under Ray Train: lp-ft fine-tunes after a probe that plateaued;
the checkpoint the status names survives Ray's retention, ties included; model.pt is that checkpoint's
weights and evaluation.json and the model card describe them; a truncated checkpoint falls back to the
previous good one with a warning in the status, and a run without any usable checkpoint fails in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_operator.api.contract import TrainerConfig
from finetune_trainer import driver
from finetune_trainer.artifacts import read_metrics
from finetune_trainer.checkpoint import CHECKPOINT_FILE, checkpoint_dir_name
from finetune_trainer.errors import TrainerError
from tests.slow.conftest import MakeConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def with_status_file(cfg: TrainerConfig) -> TrainerConfig:
    """``cfg`` reporting to ``<run dir>/status.json`` too: what the FineTuneJob status would show."""
    return driver.absolute_output(cfg.model_copy(update={"sinks": ["console", "file"]}))


def status(cfg: TrainerConfig) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((Path(cfg.run_dir) / "status.json").read_text())
    return doc


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_lp_ft_fine_tunes_after_a_probe_plateau_and_ships_the_best_weights(make_config: MakeConfig) -> None:
    # minDelta 1: no epoch ever counts as an improvement, so each stage stops after 1 + patience epochs.
    # A backbone rate of 10 wrecks fine-tuning, so that the best epoch is a probe epoch, far from the last one. Wrecked
    # is chaotic, not certain: the probe on an untrained backbone scores 0.65-0.90 and a wrecked model 0.06-0.93 (seeds
    # 0 and 1 scored best in fine-tuning once the optimizer's kernel changed; seed 0 had held before). So seeds are
    # tried, the one that held last first, and the behaviour is checked on the first whose best epoch is a probe one.
    for seed in (2, 0, 1, 3, 4):
        cfg = with_status_file(
            make_config(
                f"plateau-{seed}",
                strategy={"method": "lp-ft", "probeEpochs": 3},
                hyperparameters={
                    "epochs": 6,
                    "seed": seed,
                    "backboneLearningRate": 10,
                    "earlyStopping": {"patience": 1, "minDelta": 1.0},
                },
            )
        )
        driver.run(cfg, local=True)

        records = read_metrics(cfg.run_dir)
        # The probe stops at epoch 2; fine-tuning still runs, with a fresh patience: epochs 4 and 5, not none
        # (the plateau skipped it) nor epoch 4 alone (the probe's patience carried over).
        assert [(r.epoch, r.stage) for r in records] == [(1, "probe"), (2, "probe"), (4, "fine-tune"), (5, "fine-tune")]
        best = max(records, key=lambda r: (r.val_accuracy, r.epoch))
        if best.stage == "probe":
            break
    assert best.stage == "probe", f"the construction failed for seeds 0-4: the best epoch is {best}"

    # model.pt is the best epoch's checkpoint, the one the status names, not the last epoch's weights.
    doc = status(cfg)
    assert doc["metrics"]["bestEpoch"] == best.epoch
    checkpoint = Path(doc["artifacts"]["checkpointUri"])
    assert checkpoint.name.startswith(checkpoint_dir_name(best.epoch))
    best_checkpoint = torch.load(checkpoint / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    shipped = torch.load(Path(cfg.run_dir) / "model.pt", map_location="cpu", weights_only=True)
    # A probe epoch's checkpoint holds only what trains, over the starting weights (issue 14 item 4): model.pt
    # is those weights with the stored part on top.
    saved = best_checkpoint["model"]
    assert best_checkpoint["base"] is not None and set(saved) < set(shipped)
    for key, tensor in saved.items():
        assert torch.equal(shipped[key], tensor), key
    # The last epoch's checkpoint (Ray always keeps the latest) holds other weights: model.pt is not them.
    last = torch.load(Path(cfg.run_dir) / checkpoint_dir_name(5) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert any(not torch.equal(shipped[k], t) for k, t in last["model"].items())
    # The final evaluation and the card describe those weights: the best epoch's accuracy, not the last's.
    card = json.loads((Path(cfg.run_dir) / "model.json").read_text())
    assert card["metrics"]["shipped"]["epoch"] == best.epoch
    assert card["metrics"]["final"]["epoch"] == 5
    evaluation = json.loads((Path(cfg.run_dir) / "evaluation.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(best.val_accuracy)
    assert card["evaluation"]["accuracy"] == pytest.approx(best.val_accuracy)


def test_the_named_checkpoint_survives_retention_on_ties(make_config: MakeConfig) -> None:
    # A linear probe on cached features (the backbone never runs in train mode, so its batch-norm
    # statistics stay) at a learning rate of 1e-9 leaves every prediction as it was: three epochs of the
    # same accuracy. Ray keeps one checkpoint, the later one of a tie.
    cfg = with_status_file(
        make_config(
            "ties",
            strategy={"method": "linear-probe"},
            hyperparameters={"epochs": 3, "learningRate": 1e-9},
            output={"keepCheckpoints": 1},
        )
    )
    driver.run(cfg, local=True)

    records = read_metrics(cfg.run_dir)
    assert len({r.val_accuracy for r in records}) == 1, "the tie this test needs did not happen"
    doc = status(cfg)
    assert doc["metrics"]["bestEpoch"] == 3
    checkpoint = Path(doc["artifacts"]["checkpointUri"])
    assert checkpoint.name == checkpoint_dir_name(3)
    assert (checkpoint / CHECKPOINT_FILE).is_file()
    assert sorted(p.name for p in Path(cfg.run_dir).glob("checkpoint_epoch_*")) == [checkpoint.name]


def test_a_truncated_checkpoint_falls_back_and_none_usable_fails_in_one_line(make_config: MakeConfig) -> None:
    cfg = with_status_file(make_config("corrupt", hyperparameters={"epochs": 3}))
    with pytest.raises(Exception, match="injected failure after epoch 2"):
        driver.build_trainer(cfg, fail_after_epoch=2, local=True).fit()
    run = Path(cfg.run_dir)
    truncate(run / checkpoint_dir_name(2) / CHECKPOINT_FILE)

    result = driver.build_trainer(cfg, local=True).fit()

    assert result.metrics is not None and result.metrics["resumed_from"] == 1
    assert [r.epoch for r in read_metrics(cfg.run_dir)] == [1, 2, 3]
    (warning,) = status(cfg)["warnings"]
    assert warning.startswith("checkpoint checkpoint_epoch_0002: checkpoint.pt has sha256 ")
    assert warning.endswith("resumed from checkpoint checkpoint_epoch_0001 (epoch 1)")
    # Epochs 2 and 3 were trained again into checkpoints of their own; the abandoned one is untouched.
    assert (run / "checkpoint_epoch_0003_r1" / CHECKPOINT_FILE).is_file()
    assert Path(status(cfg)["artifacts"]["checkpointUri"]).is_dir()

    for path in run.glob("checkpoint_epoch_*/" + CHECKPOINT_FILE):
        truncate(path)
    with pytest.raises(
        TrainerError, match=r"^output: no usable checkpoint in .*corrupt: checkpoint checkpoint_epoch_0003_r1"
    ) as raised:
        driver.run(cfg, local=True)
    assert "\n" not in str(raised.value)
