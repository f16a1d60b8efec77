"""Experiment tracking (issue 13 item 1) without Ray: TensorBoard event files read back by TensorBoard's own
reader, a resume that purges what a crashed attempt logged after its checkpoint, an MLflow file store that
receives params, metrics and artifacts and is continued on resume, and a dead MLflow server that costs one
warning and never the run."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.inputs import InputSpec
from finetune_trainer.metrics_log import EpochRecord
from finetune_trainer.tracking import STATE_FILE, TB_DIR, Tracker, hparams_of
from tests.support.s3 import s3_server

CLASSES = ["a", "b", "c"]
INPUT = InputSpec(image_size=8, resize_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", grayscale_to_rgb=True)


def config(root: Path, mlflow: dict[str, Any] | None = None) -> TrainerConfig:
    raw: dict[str, Any] = {
        "model": {"name": "resnet18"},
        "dataset": {"format": "digits", "classes": [0, 1, 2], "imageSize": 32},
        "hyperparameters": {"epochs": 3, "batchSize": 8},
        "output": {"uri": str(root)},
    }
    if mlflow is not None:
        raw["tracking"] = {"mlflow": mlflow}
    return TrainerConfig(job_name="job", spec=FineTuneJobSpec.model_validate(raw), output_root=str(root))


def record(epoch: int, accuracy: float) -> EpochRecord:
    return EpochRecord(
        epoch=epoch,
        stage="fine-tune",
        train_loss=1.0 / epoch,
        val_loss=1.5 / epoch,
        val_accuracy=accuracy,
        val_top5=None,
        images_per_second=100.0,
        epoch_seconds=2.0,
        lr=0.01,
    )


def train(
    tracker: Tracker, epoch: int, steps: int, accuracy: float, *, finish_epoch: bool = True, checkpoint: bool = True
) -> None:
    """``steps`` per-step points after the tracker's global step, then (optionally) the epoch's record and, as the
    loop does once the epoch's checkpoint is stored, ``committed`` (``checkpoint=False``: the attempt died first)."""
    start = tracker.global_step
    for step in range(start + 1, start + steps + 1):
        tracker.step(step, loss=accuracy, lrs=[0.1, 0.01], images_per_second=50.0)
    if finish_epoch:
        tracker.epoch(record(epoch, accuracy), start + steps, best=accuracy, lrs=[0.1, 0.01])
        if checkpoint:
            tracker.committed(epoch)


def read_events(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TB_DIR), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def tiny_model_and_data() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, len(CLASSES)))
    data = TensorDataset(torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]))
    return model, data


