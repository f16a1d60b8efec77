"""What a finished run reports first is the model it ships (model.pt, the best epoch), not its last epoch:
`finetune run`'s summary line and the demo's transfer-against-scratch verdict, on runs whose best epoch is
not the last."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from finetune_trainer.driver import RunResult, read_result
from finetune_trainer.inputs import InputSpec
from finetune_trainer.local import _summary
from finetune_trainer.metrics_log import EpochRecord, append_metrics
from tests.support.tiny_model import write_tiny_artifacts

REPO = Path(__file__).resolve().parents[2]


def _record(epoch: int, val_accuracy: float) -> EpochRecord:
    return EpochRecord(
        epoch=epoch,
        stage="fine-tune",
        train_loss=0.5,
        val_loss=0.6,
        val_accuracy=val_accuracy,
        val_top5=None,
        images_per_second=100.0,
        epoch_seconds=1.0,
        lr=0.01,
    )


# Best at epoch 2 (0.875), last epoch 3 lower (0.741): the run of the lead's demo, in small.
EPOCHS = [_record(1, 0.5), _record(2, 0.875), _record(3, 0.741)]


def _result(shipped: EpochRecord | None) -> RunResult:
    return RunResult(
        job_name="tiny",
        run_dir="/runs/tiny",
        epochs=EPOCHS,
        val_accuracy=0.741,
        best_val_accuracy=0.875,
        best_epoch=2,
        model_card="/runs/tiny/model.json",
        shipped=shipped,
    )


@pytest.mark.parametrize(
    ("shipped", "expected"),
    [
        # What the card says ships leads, with its epoch; the last epoch follows.
        (EPOCHS[1], "tiny: model.pt holds epoch 2: val accuracy 87.50%; last epoch 3: 74.10%; artifacts in /runs/tiny"),
        # A best checkpoint that could not be read: the last epoch shipped, and the line says so.
        (EPOCHS[2], "tiny: model.pt holds epoch 3: val accuracy 74.10%; last epoch 3: 74.10%; artifacts in /runs/tiny"),
        # A card without metrics.shipped: the best epoch, which is what the trainer ships.
        (None, "tiny: best epoch 2: val accuracy 87.50%; last epoch 3: 74.10%; artifacts in /runs/tiny"),
    ],
)
def test_the_summary_leads_with_the_shipped_model(shipped: EpochRecord | None, expected: str) -> None:
    assert _summary(_result(shipped)) == expected


def test_the_run_result_names_the_epoch_the_card_says_ships(tmp_path: Path) -> None:
    """read_result takes model.pt's epoch from the card a run wrote (not the last line of metrics.jsonl)."""
    for record in EPOCHS:
        append_metrics(str(tmp_path / "pets"), record)
    spec = InputSpec(
        image_size=32,
        resize_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bilinear",
        grayscale_to_rgb=True,
    )
    run = write_tiny_artifacts(tmp_path, ["a", "b", "c"], spec, best_val_accuracy=0.875, shipped_epoch=2)

    result = read_result(run.cfg)
    assert result.shipped == EPOCHS[1] and result.last_epoch == 3
    assert _summary(result).startswith("pets: model.pt holds epoch 2: val accuracy 87.50%; last epoch 3: 74.10%;")


def _demo_compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_compare", REPO / "scripts" / "demo_compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_dir(root: Path, name: str, accuracies: list[float], shipped_epoch: int | None) -> Path:
    run = root / name
    run.mkdir()
    records = [_record(i + 1, acc).to_wire() for i, acc in enumerate(accuracies)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = {"final": records[-1], "best": {}, "epochs": len(records)}
    if shipped_epoch is not None:
        metrics["shipped"] = records[shipped_epoch - 1]
    (run / "model.json").write_text(json.dumps({"metrics": metrics}))
    return run


def test_the_demo_compares_shipped_model_with_shipped_model(tmp_path: Path) -> None:
    """The lead's run: transfer's last epoch (74.1%) below scratch's (77.2%), but the models they ship
    (best epochs, 87.5% and 81.2%) the other way round. The verdict is about the shipped ones."""
    demo = _demo_compare()
    transfer = demo.outcome(_run_dir(tmp_path, "transfer", [0.6, 0.875, 0.741], shipped_epoch=2))
    scratch = demo.outcome(_run_dir(tmp_path, "scratch", [0.5, 0.812, 0.772], shipped_epoch=2))
    assert transfer == demo.Outcome(shipped=0.875, shipped_epoch=2, last=0.741, last_epoch=3)

    lines = demo.comparison(transfer, scratch)
    assert lines[-1] == "  transfer wins by +6.3 points (shipped model against shipped model)"
    assert "87.5%" in lines[1] and "(2)" in lines[1] and "74.1%" in lines[1]


def test_the_demo_reads_an_older_card_as_shipping_the_last_epoch(tmp_path: Path) -> None:
    demo = _demo_compare()
    assert demo.outcome(_run_dir(tmp_path, "old", [0.6, 0.875, 0.741], shipped_epoch=None)) == demo.Outcome(
        shipped=0.741, shipped_epoch=3, last=0.741, last_epoch=3
    )
