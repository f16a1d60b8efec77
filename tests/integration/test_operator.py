"""The operator (finetune_operator.handlers, Kopf in a thread) against the Kubernetes API emulator over HTTP.

KubeRay is played by the tests: they patch RayJob status the way KubeRay's controller does. What no
emulator proves (admission, RBAC, real garbage collection timing) is left to the e2e tier.
"""

from __future__ import annotations

import copy
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

import finetune_operator.handlers  # noqa: F401  (importing it registers the operator's handlers with Kopf)
from finetune_operator import metrics, naming
from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import Artifacts, Metrics, Progress
from finetune_operator.api.validate import validate_spec
from finetune_operator.k8s import Kube
from finetune_operator.reconcile import Reconciler
from finetune_trainer.status_reporter import KubernetesStatusSink
from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import WORKLOADS, KubeEmulator, wait_for
from tests.support.operator_threads import SETTINGS, settle, start_operator, stop_operator
from tests.support.schemas import REPO

pytestmark = pytest.mark.timeout(60)

EXAMPLE = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
CHILD_KINDS = (
    ("serviceaccounts", "trainer"),
    ("roles", "trainer-status"),
    ("rolebindings", "trainer-status"),
    ("configmaps", "trainer-config"),
    ("networkpolicies", "ray-ingress"),
)


def job(name: str, namespace: str = "default", **spec_changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = copy.deepcopy(EXAMPLE)
    body["metadata"] = {"name": name, "namespace": namespace}
    for key, value in spec_changes.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value}
    return body


def status_of(emu: KubeEmulator, name: str, namespace: str = "default") -> dict[str, Any]:
    found = emu.find("finetunejobs", namespace, name)
    return dict((found or {}).get("status") or {})


def wait_phase(runner: KopfRunner, emu: KubeEmulator, name: str, phase: str, timeout: float = 10.0) -> dict[str, Any]:
    return runner.wait_for(
        lambda: status_of(emu, name) if status_of(emu, name).get("phase") == phase else None,
        message=f"{name} {phase}",
        timeout=timeout,
    )


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def events(emu: KubeEmulator, reason: str) -> list[dict[str, Any]]:
    return emu.list("events", "default", field_selector=f"reason={reason}")


def kuberay(emu: KubeEmulator, rayjob: str, **status: Any) -> None:
    """What KubeRay's controller does: merge-patch the RayJob's status subresource."""
    emu.patch_status("rayjobs", "default", rayjob, status)


# --------------------------------------------------------------------------------------------- tests
def test_create_makes_owned_children_and_reports_provisioning(emu: KubeEmulator, operator: KopfRunner) -> None:
    created = emu.create(job("digits"))
    uid = created["metadata"]["uid"]
    name = naming.rayjob_name("digits")
    rayjob = operator.wait_for(lambda: emu.find("rayjobs", "default", name), message="RayJob")
    owner = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": "digits",
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert rayjob["metadata"]["ownerReferences"] == [owner]
    assert rayjob["metadata"]["labels"]["finetune.dev/job-uid"] == uid
    for plural, suffix in CHILD_KINDS:
        child = emu.get(plural, "default", f"digits-{suffix}")
        assert child["metadata"]["ownerReferences"] == [owner], plural
    # The RayJob watch may report Provisioning first; the create handler adds rayJobName right after.
    status = operator.wait_for(lambda: status_of(emu, "digits") if "rayJobName" in status_of(emu, "digits") else None)
    assert status["phase"] == "Provisioning" and status["rayJobName"] == name and status["observedGeneration"] == 1
    assert condition(status, "Validated")["status"] == "True"
    stored = emu.get("finetunejobs", "default", "digits")
    assert not stored["metadata"].get("finalizers")  # deleting a job never waits for the operator
    assert all(key.startswith("finetune.dev/") for key in stored["metadata"].get("annotations", {}))
    assert "kopf" not in stored["status"]
    operator.wait_for(lambda: events(emu, "RayJobCreated"), message="RayJobCreated event")
    assert emu.request_counts("rayjobs")["create"] == 1


