"""Suspend and resume of a job queued in Kueue, against the emulator over HTTP with a Kueue stand-in.

The stand-in does what Kueue's job reconciler does for a RayJob carrying its queue label (kueue
pkg/controller/jobframework/reconciler.go): it makes one Workload per RayJob, admits it at once while it is
active, un-suspends a suspended RayJob whose Workload is admitted ("Job admitted, unsuspending"), and suspends
the RayJob of a deactivated Workload. Against that rule, a suspend written only onto the RayJob is undone;
deactivating the Workload is what holds.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import finetune_operator.handlers  # noqa: F401  (importing it registers the operator's handlers with Kopf)
from finetune_operator import naming
from tests.integration.test_operator import job, kuberay, settle, start_operator, stop_operator, wait_phase
from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import WORKLOADS, KubeEmulator

pytestmark = pytest.mark.timeout(60)


class KueueStandIn:
    """Kueue's rule for RayJobs with a queue label, applied every 20 ms in a thread (see the module docstring)."""

    def __init__(self, emu: KubeEmulator) -> None:
        self.emu, self.stop, self.unsuspended = emu, threading.Event(), 0
        self.thread = threading.Thread(target=self._run, name="kueue-stand-in", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            for rayjob in self.emu.list("rayjobs", "default", label_selector="kueue.x-k8s.io/queue-name"):
                self._reconcile(rayjob)

    def _reconcile(self, rayjob: dict[str, Any]) -> None:
        meta = rayjob["metadata"]
        found = self.emu.list(WORKLOADS, "default", label_selector=f"kueue.x-k8s.io/job-uid={meta['uid']}")
        if not found:
            owner = {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": meta["name"], "uid": meta["uid"], "controller": True}
            labels = {"kueue.x-k8s.io/job-uid": meta["uid"]}
            wl_meta = {"name": f"rayjob-{meta['name']}", "labels": labels, "ownerReferences": [owner]}
            self.emu.create({"apiVersion": WORKLOADS.api_version, "kind": "Workload", "metadata": wl_meta, "spec": {}})
            return
        active = (found[0].get("spec") or {}).get("active") is not False
        suspended = bool(rayjob["spec"].get("suspend"))
        if active and suspended:  # admitted at once: "Job admitted, unsuspending"
            self.emu.patch("rayjobs", "default", meta["name"], {"spec": {"suspend": False}})
            self.unsuspended += 1
        elif not active and not suspended:  # evicted (InactiveWorkload): Kueue stops the job
            self.emu.patch("rayjobs", "default", meta["name"], {"spec": {"suspend": True}})


@pytest.fixture
def kueue(emu: KubeEmulator) -> Iterator[KueueStandIn]:
    emu.add_resource(WORKLOADS)
    stand_in = KueueStandIn(emu)
    stand_in.thread.start()
    try:
        yield stand_in
    finally:
        stand_in.stop.set()
        stand_in.thread.join(5)


@pytest.fixture
def operator(emu: KubeEmulator, kueue: KueueStandIn) -> Iterator[KopfRunner]:
    runner = start_operator(emu)
    try:
        yield runner
    finally:
        stop_operator(emu, runner)


def test_suspend_of_an_admitted_queued_job_holds_and_resume_goes_back_through_kueue(
    emu: KubeEmulator, kueue: KueueStandIn, operator: KopfRunner
) -> None:
    emu.create(job("queued", runtime={"queueName": "team-queue"}))
    name = naming.rayjob_name("queued")
    operator.wait_for(lambda: emu.list(WORKLOADS, "default"), message="Kueue's Workload")
    kuberay(emu, name, jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_phase(operator, emu, "queued", "Running")

    emu.patch("finetunejobs", "default", "queued", {"spec": {"runPolicy": {"suspend": True}}})
    workload = operator.wait_for(
        lambda: next((w for w in emu.list(WORKLOADS, "default") if w["spec"].get("active") is False), None),
        message="Workload deactivated",
    )
    settle(emu)  # Kueue had every chance to undo a suspend written onto the RayJob alone
    assert emu.get("rayjobs", "default", name)["spec"]["suspend"] is True
    kuberay(emu, name, jobDeploymentStatus="Suspended", jobStatus="")
    wait_phase(operator, emu, "queued", "Suspended")

    emu.patch("finetunejobs", "default", "queued", {"spec": {"runPolicy": {"suspend": False}}})
    operator.wait_for(
        lambda: emu.get(WORKLOADS, "default", workload["metadata"]["name"])["spec"].get("active") is True,
        message="Workload reactivated",
    )
    operator.wait_for(lambda: emu.get("rayjobs", "default", name)["spec"]["suspend"] is False, message="Kueue re-admits")
    kuberay(emu, name, jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_phase(operator, emu, "queued", "Running")
    assert len(emu.list(WORKLOADS, "default")) == 1 and len(emu.list("rayjobs", "default")) == 1
