"""The trainer's Kubernetes sink against the API emulator over HTTP: status subresource, throttling, never fatal."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import Artifacts, FineTuneJobSpec, Metrics, Progress
from finetune_trainer.status_reporter import KubernetesStatusSink
from tests.support.kube_emulator import KubeEmulator

pytestmark = pytest.mark.timeout(60)

SPEC = FineTuneJobSpec.model_validate({"model": {"name": "resnet18"}, "dataset": {"format": "digits"}, "output": {"uri": "runs"}})


def config(name: str = "job-a", namespace: str | None = "default") -> TrainerConfig:
    return TrainerConfig(job_name=name, namespace=namespace, spec=SPEC, output_root="runs", sinks=["kubernetes"])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emulator:
        for name in ("job-a", "job-b"):
            job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}}
            emulator.create({**job, "spec": SPEC.to_wire()})
            emulator.patch_status(
                "finetunejobs", "default", name, {"phase": "Running", "conditions": [{"type": "Training", "status": "True"}]}
            )
        yield emulator
        assert emulator.internal_errors == []


def sink(emu: KubeEmulator, clock: Clock) -> KubernetesStatusSink:
    return KubernetesStatusSink(config(), api_client=emu.kubernetes_client(), throttle_seconds=10, clock=clock)


def status(emu: KubeEmulator, name: str = "job-a") -> dict[str, Any]:
    result: dict[str, Any] = emu.get("finetunejobs", "default", name)["status"]
    return result


def test_patches_progress_metrics_and_artifacts_through_the_status_subresource(emu: KubeEmulator) -> None:
    clock = Clock()
    reporter = sink(emu, clock)
    spec_before = emu.get("finetunejobs", "default", "job-a")["spec"]
    reporter.update(Progress(epoch=1, total_epochs=4, percent=25, stage="fine-tune"), Metrics(train_loss=1.5, val_accuracy=0.5))
    st = status(emu)
    assert st["progress"] == {
        "epoch": 1,
        "totalEpochs": 4,
        "percent": 25.0,
        "stage": "fine-tune",
        "updatedAt": st["progress"]["updatedAt"],
    }
    assert st["metrics"] == {"trainLoss": 1.5, "valAccuracy": 0.5}
    assert st["phase"] == "Running" and st["conditions"] == [{"type": "Training", "status": "True"}]  # the operator's fields stay

    reporter.finish(Artifacts(model_uri="runs/job-a/model.pt", sha256="ab" * 32, class_names=["0", "1"]))
    st = status(emu)
    assert st["artifacts"] == {"modelUri": "runs/job-a/model.pt", "sha256": "ab" * 32, "exports": {}, "classNames": ["0", "1"]}
    assert st["progress"]["stage"] == "done" and st["progress"]["percent"] == 100.0
    assert emu.get("finetunejobs", "default", "job-a")["spec"] == spec_before
    assert emu.request_counts("finetunejobs", subresource="status")["patch"] == 2
    assert emu.request_counts("finetunejobs")["patch"] == 0  # never the main resource
    assert "progress" not in status(emu, "job-b")  # only its own job


def test_throttles_and_always_sends_the_last_update(emu: KubeEmulator) -> None:
    clock = Clock()
    reporter = sink(emu, clock)
    for epoch in range(1, 6):
        reporter.update(Progress(epoch=epoch, total_epochs=10, stage="probe"), Metrics(val_accuracy=epoch / 10))
        clock.now += 3  # 3 s per epoch, 10 s throttle: epochs 1 and 5 go out
    assert reporter.sent == 2
    assert status(emu)["progress"]["epoch"] == 5
    reporter.update(Progress(epoch=6, total_epochs=10, stage="probe"), Metrics(val_accuracy=0.6))
    assert reporter.sent == 2 and status(emu)["progress"]["epoch"] == 5
    reporter.finish(error="boom")  # final flush ignores the throttle
    assert reporter.sent == 3
    st = status(emu)
    assert st["progress"]["epoch"] == 6 and st["metrics"]["valAccuracy"] == 0.6
    assert st["phase"] == "Running"  # the failure is the operator's to report


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_api_is_a_warning_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    import kubernetes.client

    configuration = kubernetes.client.Configuration(host=f"http://127.0.0.1:{_closed_port()}")
    configuration.retries = 0
    clock = Clock()
    reporter = KubernetesStatusSink(
        config(), api_client=kubernetes.client.ApiClient(configuration), throttle_seconds=0, clock=clock
    )
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.status_reporter"):
        reporter.update(Progress(epoch=1, total_epochs=2, stage="probe"))
        reporter.finish(Artifacts(model_uri="m"))
    assert reporter.sent == 0
    assert "could not patch FineTuneJob default/job-a status" in caplog.text


def test_recovers_when_the_api_comes_back(emu: KubeEmulator) -> None:
    emu.kmock["patch"][:1] << 503  # the first PATCH fails, later ones reach the emulation
    clock = Clock()
    reporter = sink(emu, clock)
    reporter.update(Progress(epoch=1, total_epochs=2, stage="probe"))
    assert reporter.sent == 0 and "progress" not in status(emu)
    reporter.update(Progress(epoch=2, total_epochs=2, stage="probe"))  # within the throttle: held back
    assert reporter.sent == 0
    clock.now += 10
    reporter.update(Progress(epoch=2, total_epochs=2, stage="evaluate"))
    assert reporter.sent == 1 and status(emu)["progress"]["stage"] == "evaluate"


def test_missing_job_is_not_fatal(emu: KubeEmulator) -> None:
    reporter = KubernetesStatusSink(config(name="gone"), api_client=emu.kubernetes_client(), throttle_seconds=0)
    reporter.update(Progress(epoch=1, total_epochs=2, stage="probe"))
    reporter.finish()
    assert reporter.sent == 0


def test_kubeconfig_credentials(emu: KubeEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(emu.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("FINETUNE_STATUS_THROTTLE_SECONDS", "0")
    monkeypatch.setenv("FINETUNE_JOB_NAMESPACE", "default")
    reporter = KubernetesStatusSink(config(namespace=None))
    assert reporter.throttle == 0 and reporter.namespace == "default"
    reporter.update(Progress(epoch=2, total_epochs=2, stage="evaluate"))
    assert status(emu)["progress"]["stage"] == "evaluate"


def test_no_credentials_trains_anyway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    reporter = KubernetesStatusSink(config(), throttle_seconds=0)
    reporter.update(Progress(epoch=1, total_epochs=1, stage="probe"))
    reporter.finish()
    assert reporter.sent == 0


def test_warnings_go_out_at_once_and_accumulate(emu: KubeEmulator) -> None:
    clock = Clock()
    reporter = sink(emu, clock)
    reporter.update(Progress(epoch=3, total_epochs=10, stage="probe"))
    reporter.warn("checkpoint checkpoint_epoch_0003: truncated; resumed from checkpoint checkpoint_epoch_0002 (epoch 2)")
    reporter.warn("second")  # within the throttle's 10 s: a warning is never held back
    st = status(emu)
    assert st["warnings"] == [
        "checkpoint checkpoint_epoch_0003: truncated; resumed from checkpoint checkpoint_epoch_0002 (epoch 2)",
        "second",
    ]
    assert st["phase"] == "Running" and st["conditions"] == [{"type": "Training", "status": "True"}]
    reporter.finish()
    assert len(status(emu)["warnings"]) == 2