def test_rayjob_status_flows_into_the_job(emu: KubeEmulator, operator: KopfRunner) -> None:
    emu.create(job("flow"))
    name = naming.rayjob_name("flow")
    operator.wait_for(lambda: emu.find("rayjobs", "default", name))
    kuberay(
        emu,
        name,
        jobDeploymentStatus="Initializing",
        jobStatus="",
        rayClusterName=f"{name}-abcde",
        startTime="2026-01-01T00:00:00Z",
    )
    status = operator.wait_for(lambda: status_of(emu, "flow") if status_of(emu, "flow").get("rayClusterName") else None)
    assert status["phase"] == "Provisioning"
    kuberay(emu, name, jobDeploymentStatus="Running", jobStatus="RUNNING", dashboardURL="head-svc:8265", failed=0, succeeded=0)
    status = wait_phase(operator, emu, "flow", "Running")
    assert condition(status, "Training")["status"] == "True" and condition(status, "ClusterReady")["status"] == "True"
    assert (status["dashboardURL"], status["attempts"]) == ("head-svc:8265", 1) and status["startTime"]
    kuberay(emu, name, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED", endTime="2026-01-01T01:00:00Z", succeeded=1)
    status = wait_phase(operator, emu, "flow", "Succeeded")
    assert condition(status, "Succeeded")["status"] == "True" and status["completionTime"] == "2026-01-01T01:00:00Z"
    operator.wait_for(lambda: events(emu, "PhaseRunning") and events(emu, "PhaseSucceeded"), message="phase events")


def test_failed_with_running_job_status_is_failed(emu: KubeEmulator, operator: KopfRunner) -> None:
    emu.create(job("deadline"))
    name = naming.rayjob_name("deadline")
    operator.wait_for(lambda: emu.find("rayjobs", "default", name))
    kuberay(emu, name, jobDeploymentStatus="Failed", jobStatus="RUNNING", reason="DeadlineExceeded", message="deadline")
    status = wait_phase(operator, emu, "deadline", "Failed")
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    operator.wait_for(lambda: [e for e in events(emu, "PhaseFailed") if e["type"] == "Warning"])


def test_invalid_spec_fails_with_the_validate_message_and_no_rayjob(emu: KubeEmulator, operator: KopfRunner) -> None:
    bad = job("bad", model={"name": "resnet5"})
    emu.create(bad)
    emu.create(job("good"))
    status = wait_phase(operator, emu, "bad", "Failed")
    _spec, lines = validate_spec(bad["spec"])
    validated = condition(status, "Validated")
    assert (validated["status"], validated["reason"], validated["message"]) == ("False", "InvalidSpec", "; ".join(lines))
    assert lines[0].startswith("spec.model.name: 'resnet5'")
    warning = operator.wait_for(lambda: events(emu, "InvalidSpec"))
    assert warning[0]["type"] == "Warning" and warning[0]["involvedObject"]["name"] == "bad"
    wait_phase(operator, emu, "good", "Provisioning")
    assert emu.find("rayjobs", "default", naming.rayjob_name("bad")) is None
    assert emu.find("configmaps", "default", "bad-trainer-config") is None
    assert emu.find("rayjobs", "default", naming.rayjob_name("good")) is not None


def test_operator_limits_refuse_oversized_jobs(emu: KubeEmulator, operator: KopfRunner) -> None:
    emu.create(job("huge", resources={"workers": 128}, hyperparameters={"batchSize": 128}))
    status = wait_phase(operator, emu, "huge", "Failed")
    assert "FINETUNE_OPERATOR_MAX_WORKERS" in condition(status, "Validated")["message"]


def test_suspend_and_resume_toggle_the_rayjob(emu: KubeEmulator, operator: KopfRunner) -> None:
    emu.create(job("pause"))
    name = naming.rayjob_name("pause")
    operator.wait_for(lambda: emu.find("rayjobs", "default", name))
    kuberay(emu, name, jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_phase(operator, emu, "pause", "Running")

    emu.patch("finetunejobs", "default", "pause", {"spec": {"runPolicy": {"suspend": True}}})
    operator.wait_for(lambda: emu.get("rayjobs", "default", name)["spec"]["suspend"] is True, message="RayJob suspended")
    kuberay(emu, name, jobDeploymentStatus="Suspended", jobStatus="", rayClusterName="", dashboardURL="")
    status = wait_phase(operator, emu, "pause", "Suspended")
    assert condition(status, "Suspended")["status"] == "True" and "dashboardURL" not in status

    emu.patch("finetunejobs", "default", "pause", {"spec": {"runPolicy": {"suspend": False}}})
    operator.wait_for(lambda: emu.get("rayjobs", "default", name)["spec"]["suspend"] is False, message="RayJob resumed")
    kuberay(emu, name, jobDeploymentStatus="Running", jobStatus="RUNNING")
    status = wait_phase(operator, emu, "pause", "Running")
    assert condition(status, "Suspended")["status"] == "False"
    assert len(emu.list("rayjobs", "default")) == 1


def test_delete_removes_every_child(emu: KubeEmulator, operator: KopfRunner) -> None:
    emu.create(job("gone"))
    emu.create(job("stays"))
    name = naming.rayjob_name("gone")
    wait_phase(operator, emu, "gone", "Provisioning")
    wait_phase(operator, emu, "stays", "Provisioning")
    emu.delete("finetunejobs", "default", "gone")
    operator.wait_for(lambda: emu.find("finetunejobs", "default", "gone") is None, message="job deleted (finalizer released)")
    assert emu.find("rayjobs", "default", name) is None
    for plural, _suffix in CHILD_KINDS:
        assert emu.list(plural, "default", label_selector="finetune.dev/job=gone") == [], plural
    assert emu.find("rayjobs", "default", naming.rayjob_name("stays")) is not None


def test_rayjob_deleted_under_a_live_job_is_recreated(emu: KubeEmulator, operator: KopfRunner) -> None:
    emu.create(job("phoenix"))
    name = naming.rayjob_name("phoenix")
    first = operator.wait_for(lambda: emu.find("rayjobs", "default", name))
    kuberay(emu, name, jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_phase(operator, emu, "phoenix", "Running")
    emu.delete("rayjobs", "default", name)
    second = operator.wait_for(
        lambda: (r := emu.find("rayjobs", "default", name)) and r["metadata"]["uid"] != first["metadata"]["uid"] and r
    )
    assert second["metadata"]["ownerReferences"] == first["metadata"]["ownerReferences"]
    operator.wait_for(lambda: events(emu, "RayJobRecreated"), message="RayJobRecreated event")
    wait_phase(operator, emu, "phoenix", "Provisioning")


def test_finished_job_does_not_resurrect_its_rayjob(emu: KubeEmulator, operator: KopfRunner) -> None:
    emu.create(job("done"))
    name = naming.rayjob_name("done")
    operator.wait_for(lambda: emu.find("rayjobs", "default", name))
    kuberay(emu, name, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    wait_phase(operator, emu, "done", "Succeeded")
    creates = emu.request_counts("rayjobs")["create"]
    emu.delete("rayjobs", "default", name)
    emu.create(job("marker"))  # a later event the operator handles after the deletion
    operator.wait_for(lambda: emu.find("rayjobs", "default", naming.rayjob_name("marker")))
    assert emu.find("rayjobs", "default", name) is None
    assert emu.request_counts("rayjobs")["create"] == creates + 1
    assert status_of(emu, "done")["phase"] == "Succeeded"


def test_restart_mid_job_converges_without_a_duplicate(emu: KubeEmulator) -> None:
    runner = start_operator(emu)
    try:
        emu.create(job("restart"))
        name = naming.rayjob_name("restart")
        runner.wait_for(lambda: emu.find("rayjobs", "default", name))
        wait_phase(runner, emu, "restart", "Provisioning")
    finally:
        stop_operator(emu, runner)
    # While the operator is down, KubeRay moves on.
    kuberay(emu, name, jobDeploymentStatus="Running", jobStatus="RUNNING", rayClusterName=f"{name}-x")
    runner = start_operator(emu)
    try:
        status = wait_phase(runner, emu, "restart", "Running")
        assert status["rayClusterName"] == f"{name}-x"
        assert [r["metadata"]["name"] for r in emu.list("rayjobs", "default")] == [name]
        assert emu.request_counts("rayjobs")["create"] == 1  # on resume one GET finds it: no POST at all
        assert emu.request_counts("configmaps")["create"] == 1
        assert len(emu.list("configmaps", "default", label_selector="finetune.dev/job=restart")) == 1
    finally:
        stop_operator(emu, runner)


def test_trainer_reporter_and_operator_share_the_status(emu: KubeEmulator, operator: KopfRunner, tmp_path: Path) -> None:
    emu.create(job("shared"))
    name = naming.rayjob_name("shared")
    operator.wait_for(lambda: emu.find("rayjobs", "default", name))
    kuberay(emu, name, jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_phase(operator, emu, "shared", "Running")
    cm = emu.get("configmaps", "default", "shared-trainer-config")
    config = TrainerConfig.model_validate_json(cm["data"]["trainer.json"])  # what the entrypoint reads
    sink = KubernetesStatusSink(config, api_client=emu.kubernetes_client(), throttle_seconds=0)
    sink.update(Progress(epoch=3, total_epochs=4, percent=75, stage="fine-tune"), Metrics(val_accuracy=0.9))
    sink.finish(Artifacts(model_uri="runs/shared/model.pt", sha256="0" * 64))
    kuberay(emu, name, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    status = wait_phase(operator, emu, "shared", "Succeeded")
    assert status["metrics"] == {"valAccuracy": 0.9}
    assert status["artifacts"]["modelUri"] == "runs/shared/model.pt"
    assert status["progress"]["stage"] == "done"
    assert 'finetune_operator_jobs{phase="Succeeded"}' in metrics.exposition()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_entrypoint_runs_with_kubeconfig_liveness_and_metrics(emu: KubeEmulator, tmp_path: Path) -> None:
    """``python -m finetune_operator.handlers`` as the chart runs it: settings from env, credentials from KUBECONFIG."""
    metrics_port, liveness_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(emu.write_kubeconfig(tmp_path / "kubeconfig")),
        "FINETUNE_OPERATOR_METRICS_PORT": str(metrics_port),
        "FINETUNE_OPERATOR_NAMESPACES": "default",
        "FINETUNE_OPERATOR_TRAINER_IMAGE": "registry.local/trainer:e2e",
        "FINETUNE_OPERATOR_WEBHOOK_PORT": "0",  # no ValidatingWebhookConfiguration here; test_webhook.py serves it
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)
    cmd = [sys.executable, "-m", "finetune_operator.handlers", f"--liveness=http://127.0.0.1:{liveness_port}/healthz"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        emu.create(job("cli"))
        rayjob = emu.wait_for_object("rayjobs", "default", naming.rayjob_name("cli"), timeout=30)
        images = {c["image"] for c in rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]}
        assert images == {"registry.local/trainer:e2e"}
        health = wait_for(lambda: _get(f"http://127.0.0.1:{liveness_port}/healthz"), timeout=10)
        assert health == "ok\n"  # nothing more to anyone: Kopf's own endpoint answered the job count

        # /metrics is HTTPS to tokens the API server (here the emulator) authenticates and allows: not to anyone.
        emu.add_token("scraper-token", "system:serviceaccount:monitoring:prometheus")
        emu.allow("system:serviceaccount:monitoring:prometheus", "/metrics")
        emu.add_token("tenant-token", "system:serviceaccount:team-a:default")
        url = f"https://127.0.0.1:{metrics_port}/metrics"
        assert wait_for(lambda: _status(url, None) == 401 or None, timeout=10)
        assert _status(url, "tenant-token") == 403

        def scraped() -> str | None:
            text = _get(url, "scraper-token")
            # The RayJob's first event may report Provisioning before the create handler returns: wait for both.
            reconciled = 'finetune_operator_handler_duration_seconds_count{handler="reconcile"} 1.0'
            return text if text and 'finetune_operator_jobs{phase="Provisioning"} 1.0' in text and reconciled in text else None

        wait_for(scraped, timeout=10)  # fails with a TimeoutError naming the condition
    finally:
        settle(emu)
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode in (0, -15), output


def _get(url: str, token: str | None = None) -> str | None:
    try:
        with urllib.request.urlopen(_request(url, token), timeout=2, context=_NO_VERIFY) as response:
            return str(response.read().decode())
    except OSError:
        return None


def _status(url: str, token: str | None) -> int | None:
    try:
        with urllib.request.urlopen(_request(url, token), timeout=2, context=_NO_VERIFY) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


def _request(url: str, token: str | None) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})


# The operator's /metrics certificate is its own (a ServiceMonitor skips verifying it): what is checked is the token.
_NO_VERIFY = ssl.create_default_context()
_NO_VERIFY.check_hostname, _NO_VERIFY.verify_mode = False, ssl.CERT_NONE


def test_resync_timer_heals_missed_events(emu: KubeEmulator) -> None:
    """The timer's body (it fires every minute; called directly here): mirror a missed change, recreate a lost RayJob."""
    runner = start_operator(emu)
    try:
        emu.create(job("healed"))
        name = naming.rayjob_name("healed")
        runner.wait_for(lambda: "rayJobName" in status_of(emu, "healed"))
    finally:
        stop_operator(emu, runner)
    reconciler = Reconciler(Kube(emu.kubernetes_client()), SETTINGS)

    def resync() -> None:  # one round of the operator's resync thread (it runs every minute)
        assert reconciler.resync_all(("default",)) == 0

    kuberay(emu, name, jobDeploymentStatus="Running", jobStatus="RUNNING")  # nobody watching
    resync()
    assert status_of(emu, "healed")["phase"] == "Running"
    uid = emu.get("rayjobs", "default", name)["metadata"]["uid"]
    emu.delete("rayjobs", "default", name)
    resync()
    assert emu.get("rayjobs", "default", name)["metadata"]["uid"] != uid
    assert status_of(emu, "healed")["phase"] == "Provisioning"
    kuberay(emu, name, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    resync()
    resync()  # terminal: nothing more to do
    assert status_of(emu, "healed")["phase"] == "Succeeded"


def test_kueue_holds_a_queued_job_and_the_operator_lets_it(emu: KubeEmulator) -> None:
    runner = start_operator(emu)
    name = naming.rayjob_name("queued")
    try:
        emu.create(job("queued", runtime={"queueName": "team-queue"}))
        rayjob = runner.wait_for(lambda: emu.find("rayjobs", "default", name))
        assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
        # Kueue suspends the RayJob until its Workload (pending, active) is admitted; KubeRay reports it Suspended.
        emu.add_resource(WORKLOADS)
        owner = {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": name, "uid": rayjob["metadata"]["uid"]}
        meta = {"name": f"rayjob-{name}", "labels": {"kueue.x-k8s.io/job-uid": owner["uid"]}, "ownerReferences": [owner]}
        emu.create({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload", "metadata": meta, "spec": {}})
        emu.patch("rayjobs", "default", name, {"spec": {"suspend": True}})
        kuberay(emu, name, jobDeploymentStatus="Suspended")
        status = wait_phase(runner, emu, "queued", "Pending")
        assert condition(status, "Suspended")["status"] == "False" and status["message"].startswith(
            "the RayJob is suspended by its queue"
        )
    finally:
        stop_operator(emu, runner)
    runner = start_operator(emu)  # a restart must not un-suspend it
    try:
        settle(emu)
        assert emu.get("rayjobs", "default", name)["spec"]["suspend"] is True
        assert status_of(emu, "queued")["phase"] == "Pending"
    finally:
        stop_operator(emu, runner)