def write_pngs(run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in ("confusion_matrix.png", "training_curves.png"):
        fig = plt.figure(figsize=(1, 1))
        fig.savefig(run_dir / name)
        plt.close(fig)


def test_event_files_hold_step_and_epoch_scalars_images_and_hparams(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run_dir = tmp_path / "job"
    run_dir.mkdir()
    tracker = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    train(tracker, 1, 4, 0.5)
    train(tracker, 2, 4, 0.7)
    write_pngs(run_dir)
    model, data = tiny_model_and_data()
    tracker.finish(model, data, CLASSES, INPUT)

    acc = read_events(run_dir)
    tags = acc.Tags()
    for tag in ("step/train_loss", "step/images_per_second", "step/lr/group0", "step/lr/group1", "epoch/val_accuracy"):
        assert tag in tags["scalars"], tag
    for tag in ("epoch/train_loss", "epoch/val_loss", "epoch/best_val_accuracy", "epoch/lr/group1", "epoch/epoch"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("step/train_loss")] == list(range(1, 9))
    assert [(e.step, e.value) for e in acc.Scalars("epoch/epoch")] == [(4, 1.0), (8, 2.0)]
    assert set(tags["images"]) == {"eval/confusion_matrix", "eval/training_curves", "eval/sample_predictions"}
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hparams and "_hparams_/session_start_info" in hparams
    assert b"hyperparameters.batchSize" in hparams["_hparams_/session_start_info"]


def test_resume_purges_what_the_crashed_attempt_logged_after_the_checkpoint(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    first = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    train(first, 1, 4, 0.5)
    train(first, 2, 4, 0.6)  # logged, but its checkpoint was never written
    train(first, 3, 2, 0.6, finish_epoch=False)  # the crash, mid-epoch 3
    first.writer.close()

    second = Tracker(cfg, resumed_epoch=1, on_warning=pytest.fail)
    assert second.global_step == 4
    train(second, 2, 4, 0.8)
    train(second, 3, 4, 0.9)
    second.writer.close()

    acc = read_events(tmp_path / "job")
    # Each step once, with the second attempt's values past the checkpoint.
    assert [(e.step, e.value) for e in acc.Scalars("step/train_loss")] == [(s, 0.5) for s in range(1, 5)] + [
        (s, pytest.approx(0.8 if s <= 8 else 0.9)) for s in range(5, 13)
    ]
    assert [(e.step, e.value) for e in acc.Scalars("epoch/epoch")] == [(4, 1.0), (8, 2.0), (12, 3.0)]
    assert [round(e.value, 2) for e in acc.Scalars("epoch/val_accuracy")] == [0.5, 0.8, 0.9]


def test_mlflow_file_store_receives_params_metrics_artifacts_and_a_resume_continues_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path / 'mlruns'}"
    cfg = config(tmp_path / "runs", mlflow={"trackingUri": store, "experimentName": "digits", "runName": "try-1"})
    run_dir = tmp_path / "runs" / "job"
    run_dir.mkdir(parents=True)
    first = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    train(first, 1, 3, 0.5)
    second = Tracker(cfg, resumed_epoch=1, on_warning=pytest.fail)  # a relaunch after epoch 1
    assert second.mlflow is not None and first.mlflow is not None
    assert second.mlflow.run_id == first.mlflow.run_id
    train(second, 2, 3, 0.7)
    (run_dir / "model.pt").write_bytes(b"weights")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    write_pngs(run_dir)
    model, data = tiny_model_and_data()
    second.finish(model, data, CLASSES, INPUT)

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("digits")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "try-1" and run.info.status == "FINISHED"
    assert run.data.params["hyperparameters.epochs"] == "3"
    assert run.data.params["model.name"] == "resnet18"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [(1, 0.5), (2, 0.7)]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "metrics.jsonl", "confusion_matrix.png", TB_DIR} <= names
    assert client.list_artifacts(run.info.run_id, TB_DIR)[0].path.startswith(f"{TB_DIR}/events.out.tfevents.")
    assert first.mlflow.run_id in (run_dir / STATE_FILE).read_text()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_mlflow_server_is_one_warning_and_tensorboard_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = config(tmp_path, mlflow={"trackingUri": f"http://127.0.0.1:{closed_port()}", "experimentName": "x"})
    (tmp_path / "job").mkdir()
    warnings: list[str] = []
    tracker = Tracker(cfg, resumed_epoch=0, on_warning=warnings.append)
    train(tracker, 1, 2, 0.5)
    train(tracker, 2, 2, 0.6)
    model, data = tiny_model_and_data()
    tracker.finish(model, data, CLASSES, INPUT)

    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"MLflow at {cfg.spec.tracking.mlflow.tracking_uri} failed (start run: ")  # type: ignore[union-attr]
    assert warnings[0].endswith("training goes on without MLflow tracking")
    assert len(read_events(tmp_path / "job").Scalars("epoch/val_accuracy")) == 2


def test_tensorboard_off_writes_no_events(tmp_path: Path) -> None:
    raw = config(tmp_path).spec.model_dump(by_alias=True, mode="json")
    raw["tracking"] = {"tensorboard": {"enabled": False}}
    cfg = TrainerConfig(job_name="job", spec=FineTuneJobSpec.model_validate(raw), output_root=str(tmp_path))
    tracker = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    train(tracker, 1, 2, 0.5)
    assert tracker.writer is None
    assert not (tmp_path / "job" / TB_DIR).exists()


