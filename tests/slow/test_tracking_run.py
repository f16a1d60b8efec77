"""`finetune run` with experiment tracking (issue 13): TensorBoard's own reader parses the run's event files
back (step and epoch scalars, images, hyperparameters), an MLflow file store holds the run's params,
metrics and artifacts, and in-epoch progress reaches the status sinks before the epoch ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

JOB = """
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: tracked}
spec:
  model: {name: resnet18}
  dataset: {format: digits, classes: [0, 1, 2], maxPerClass: 12, imageSize: 32, augmentation: none, loaderWorkers: 0}
  strategy: {method: full}
  hyperparameters: {epochs: 2, batchSize: 4}
  resources: {workers: 1, cpusPerWorker: 1}
  output: {uri: runs}
  tracking:
    tensorboard: {logEverySteps: 2}
    mlflow: {trackingUri: "file://MLRUNS", experimentName: digits}
"""


def test_finetune_run_writes_tensorboard_events_and_an_mlflow_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = tmp_path / "mlruns"
    (tmp_path / "job.yaml").write_text(JOB.replace("MLRUNS", str(store)))
    # Every in-epoch report goes out (throttle 0), so the console shows them; MLflow 3 needs the file store allowed.
    env = {**os.environ, "FINETUNE_STATUS_THROTTLE_SECONDS": "0", "MLFLOW_ALLOW_FILE_STORE": "true"}
    # This checkout's packages, whatever the (relative) PYTHONPATH the tests were started with.
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "operator"), str(root / "trainer"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "run", "job.yaml", "--json-status", "status.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
    )
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-4000:]
    assert "warning:" not in logs, logs[-4000:]

    # In-epoch progress reached the sinks mid-epoch: the console's step lines (no tty here).
    assert "epoch 1/2 step 1/" in logs, logs[-4000:]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["phase"] == "Succeeded" and status["progress"]["percent"] == 100.0

    run_dir = tmp_path / "runs" / "tracked"
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    wanted = ("step/train_loss", "step/train_accuracy", "step/lr/group0", "step/images_per_second", "epoch/val_accuracy")
    for tag in (*wanted, "epoch/train_loss", "epoch/train_accuracy"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert [e.value for e in acc.Scalars("epoch/epoch")] == [1.0, 2.0]
    steps = [e.step for e in acc.Scalars("step/train_loss")]
    assert steps == sorted(set(steps)) and steps[0] == 2
    assert {"eval/confusion_matrix", "eval/sample_predictions"} <= set(tags["images"])
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file://{store}")
    experiment = client.get_experiment_by_name("digits")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["hyperparameters.batchSize"] == "4"
    # Logged once each epoch's checkpoint was stored (Tracker.committed), the training accuracy with them.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_accuracy")] == [1, 2]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "model.json", "metrics.jsonl", "confusion_matrix.png", "tensorboard"} <= names
