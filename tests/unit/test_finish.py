"""The end of a run (issue 11 item 3), on the CPU without a Ray runtime: model.pt holds the best checkpoint's
weights, not the last epoch's, and evaluation.json, the model card and status.artifacts describe them; an
unusable best checkpoint ships the last epoch's weights with a warning, and says so everywhere. The final
evaluation of a streamed dataset skips and counts an unreadable image under the per-epoch limit (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import Artifacts, FineTuneJobSpec, Metrics, Progress
from finetune_trainer.checkpoint import CHECKPOINT_FILE, TrainState, checkpoint_dir_name
from finetune_trainer.data import eval_transform
from finetune_trainer.engine import Precision
from finetune_trainer.errors import TrainerError
from finetune_trainer.finish import finish_run
from finetune_trainer.image_folder import StreamedImages
from finetune_trainer.inputs import InputSpec
from finetune_trainer.metrics_log import EpochRecord, append_metrics
from tests.support.checkpoints import save_checkpoint

CLASSES = ["a", "b", "c"]
SIZE = 4
INPUT = InputSpec(
    image_size=SIZE, resize_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", grayscale_to_rgb=True
)


class Recorder:
    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.artifacts: Artifacts | None = None

    def update(self, progress: Progress, metrics: Metrics | None = None) -> None:
        pass

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def finish(self, artifacts: Artifacts | None = None, error: str | None = None) -> None:
        self.artifacts = artifacts


def config(root: Path) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "digits", "classes": [0, 1, 2], "imageSize": 32},
            "output": {"uri": str(root)},
            "hyperparameters": {"epochs": 3},
        }
    )
    return TrainerConfig(job_name="job", spec=spec, output_root=str(root))


def model_of(bias: list[float]) -> nn.Module:
    """A model that predicts the class of the largest ``bias`` whatever the image (zero weights)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor(bias))
    return model


# Epoch 2 predicts class "a", right for 3 of the 4 validation images; epoch 3 predicts "c", right for 1.
VAL = TensorDataset(torch.zeros(4, 3, SIZE, SIZE), torch.tensor([0, 0, 0, 2]))
EPOCHS = {1: ([0.0, 1.0, 0.0], 0.0), 2: ([1.0, 0.0, 0.0], 0.75), 3: ([0.0, 0.0, 1.0], 0.25)}


def train(cfg: TrainerConfig) -> tuple[TrainState, nn.Module]:
    """Three epochs' checkpoints and metrics, as the loop leaves them; returns the state and the last model."""
    state = TrainState()
    for epoch, (bias, acc) in EPOCHS.items():
        model = model_of(bias)
        state.observe(epoch, acc, 0.0)
        save_checkpoint(Path(cfg.run_dir) / checkpoint_dir_name(epoch), model, state, cfg.spec_fingerprint())
        values: dict[str, Any] = dict(
            train_loss=1.0, val_loss=1.0, val_top5=None, images_per_second=1.0, epoch_seconds=1.0, lr=0.1
        )
        append_metrics(cfg.run_dir, EpochRecord(epoch=epoch, stage="fine-tune", val_accuracy=acc, **values))
    return state, model


def finish(cfg: TrainerConfig, state: TrainState, model: nn.Module, sinks: Recorder, val: Any = VAL) -> None:
    finish_run(
        cfg,
        model=model,
        class_names=CLASSES,
        precision=Precision(torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False)),
        criterion=nn.CrossEntropyLoss(),
        val=val,
        state=state,
        input_spec=INPUT,
        sinks=sinks,
    )


def read(cfg: TrainerConfig, name: str) -> Any:
    return json.loads((Path(cfg.run_dir) / name).read_text())


