"""One-machine end-to-end: a FineTuneJob on the API emulator → our Kopf operator → a RayJob → the KubeRay
stand-in runs its entrypoint (the real trainer, on a local Ray node) → the trainer patches progress,
metrics and artifacts into the FineTuneJob, the operator mirrors the RayJob into phase and conditions.

Everything between ``kubectl apply`` and ``kubectl wait --for=condition=Succeeded`` is real code over real
HTTP except KubeRay and the pods (tests/support/kuberay_standin.py says what it does and does not do);
the real-cluster tier (tests/e2e) covers those.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

# Registers the operator's Kopf handlers in Kopf's default registry, which KopfRunner runs: without it this module
# passed only in a session where another test module had imported them first.
import finetune_operator.handlers  # noqa: F401
from finetune_operator import naming
from finetune_operator.k8s import Kube
from finetune_operator.settings import OperatorSettings
from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import KubeEmulator
from tests.support.kuberay_standin import KubeRayStandIn
from tests.support.schemas import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]

NAMESPACE = "ml"
NAME = "digits-e2e"
# Ray start-up (~6 s), process start to first step (~15-20 s), two short epochs, export: about a minute on
# two shared cores. The limit is for a wedged run, not a performance bound.
FINISH_TIMEOUT = 300.0


def digits_job() -> dict[str, Any]:
    """The shipped CPU example, made small: one worker with both cores, two epochs, output on a claim."""
    body: dict[str, Any] = copy.deepcopy(yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text()))
    body["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    spec = body["spec"]
    # 20 training images a class: what is tested is the path from apply to artifacts, not what 1,348 images teach.
    spec["dataset"].update({"imageSize": 32, "augmentation": "none", "maxPerClass": 20})
    spec["hyperparameters"].update({"epochs": 2, "seed": 0})
    # A data worker too (idle on the map-style digits): training must still find its node through the custom Ray
    # resource only the training group offers (resources.dataWorkers), which the stand-in's Ray node offers as well.
    data = {"replicas": 1, "cpusPerWorker": 1, "memoryPerWorker": "1Gi"}
    spec["resources"] = {"workers": 1, "cpusPerWorker": 2, "memoryPerWorker": "2Gi", "dataWorkers": data}
    spec["output"] = {"uri": "pvc://runs/e2e"}
    return body


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with KubeEmulator(namespaces=("default", NAMESPACE)) as emulator:
        yield emulator
        assert emulator.internal_errors == []


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == type_)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Outcome:
    status: dict[str, Any]
    rayjob: dict[str, Any]
    standin: KubeRayStandIn


def run_to_the_end(emu: KubeEmulator, tmp_path: Path, body: dict[str, Any], phase: str, events: set[str]) -> Outcome:
    """Operator and stand-in up, ``body`` applied, until the job is Succeeded or Failed: it must be ``phase``,
    and ``events`` must have been posted."""
    # Throttle 0: the trainer patches its status after every epoch, so each report is seen on the job.
    settings = OperatorSettings(metrics_port=0, webhook_port=0, status_throttle_seconds=0)
    memo = kopf.Memo(settings=settings, kube=Kube(emu.kubernetes_client()))
    name, rayjob_name = body["metadata"]["name"], naming.rayjob_name(body["metadata"]["name"])
    with (
        KopfRunner(emu, memo=memo) as operator,
        KubeRayStandIn(emu, tmp_path / "kuberay", pvc_root=tmp_path / "pvc") as kuberay,
    ):
        emu.create(body)

        def finished() -> dict[str, Any] | None:
            kuberay.check()
            status = emu.get("finetunejobs", NAMESPACE, name).get("status") or {}
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        try:
            status = operator.wait_for(finished, FINISH_TIMEOUT, message=f"{name} finished")
        except TimeoutError:
            pytest.fail(f"{name} did not finish; trainer output:\n{kuberay.output(NAMESPACE, rayjob_name)[-5000:]}")
        output = kuberay.output(NAMESPACE, rayjob_name)
        assert status["phase"] == phase, f"{status.get('message')}\ntrainer output:\n{output[-5000:]}"
        # Kopf posts Events from a queue of its own, a moment after the status patch that announced them.
        operator.wait_for(lambda: events <= {e["reason"] for e in emu.list("events", NAMESPACE)}, message=f"events {events}")
        return Outcome(status, emu.get("rayjobs", NAMESPACE, rayjob_name), kuberay)


def test_digits_job_trains_end_to_end(emu: KubeEmulator, tmp_path: Path) -> None:
    rayjob_name = naming.rayjob_name(NAME)
    done = run_to_the_end(emu, tmp_path, digits_job(), "Succeeded", {"RayJobCreated", "PhaseRunning", "PhaseSucceeded"})
    status, rayjob, kuberay = done.status, done.rayjob, done.standin

    # The operator's half: phase and conditions mirrored from the RayJob that KubeRay completed.
    assert condition(status, "Succeeded")["status"] == "True"
    assert condition(status, "Failed")["status"] == "False"
    assert condition(status, "Validated")["status"] == "True"
    assert (rayjob["status"]["jobDeploymentStatus"], rayjob["status"]["jobStatus"]) == ("Complete", "SUCCEEDED")
    assert status["rayJobName"] == rayjob_name
    assert status["rayClusterName"] == rayjob["status"]["rayClusterName"]
    assert status["startTime"] and status["completionTime"] and status["attempts"] == 1
    # Ray token authentication was on (the stand-in gave the node and the driver a token, as KubeRay does), and
    # the trainer, driver and Ray Train workers alike, ran behind it without knowing.
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert kuberay.ray_auth_modes(NAMESPACE, rayjob_name) == ["token"]
    assert [g["groupName"] for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]] == ["workers", "data"]

    # The trainer's half: progress to the end, metrics, and artifacts that are on the claim as stated.
    assert status["progress"]["percent"] == 100.0 and status["progress"]["stage"] == "done"
    assert status["progress"]["epoch"] == status["progress"]["totalEpochs"] == 2
    accuracy = status["metrics"]["valAccuracy"]
    assert 0.0 <= accuracy <= 1.0
    artifacts = status["artifacts"]
    # pvc://runs/e2e + the namespace + the job name, on the claim's directory
    run_dir = tmp_path / "pvc" / "runs" / "e2e" / NAMESPACE / NAME
    model = Path(artifacts["modelUri"])
    assert model == run_dir / "model.pt" and model.is_file()
    assert artifacts["sha256"] == sha256(model)
    assert kuberay.pod_path(NAMESPACE, rayjob_name, str(model)) == f"/mnt/finetune/runs/e2e/{NAMESPACE}/{NAME}/model.pt"
    card = json.loads(Path(artifacts["modelCardUri"]).read_text())
    assert card["files"]["model.pt"]["sha256"] == artifacts["sha256"]
    assert card["job"] == {
        "name": NAME,
        "namespace": NAMESPACE,
        "uid": emu.get("finetunejobs", NAMESPACE, NAME)["metadata"]["uid"],
    }
    # The accuracy on the job is the one the trainer recorded for its last epoch.
    assert card["metrics"]["final"]["valAccuracy"] == pytest.approx(accuracy)
    assert len(artifacts["classNames"]) == 10


def test_a_failing_trainer_fails_the_job_with_its_message(emu: KubeEmulator, tmp_path: Path) -> None:
    """The trainer exits 2 on a user error; KubeRay's AppFailed and Ray's message reach the job's conditions."""
    body = digits_job()
    body["spec"]["model"] = {"name": "resnet18", "weightsUri": "/nonexistent/resnet18.pt"}  # absolute: admitted
    done = run_to_the_end(emu, tmp_path, body, "Failed", {"PhaseFailed"})
    status, rayjob = done.status, done.rayjob
    assert (rayjob["status"]["jobDeploymentStatus"], rayjob["status"]["reason"]) == ("Failed", "AppFailed")
    failed = condition(status, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "AppFailed")
    # The trainer's one-line error, not KubeRay's copy of the whole log tail.
    assert "error: " in failed["message"] and "/nonexistent/resnet18.pt: no such file" in failed["message"]
    assert "\n" not in failed["message"] and "Traceback" not in failed["message"]
    assert condition(status, "Succeeded")["status"] == "False"
    assert "artifacts" not in status