def test_hparams_are_the_spec_flattened_without_runtime_or_tracking(tmp_path: Path) -> None:
    params = hparams_of(config(tmp_path, mlflow={"trackingUri": "http://m", "experimentName": "x"}))
    assert params["hyperparameters.epochs"] == 3
    assert params["dataset.classes"] == "[0, 1, 2]"
    assert not [k for k in params if k.startswith(("runtime.", "tracking.", "runPolicy."))]


def test_a_remote_run_directory_receives_the_event_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """s3:// output: events written locally and uploaded under <run dir>/tensorboard/ (a real S3 API on localhost)."""
    with s3_server("models") as server:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        s3 = server.client
        s3.put_object(Bucket="models", Key="runs/job/model.json", Body=b"{}")
        store = f"file://{tmp_path / 'mlruns'}"
        raw = config(tmp_path, mlflow={"trackingUri": store, "experimentName": "s3"}).spec.model_dump(by_alias=True, mode="json")
        raw["output"]["uri"] = "s3://models/runs"
        cfg = TrainerConfig(job_name="job", spec=FineTuneJobSpec.model_validate(raw), output_root="s3://models/runs")
        tracker = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
        train(tracker, 1, 3, 0.5)
        model, data = tiny_model_and_data()
        tracker.finish(model, data, CLASSES, INPUT)

        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="models", Prefix="runs/job/")["Contents"]]
        events = [k for k in keys if k.startswith(f"runs/job/{TB_DIR}/events.out.tfevents.")]
        assert len(events) == 1 and f"runs/job/{STATE_FILE}" in keys
        local = tmp_path / "downloaded"
        local.mkdir()
        s3.download_file("models", events[0], str(local / events[0].rsplit("/", 1)[1]))
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(local), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        assert [e.step for e in acc.Scalars("step/train_loss")] == [1, 2, 3]
        assert "eval/sample_predictions" in acc.Tags()["images"]
        # MLflow gets the object store's files and the event files too.
        from mlflow.tracking import MlflowClient

        assert tracker.mlflow is not None and tracker.mlflow.run_id is not None
        logged = {a.path for a in MlflowClient(tracking_uri=store).list_artifacts(tracker.mlflow.run_id)}
        assert {"model.json", STATE_FILE, TB_DIR} <= logged


def test_a_failed_run_ends_its_mlflow_run_failed_with_its_events_flushed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path / 'mlruns'}"
    tracker = Tracker(config(tmp_path / "runs", mlflow={"trackingUri": store, "experimentName": "x"}), 0, pytest.fail)
    train(tracker, 1, 2, 0.5)
    tracker.fail()

    assert tracker.mlflow is not None and tracker.mlflow.run_id is not None
    assert MlflowClient(tracking_uri=store).get_run(tracker.mlflow.run_id).info.status == "FAILED"
    assert [e.step for e in read_events(tmp_path / "runs" / "job").Scalars("step/train_loss")] == [1, 2]


def test_an_mlflow_epoch_whose_checkpoint_was_never_written_is_not_logged_twice_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow cannot purge: epoch 2 of the crashed attempt (logged before its checkpoint) and epoch 2 of the
    relaunch were two val_accuracy points at step 2. Its metrics go only once the checkpoint is stored."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path / 'mlruns'}"
    cfg = config(tmp_path / "runs", mlflow={"trackingUri": store, "experimentName": "digits"})
    (tmp_path / "runs" / "job").mkdir(parents=True)
    first = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    train(first, 1, 3, 0.5)
    train(first, 2, 3, 0.6, checkpoint=False)  # the attempt dies before epoch 2's checkpoint is stored
    second = Tracker(cfg, resumed_epoch=1, on_warning=pytest.fail)
    train(second, 2, 3, 0.7)
    assert second.mlflow is not None and second.mlflow.run_id is not None
    history = MlflowClient(tracking_uri=store).get_metric_history(second.mlflow.run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.7)]


