"""Stuck jobs say why, over HTTP: the operator's own resync thread (Kopf in a thread, the API emulator) reads a stuck
Ray cluster's pods and Warning Events and writes the reason into the job's ``ClusterReady`` condition.

KubeRay is played by the tests (RayJob status, the RayCluster's pods, its Warning Events); the resync period is
shortened so that a round comes within the test. The rules themselves are tabled in tests/unit/test_diagnosis.py
and tests/unit/test_reconcile_stuck.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import finetune_operator.handlers  # noqa: F401  (importing it registers the operator's handlers with Kopf)
from finetune_operator import handlers, naming
from tests.integration.test_operator import condition, job, kuberay, start_operator, status_of, stop_operator, wait_phase
from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import KubeEmulator

pytestmark = pytest.mark.timeout(60)

NS = "default"
NO_GPU = (
    "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found."
)


@pytest.fixture
def operator(emu: KubeEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[KopfRunner]:
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 0.3)  # the thread reads it every round
    runner = start_operator(emu)
    try:
        yield runner
    finally:
        stop_operator(emu, runner)


def stuck_cluster(emu: KubeEmulator, runner: KopfRunner, name: str) -> str:
    """A job whose RayJob KubeRay reports Initializing, with a named RayCluster; the cluster's name."""
    emu.create(job(name))
    wait_phase(runner, emu, name, "Provisioning")
    runner.wait_for(lambda: "rayJobName" in status_of(emu, name))
    cluster = f"{naming.rayjob_name(name)}-raycluster-x7k2p"
    kuberay(emu, naming.rayjob_name(name), jobDeploymentStatus="Initializing", rayClusterName=cluster)
    return cluster


def pending_pod(cluster: str, reason: str, message: str) -> dict[str, Any]:
    labels = {"ray.io/cluster": cluster, "ray.io/node-type": "worker"}
    scheduled = {"type": "PodScheduled", "status": "False", "reason": reason, "message": message}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{cluster}-gpu-worker-q8zzt", "namespace": NS, "labels": labels},
        "spec": {"containers": [{"name": "ray-worker", "image": "trainer:1"}]},
        "status": {"phase": "Pending", "conditions": [scheduled]},
    }


def cluster_ready_is(emu: KubeEmulator, name: str, reason: str) -> dict[str, Any] | None:
    """The job's ClusterReady condition once its reason is ``reason``, else None (for ``wait_for``)."""
    found = [c for c in status_of(emu, name).get("conditions") or [] if c["type"] == "ClusterReady"]
    return found[0] if found and found[0]["reason"] == reason else None


def warnings(emu: KubeEmulator, reason: str) -> list[dict[str, Any]]:
    return [e for e in emu.list("events", NS, field_selector=f"reason={reason}") if e.get("type") == "Warning"]


def test_an_unschedulable_gpu_pod_is_said_after_a_resync_round(emu: KubeEmulator, operator: KopfRunner) -> None:
    cluster = stuck_cluster(emu, operator, "gpu")
    emu.create(pending_pod(cluster, "Unschedulable", NO_GPU), keep_status=True)
    # A pod of another cluster, stuck too, is none of this job's business.
    emu.create(
        {
            **pending_pod("other", "Unschedulable", "not ours"),
            "metadata": {"name": "x", "namespace": NS, "labels": {"ray.io/cluster": "other"}},
        },
        keep_status=True,
    )
    ready = operator.wait_for(lambda: cluster_ready_is(emu, "gpu", "Unschedulable"), message="ClusterReady Unschedulable")
    assert ready["status"] == "False"
    assert ready["message"] == f"pod {cluster}-gpu-worker-q8zzt cannot be scheduled: {NO_GPU}"
    assert status_of(emu, "gpu")["phase"] == "Provisioning" and status_of(emu, "gpu")["message"] == ready["message"]
    posted = operator.wait_for(lambda: warnings(emu, "Unschedulable"), message="a Warning Event")
    assert posted[0]["involvedObject"]["name"] == "gpu" and "Insufficient nvidia.com/gpu" in posted[0]["message"]
    lists = emu.request_counts("pods").get("list", 0)
    operator.wait_for(lambda: emu.request_counts("pods").get("list", 0) >= lists + 2, message="two more rounds")
    assert len(warnings(emu, "Unschedulable")) == 1  # once per reason, not once per round

    # The cluster comes up: the condition turns True and the operator stops reading pods.
    kuberay(emu, naming.rayjob_name("gpu"), jobDeploymentStatus="Running", jobStatus="RUNNING")
    status = wait_phase(operator, emu, "gpu", "Running")
    assert (condition(status, "ClusterReady")["status"], condition(status, "ClusterReady")["reason"]) == ("True", "JobRunning")
    lists = emu.request_counts("pods").get("list", 0)
    time.sleep(1.0)  # three rounds or so
    assert emu.request_counts("pods").get("list", 0) <= lists + 1  # at most the round already under way


def test_a_refused_read_changes_nothing_and_breaks_nothing(
    emu: KubeEmulator, operator: KopfRunner, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator upgraded without its new RBAC: 403 on the pod and Event LISTs; the job is mirrored as before."""
    forbidden = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "Forbidden",
        "code": 403,
        "message": "pods is forbidden",
    }
    emu.kmock[f"get /api/v1/namespaces/{NS}/pods"] << 403 << forbidden
    emu.kmock[f"get /api/v1/namespaces/{NS}/events"] << 403 << forbidden
    cluster = stuck_cluster(emu, operator, "old-rbac")
    emu.create(pending_pod(cluster, "Unschedulable", NO_GPU), keep_status=True)
    ready = operator.wait_for(lambda: cluster_ready_is(emu, "old-rbac", "ClusterStarting"), message="ClusterStarting")
    assert ready["status"] == "False"
    rounds = emu.request_counts("finetunejobs").get("list", 0)
    operator.wait_for(lambda: emu.request_counts("finetunejobs").get("list", 0) >= rounds + 2, message="two more rounds")
    assert condition(status_of(emu, "old-rbac"), "ClusterReady")["reason"] == "ClusterStarting"
    refusals = [r.getMessage() for r in caplog.records if "may not list" in r.getMessage()]
    assert [m.split(" to say")[0] for m in refusals] == [
        f"the operator may not list pods in {NS} (grant `list` on pods in its RBAC, as the chart does)",
        f"the operator may not list events in {NS} (grant `list` on events in its RBAC, as the chart does)",
    ]  # once each, however many rounds
    kuberay(emu, naming.rayjob_name("old-rbac"), jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_phase(operator, emu, "old-rbac", "Running")
