"""Fault injection: the operator against the API emulator over HTTP when the API misbehaves or others interfere.

Each test injects a fault (an HTTP error on a create or patch, a dropped watch, a foreign object, a copied
RayJob, an operator stopped half-way) and asserts the end state: exactly one RayJob per job, children owned
by the job, a phase and a condition that say what happened, and no request storm. The unit tier tables the
same rules against an in-memory API (tests/unit/test_reconcile.py); this tier proves the HTTP conversation
and Kopf's part (retries, watches, restarts).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kmock
import pytest

from finetune_operator import naming
from tests.integration.test_operator import condition, job, kuberay, status_of, wait_phase
from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import KubeEmulator, wait_for
from tests.support.operator_threads import settle, start_operator, stop_operator

pytestmark = pytest.mark.timeout(120)

NS = "default"
CHILDREN = ("serviceaccounts", "roles", "rolebindings", "configmaps", "networkpolicies", "rayjobs")
URLS = {
    "serviceaccounts": f"/api/v1/namespaces/{NS}/serviceaccounts",
    "configmaps": f"/api/v1/namespaces/{NS}/configmaps",
    "roles": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles",
    "rolebindings": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings",
    "networkpolicies": f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies",
    "rayjobs": f"/apis/ray.io/v1/namespaces/{NS}/rayjobs",
}


def status_error(code: int, reason: str, message: str) -> dict[str, Any]:
    """A Kubernetes Status body, as the API server sends with an error."""
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}


def fail_creates(emu: KubeEmulator, plural: str, code: int, message: str, times: int | None = None, **headers: str) -> None:
    """Every (or the first ``times``) POST of ``plural`` answers ``code`` with a Status body."""
    view = emu.kmock[f"post {URLS[plural]}"]
    if times is not None:
        view = view[:times]
    reaction = view << code << status_error(code, "Injected", message)
    if headers:
        reaction << kmock.headers(headers)


def creates(emu: KubeEmulator, plural: str) -> int:
    return int(emu.request_counts(plural).get("create", 0))


def children_owned_by(emu: KubeEmulator, uid: str) -> dict[str, int]:
    """How many objects of each child kind the job with ``uid`` controls."""
    counts = {}
    for plural in CHILDREN:
        owned = [
            o
            for o in emu.list(plural, NS)
            if any(r.get("uid") == uid and r.get("controller") for r in o["metadata"].get("ownerReferences") or [])
        ]
        counts[plural] = len(owned)
    return counts


def requests_during(emu: KubeEmulator, seconds: float) -> int:
    """API requests (watches excluded) in the next ``seconds``: a healthy or stuck operator stays quiet."""
    before = sum(emu.request_counts().values()) - emu.request_counts().get("watch", 0)
    time.sleep(seconds)
    return sum(emu.request_counts().values()) - emu.request_counts().get("watch", 0) - before


# ------------------------------------------------------------------------------------- API errors
def test_kuberay_not_installed_is_said_and_not_hammered(emu: KubeEmulator, operator: KopfRunner) -> None:
    fail_creates(emu, "rayjobs", 404, "the server could not find the requested resource")
    emu.create(job("no-kuberay"))
    status = wait_phase(operator, emu, "no-kuberay", "Pending")
    ready = condition(status, "ClusterReady")
    assert (ready["status"], ready["reason"]) == ("False", "KubeRayNotInstalled")
    assert "install KubeRay v1.7.0" in ready["message"]
    first = creates(emu, "rayjobs")
    time.sleep(5)
    assert creates(emu, "rayjobs") == first  # backs off (30 s, then 60 s, ... up to 600 s), never a storm


def test_forbidden_by_rbac_is_said(emu: KubeEmulator, operator: KopfRunner) -> None:
    fail_creates(emu, "roles", 403, 'roles.rbac.authorization.k8s.io is forbidden: User "system:serviceaccount:x" cannot create')
    emu.create(job("no-rbac"))
    status = wait_phase(operator, emu, "no-rbac", "Pending")
    assert condition(status, "ClusterReady")["reason"] == "Forbidden"
    assert "cannot create" in condition(status, "ClusterReady")["message"]
    assert creates(emu, "rayjobs") == 0


def test_a_policy_rejection_is_said(emu: KubeEmulator, operator: KopfRunner) -> None:
    fail_creates(emu, "rayjobs", 403, 'admission webhook "validate.kyverno.svc-fail" denied the request: GPUs need approval')
    emu.create(job("policy"))
    status = wait_phase(operator, emu, "policy", "Pending")
    assert condition(status, "ClusterReady")["reason"] == "RejectedByPolicy"
    assert "GPUs need approval" in status["message"]


def test_an_invalid_child_fails_the_job_once(emu: KubeEmulator, operator: KopfRunner) -> None:
    fail_creates(emu, "configmaps", 422, 'ConfigMap "x" is invalid: data: Too long')
    emu.create(job("rejected"))
    status = wait_phase(operator, emu, "rejected", "Failed")
    failed = condition(status, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "RejectedByAPI")
    assert condition(status, "Validated")["status"] == "True"  # the spec was fine: the API refused a child
    settle(emu)
    assert creates(emu, "configmaps") == 1 and creates(emu, "rayjobs") == 0  # a permanent error is not retried
    assert requests_during(emu, 2.0) == 0


def test_server_errors_and_throttling_heal_by_themselves(emu: KubeEmulator, operator: KopfRunner) -> None:
    fail_creates(emu, "rayjobs", 429, "too many requests", times=1, **{"Retry-After": "1"})
    fail_creates(emu, "serviceaccounts", 500, "etcdserver: leader changed", times=1)
    emu.create(job("heals"))
    status = operator.wait_for(lambda: status_of(emu, "heals").get("rayJobName") and status_of(emu, "heals"), timeout=60)
    assert status["phase"] == "Provisioning"
    assert [r["metadata"]["name"] for r in emu.list("rayjobs", NS)] == [naming.rayjob_name("heals")]
    assert creates(emu, "rayjobs") == 2  # the throttled attempt and one more, not a loop


def test_a_failed_status_patch_is_retried(emu: KubeEmulator, operator: KopfRunner) -> None:
    emu.kmock[f"patch /apis/finetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/flaky/status"][:1] << 500
    emu.create(job("flaky"))
    wait_phase(operator, emu, "flaky", "Provisioning", timeout=30)  # Kopf retries after the back-off (10 s)
    assert len(emu.list("rayjobs", NS)) == 1


# ------------------------------------------------------------------------------- others interfere
def test_a_foreign_object_with_a_childs_name_fails_the_job(emu: KubeEmulator, operator: KopfRunner) -> None:
    emu.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "taken-trainer-config", "namespace": NS}})
    emu.create(job("taken"))
    status = wait_phase(operator, emu, "taken", "Failed")
    assert condition(status, "Failed")["reason"] == "ChildConflict"
    assert "ConfigMap default/taken-trainer-config" in status["message"]
    assert emu.list("rayjobs", NS) == []
    assert emu.get("configmaps", NS, "taken-trainer-config").get("data") is None  # not adopted, not overwritten


def test_delete_and_recreate_while_the_collector_lags_runs_the_new_spec(emu: KubeEmulator, operator: KopfRunner) -> None:
    old = emu.create(job("gitops"))
    wait_phase(operator, emu, "gitops", "Provisioning")
    # The collector is slow: the old ConfigMap survives its owner for a while.
    cm = emu.get("configmaps", NS, "gitops-trainer-config")
    emu.patch("configmaps", NS, "gitops-trainer-config", {"metadata": {"ownerReferences": cm["metadata"]["ownerReferences"]}})
    emu.delete("finetunejobs", NS, "gitops")
    lingering = {**cm, "metadata": {k: v for k, v in cm["metadata"].items() if k not in ("uid", "resourceVersion")}}
    operator.wait_for(lambda: emu.find("configmaps", NS, "gitops-trainer-config") is None)
    emu.create(lingering)  # as if the collector had not reached it yet
    new = emu.create(job("gitops", hyperparameters={"learningRate": 0.5}))
    time.sleep(2)  # the operator tries, finds the old job's ConfigMap, and waits for the collector
    assert 'learningRate": 0.5' not in emu.get("configmaps", NS, "gitops-trainer-config")["data"]["trainer.json"]
    emu.delete("configmaps", NS, "gitops-trainer-config")  # the collector catches up
    status = wait_phase(operator, emu, "gitops", "Provisioning", timeout=30)  # at the next retry (5 s, 10 s, ...)
    assert status["rayJobName"] == naming.rayjob_name("gitops")
    assert '"learningRate": 0.5' in emu.get("configmaps", NS, "gitops-trainer-config")["data"]["trainer.json"]
    assert children_owned_by(emu, new["metadata"]["uid"]) == dict.fromkeys(CHILDREN, 1)
    assert children_owned_by(emu, old["metadata"]["uid"]) == dict.fromkeys(CHILDREN, 0)


def test_a_copied_rayjob_cannot_fail_the_job(emu: KubeEmulator, operator: KopfRunner) -> None:
    emu.create(job("original"))
    name = naming.rayjob_name("original")
    real = operator.wait_for(lambda: emu.find("rayjobs", NS, name))
    wait_phase(operator, emu, "original", "Provisioning")
    meta = {k: v for k, v in real["metadata"].items() if k in ("labels", "ownerReferences", "namespace")}
    emu.create({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {**meta, "name": "ftj-copy"}, "spec": real["spec"]})
    kuberay(emu, "ftj-copy", jobDeploymentStatus="Failed", reason="AppFailed")
    kuberay(emu, name, jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_phase(operator, emu, "original", "Running")
    settle(emu)
    assert status_of(emu, "original")["phase"] == "Running"


def test_a_dropped_watch_loses_no_update(emu: KubeEmulator, operator: KopfRunner) -> None:
    emu.create(job("watched"))
    name = naming.rayjob_name("watched")
    wait_phase(operator, emu, "watched", "Provisioning")
    emu.store.close_watches()  # every stream ends; Kopf reconnects from its last resourceVersion
    kuberay(emu, name, jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_phase(operator, emu, "watched", "Running")


# ---------------------------------------------------------------------------- the operator stops
@pytest.mark.parametrize("stop_before", CHILDREN[1:])
def test_an_operator_stopped_between_two_children_finishes_after_a_restart(emu: KubeEmulator, stop_before: str) -> None:
    """The operator dies after creating some children: its successor creates the rest, duplicates nothing."""
    fail_creates(emu, stop_before, 503, "the API server is shutting down", times=1)
    runner = start_operator(emu)
    created = emu.create(job("halfway"))
    runner.wait_for(lambda: creates(emu, stop_before) >= 1 or None, message=f"first create of {stop_before}")
    runner.stop()  # mid-backoff: the rest of the children do not exist yet
    assert emu.list("rayjobs", NS) == []
    successor = start_operator(emu)
    try:
        # Kopf keeps the handler's back-off in the job's annotations: the successor honours what is left of it.
        status = wait_phase(successor, emu, "halfway", "Provisioning", timeout=30)
        assert status["rayJobName"] == naming.rayjob_name("halfway")
        assert children_owned_by(emu, created["metadata"]["uid"]) == dict.fromkeys(CHILDREN, 1)
    finally:
        stop_operator(emu, successor)


@pytest.mark.parametrize("kill_before", CHILDREN[1:])
def test_an_operator_process_killed_between_two_children_finishes_after_a_restart(
    emu: KubeEmulator, tmp_path: Path, kill_before: str
) -> None:
    """As above, but the operator is a real process (``python -m finetune_operator.handlers``, as the chart runs
    it) killed with SIGKILL: no clean-up, no last patch, nothing kept in memory. Its successor finishes the job."""
    fail_creates(emu, kill_before, 503, "the API server is shutting down", times=1)
    env = {
        **os.environ,
        "KUBECONFIG": str(emu.write_kubeconfig(tmp_path / "kubeconfig")),
        "FINETUNE_OPERATOR_METRICS_PORT": "0",
        "FINETUNE_OPERATOR_WEBHOOK_PORT": "0",
        "FINETUNE_OPERATOR_NAMESPACES": NS,
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)
    cmd = [sys.executable, "-m", "finetune_operator.handlers"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        created = emu.create(job("killed"))
        wait_for(lambda: creates(emu, kill_before) >= 1 or None, timeout=60)
    finally:
        proc.kill()  # SIGKILL: mid-back-off, the later children do not exist yet
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == -signal.SIGKILL, output
    assert emu.list("rayjobs", NS) == []
    successor = start_operator(emu)
    try:
        status = wait_phase(successor, emu, "killed", "Provisioning", timeout=30)
        assert status["rayJobName"] == naming.rayjob_name("killed")
        assert children_owned_by(emu, created["metadata"]["uid"]) == dict.fromkeys(CHILDREN, 1)
    finally:
        stop_operator(emu, successor)


def test_jobs_delete_at_once_while_the_operator_is_down(emu: KubeEmulator) -> None:
    """No finalizer: deleting a job (or its namespace) never waits for the operator."""
    runner = start_operator(emu)
    emu.create(job("orphaned"))
    wait_phase(runner, emu, "orphaned", "Provisioning")
    stop_operator(emu, runner)
    assert not emu.get("finetunejobs", NS, "orphaned")["metadata"].get("finalizers")
    emu.delete("finetunejobs", NS, "orphaned")
    assert emu.find("finetunejobs", NS, "orphaned") is None
    assert emu.list("rayjobs", NS) == []  # the children went with their owner


def test_a_settled_job_makes_no_requests(emu: KubeEmulator, operator: KopfRunner) -> None:
    for i in range(5):
        emu.create(job(f"quiet-{i}"))
    for i in range(5):
        wait_phase(operator, emu, f"quiet-{i}", "Provisioning")
    settle(emu)
    assert requests_during(emu, 2.0) == 0