def test_a_class_name_with_dollar_signs_still_gets_its_sample_predictions(tmp_path: Path) -> None:
    """Class names are the tenant's folder names; matplotlib parsed '$\\frac$' as mathtext and raised, which cost the
    sample predictions, a status warning and (``_tb_failed``) a writer dropped without being closed."""
    cfg = config(tmp_path)
    run_dir = tmp_path / "job"
    run_dir.mkdir()
    warnings: list[str] = []
    tracker = Tracker(cfg, resumed_epoch=0, on_warning=warnings.append)
    train(tracker, 1, 2, 0.5)
    write_pngs(run_dir)
    model, data = tiny_model_and_data()
    tracker.finish(model, data, ["$\\frac$", *CLASSES[1:]], INPUT)
    assert warnings == []
    assert "eval/sample_predictions" in read_events(run_dir).Tags()["images"]


def test_a_failed_writer_is_closed_when_tensorboard_goes_quiet(tmp_path: Path) -> None:
    """A TensorBoard failure drops the writer; it is closed first (its event file and flush thread)."""
    (tmp_path / "job").mkdir()
    warnings: list[str] = []
    tracker = Tracker(config(tmp_path), resumed_epoch=0, on_warning=warnings.append)
    writer = tracker.writer
    assert writer is not None

    def broken(_: Any) -> None:
        raise RuntimeError("disk full")

    tracker._tb("step", broken)
    assert tracker.writer is None and len(warnings) == 1
    assert writer.all_writers is None  # SummaryWriter.close() ran


def remote_storage(monkeypatch: pytest.MonkeyPatch, uploads: list[str] | None = None) -> None:
    """Make Tracker treat local run dirs as remote (its uploads are then local copies, recorded in ``uploads``)."""
    import types

    import finetune_trainer.tracking as tracking
    from finetune_trainer import storage

    proxy = types.SimpleNamespace(**{k: getattr(storage, k) for k in dir(storage) if not k.startswith("__")})
    proxy.is_remote = lambda uri: True

    def upload_file(src: Any, uri: str, **kwargs: Any) -> None:
        if uploads is not None:
            uploads.append(Path(uri).name)
        storage.upload_file(src, uri, **kwargs)

    proxy.upload_file = upload_file
    monkeypatch.setattr(tracking, "storage", proxy)


def test_a_remote_run_dir_relaunched_before_its_first_checkpoint_logs_no_step_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch 1's events are uploaded before its checkpoint; a relaunch from epoch 0 did not look for remote event
    files, so its writer opened without purge_step: steps 1-4 and epoch 1 twice (and the hparams again)."""
    import time

    remote_storage(monkeypatch)
    cfg = config(tmp_path)
    (tmp_path / "job").mkdir()
    first = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    train(first, 1, 4, 0.5, checkpoint=False)  # uploaded at the epoch's end; the checkpoint upload then dies
    time.sleep(1.1)  # event file names carry the second
    second = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    train(second, 1, 4, 0.7)
    second.finish(*tiny_model_and_data(), CLASSES, INPUT)
    acc = read_events(tmp_path / "job")
    assert [e.step for e in acc.Scalars("step/train_loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("epoch/val_accuracy")] == [4]


def test_a_remote_event_file_is_uploaded_again_only_when_it_grew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each upload sent every event file whole, changed or not; now an unchanged one is skipped."""
    uploads: list[str] = []
    remote_storage(monkeypatch, uploads)
    (tmp_path / "job").mkdir()
    tracker = Tracker(config(tmp_path), resumed_epoch=0, on_warning=pytest.fail)
    train(tracker, 1, 2, 0.5)
    assert len(uploads) == 1
    tracker._upload()  # nothing written since
    assert len(uploads) == 1
    train(tracker, 2, 2, 0.6)
    assert len(uploads) == 2