def test_model_pt_is_the_best_checkpoint_and_everything_describes_it(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    state, last_model = train(cfg)
    assert (state.best_epoch, state.epoch) == (2, 3)
    sinks = Recorder()

    finish(cfg, state, last_model, sinks)

    shipped = torch.load(Path(cfg.run_dir) / "model.pt", weights_only=True)
    best = torch.load(Path(cfg.run_dir) / checkpoint_dir_name(2) / CHECKPOINT_FILE, weights_only=True)["model"]
    assert shipped.keys() == best.keys() and all(torch.equal(shipped[k], best[k]) for k in best)
    assert read(cfg, "evaluation.json")["accuracy"] == 0.75  # epoch 2's accuracy, not epoch 3's 0.25
    card = read(cfg, "model.json")
    assert card["metrics"]["shipped"]["epoch"] == 2 and card["metrics"]["shipped"]["valAccuracy"] == 0.75
    assert card["metrics"]["final"]["epoch"] == 3
    assert card["evaluation"]["accuracy"] == 0.75
    assert sinks.artifacts is not None and sinks.artifacts.checkpoint_uri == f"{cfg.run_dir}/{checkpoint_dir_name(2)}"
    assert sinks.warnings == []


def test_an_unusable_best_checkpoint_ships_the_last_epoch_and_says_so(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    state, last_model = train(cfg)
    path = Path(cfg.run_dir) / checkpoint_dir_name(2) / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:100])
    sinks = Recorder()

    finish(cfg, state, last_model, sinks)

    (warning,) = sinks.warnings
    assert warning.startswith("checkpoint checkpoint_epoch_0002: ")
    assert warning.endswith("model.pt holds the last epoch's weights (epoch 3) instead of the best")
    assert read(cfg, "evaluation.json")["accuracy"] == 0.25
    assert read(cfg, "model.json")["metrics"]["shipped"]["epoch"] == 3
    assert sinks.artifacts is not None and sinks.artifacts.checkpoint_uri == f"{cfg.run_dir}/{checkpoint_dir_name(3)}"
    # The model card and its README say so too.
    assert read(cfg, "model.json")["warnings"] == [warning]
    assert "**Warning**: checkpoint checkpoint\\_epoch\\_0002" in (Path(cfg.run_dir) / "README.md").read_text()


@pytest.mark.parametrize("best_checkpoint", [None, "checkpoint_epoch_0002"])
def test_a_checkpoint_without_the_best_ones_name_still_ships_the_best(tmp_path: Path, best_checkpoint: str | None) -> None:
    """A state written before ``best_checkpoint`` existed names the best epoch only."""
    cfg = config(tmp_path)
    state, last_model = train(cfg)
    state.best_checkpoint = best_checkpoint
    finish(cfg, state, last_model, Recorder())
    assert read(cfg, "model.json")["metrics"]["shipped"]["epoch"] == 2


# ------------------------------------------------------- the final evaluation of a streamed (listed) dataset
def streamed_val(root: Path, count: int, corrupt: int) -> tuple[StreamedImages, list[str]]:
    """An ImageFolder of ``count`` tiny JPEGs over the three classes, listed (not scanned) as the streaming path
    lists it, whose file number ``corrupt`` is a JPEG with a broken body; returns it and the corrupt file's path."""
    samples = []
    for i in range(count):
        label = i % len(CLASSES)
        path = root / CLASSES[label] / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6), (40 * label, 90, 160)).save(path)
        samples.append((str(path), label))
    broken = root / CLASSES[samples[corrupt][1]] / f"{corrupt:03d}.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 a JPEG's magic, then nothing readable")
    return StreamedImages(samples, eval_transform(INPUT)), [str(broken)]


def test_the_final_evaluation_skips_and_counts_an_unreadable_streamed_image(tmp_path: Path) -> None:
    """One unreadable image of 100 (the 1 % limit): the per-epoch evaluation skipped it, so does the final one,
    and the model card says so; before, reading it map-style failed the run at its very end."""
    cfg = config(tmp_path / "runs")
    state, last_model = train(cfg)
    val, (broken,) = streamed_val(tmp_path / "val", 100, corrupt=7)
    finish(cfg, state, last_model, Recorder(), val)
    evaluation = read(cfg, "evaluation.json")
    assert evaluation["numSamples"] == 99
    # Epoch 2's weights predict "a": right for the 34 "a" images (the 7th, a "b", is the one skipped).
    assert evaluation["accuracy"] == 34 / 99
    assert read(cfg, "model.json")["warnings"] == [
        f"final evaluation: dataset: skipped 1 of 100 images that cannot be decoded (e.g. {broken})"
    ]


def test_above_the_limit_the_final_evaluation_fails_with_the_one_line_error(tmp_path: Path) -> None:
    cfg = config(tmp_path / "runs")
    state, last_model = train(cfg)
    val, (broken,) = streamed_val(tmp_path / "val", 50, corrupt=0)
    with pytest.raises(TrainerError) as info:
        finish(cfg, state, last_model, Recorder(), val)
    assert str(info.value) == (
        f"dataset: 1 of 50 images read cannot be decoded (e.g. {broken}); "
        "at most 1% may be, and they are skipped: fix or remove them"
    )
