"""Issue 15 in experiment tracking: the TensorBoard event files uploaded to an s3:// / gs:// run directory ask for the
store's KMS encryption like every artifact (``encryption.serverSide``), and MLflow receives the card's signature
with the card, so a model fetched from MLflow can be verified."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from torch import nn
from torch.utils.data import TensorDataset

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer import storage
from finetune_trainer.inputs import InputSpec
from finetune_trainer.metrics_log import EpochRecord
from finetune_trainer.tracking import TB_DIR, Tracker

CLASSES = ["a", "b", "c"]
INPUT = InputSpec(image_size=8, resize_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", grayscale_to_rgb=True)
KMS_KEY = "alias/models"


def config(uri: str, **spec: Any) -> TrainerConfig:
    raw: dict[str, Any] = {
        "model": {"name": "resnet18"},
        "dataset": {"format": "digits", "classes": [0, 1, 2], "imageSize": 32},
        "hyperparameters": {"epochs": 1, "batchSize": 8},
        "output": {"uri": uri},
        **spec,
    }
    return TrainerConfig(job_name="job", spec=FineTuneJobSpec.model_validate(raw), output_root=uri)


def one_epoch(tracker: Tracker) -> None:
    tracker.step(1, loss=1.0, lrs=[0.1], images_per_second=50.0)
    record = EpochRecord(
        epoch=1,
        stage="fine-tune",
        train_loss=1.0,
        val_loss=1.0,
        val_accuracy=0.5,
        val_top5=None,
        images_per_second=100.0,
        epoch_seconds=2.0,
        lr=0.1,
    )
    tracker.epoch(record, 1, best=0.5, lrs=[0.1])


def test_event_files_uploaded_to_the_store_ask_for_its_kms_encryption(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the key, the event files (loss curves, sample images) land unencrypted beside SSE-KMS artifacts."""
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "s3", MemoryFileSystem)
    uploads: list[tuple[str, str | None]] = []
    real = storage.upload_file

    def record_upload(src: str | Path, uri: str, *, kms_key: str | None = None) -> None:
        uploads.append((uri, kms_key))
        real(src, uri)  # the in-memory store takes no SSE options

    monkeypatch.setattr(storage, "upload_file", record_upload)
    cfg = config("s3://models/runs", output={"uri": "s3://models/runs", "encryption": {"serverSide": {"kmsKey": KMS_KEY}}})
    tracker = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    one_epoch(tracker)
    tracker.fail()
    events = [(uri, key) for uri, key in uploads if f"/{TB_DIR}/events.out.tfevents." in uri]
    assert events and all(key == KMS_KEY for _, key in events), uploads


def test_mlflow_receives_the_card_signature_with_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path / 'mlruns'}"
    cfg = config(str(tmp_path / "runs"), tracking={"mlflow": {"trackingUri": store, "experimentName": "signed"}})
    run_dir = tmp_path / "runs" / "job"
    run_dir.mkdir(parents=True)
    tracker = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    one_epoch(tracker)
    (run_dir / "model.json").write_text("{}")
    (run_dir / "model.json.sig").write_text('{"algorithm": "Ed25519"}')
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, len(CLASSES)))
    tracker.finish(model, TensorDataset(torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])), CLASSES, INPUT)
    assert tracker.mlflow is not None and tracker.mlflow.run_id is not None
    names = {a.path for a in MlflowClient(tracking_uri=store).list_artifacts(tracker.mlflow.run_id)}
    assert {"model.json", "model.json.sig"} <= names