@pytest.mark.parametrize(
    "uri",
    ["https://mlflow.example.com/?token=s3cr3t", "https://mlflow.example.com/api?access_token=s3cr3t#x", "http://m/#s3cr3t"],
)
def test_an_mlflow_uri_with_a_query_or_fragment_is_refused_without_echoing_it(uri: str) -> None:
    """Only user:password@ was refused; a token in the query string was accepted, stored in the spec (readable by
    finetune-view) and echoed into status.warnings when the server failed."""
    from pydantic import ValidationError

    from finetune_operator.api.tracking import MlflowSpec

    with pytest.raises(ValidationError) as caught:
        MlflowSpec.model_validate({"trackingUri": uri, "experimentName": "x"})
    (error,) = caught.value.errors()
    assert "query string or fragment" in error["msg"] and "s3cr3t" not in error["msg"]


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://u:p@mlflow.example.com:5000/a/b?t=1#f", "https://mlflow.example.com:5000/a/b"),
        ("file:///tmp/mlruns", "file:///tmp/mlruns"),
        ("http://m", "http://m"),
    ],
)
def test_uris_are_shown_as_scheme_host_port_path(uri: str, shown: str) -> None:
    from finetune_operator.api.tracking import shown_uri

    assert shown_uri(uri) == shown


def test_a_failed_mlflow_upload_is_one_warning_and_the_rest_still_go_under_the_longer_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads shared the 10 s metrics timeout (a large model timed out), and the first failed one silenced the sink:
    the other files were skipped and the run never ended (left RUNNING)."""
    from mlflow.tracking import MlflowClient

    from finetune_operator.api.tracking import MlflowSpec
    from finetune_trainer.mlflow_sink import ARTIFACT_TIMEOUT_ENV, MlflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv(ARTIFACT_TIMEOUT_ENV, "900")
    store = f"file://{tmp_path / 'mlruns'}"
    warnings: list[str] = []
    sink = MlflowSink(MlflowSpec(tracking_uri=store, experiment_name="x"), "job", warnings.append)
    assert sink.start(None, {}) is not None
    timeouts: list[str | None] = []
    real = sink._client.log_artifact

    def log_artifact(run_id: str, path: str, artifact_path: str | None = None) -> None:
        import os

        timeouts.append(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT"))
        real(run_id, path, artifact_path)

    monkeypatch.setattr(sink._client, "log_artifact", log_artifact)
    (tmp_path / "model.pt").write_bytes(b"weights")
    sink.log_artifacts([tmp_path / "gone.pt", tmp_path / "model.pt"])
    sink.end()

    assert timeouts == ["900", "900"]
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"  # the metrics calls' bound again
    assert len(warnings) == 1 and "gone.pt" in warnings[0] and "model.pt" not in warnings[0]
    client = MlflowClient(tracking_uri=store)
    assert [a.path for a in client.list_artifacts(sink.run_id)] == ["model.pt"]
    assert client.get_run(sink.run_id).info.status == "FINISHED"


def test_training_accuracy_is_a_step_and_an_epoch_scalar(tmp_path: Path) -> None:
    """Issue 13 item 1: accuracies per step too, not only the loss."""
    (tmp_path / "job").mkdir()
    tracker = Tracker(config(tmp_path), resumed_epoch=0, on_warning=pytest.fail)
    tracker.step(1, loss=1.0, lrs=[0.1], images_per_second=5.0, accuracy=0.25)
    tracker.epoch(record(1, 0.5), 1, best=0.5, lrs=[0.1], train_accuracy=0.4)
    tracker.finish(*tiny_model_and_data(), CLASSES, INPUT)
    acc = read_events(tmp_path / "job")
    assert [(e.step, e.value) for e in acc.Scalars("step/train_accuracy")] == [(1, 0.25)]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("epoch/train_accuracy")] == [(1, 0.4)]
