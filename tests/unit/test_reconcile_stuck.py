"""Stuck jobs say why: the resync round reads a stuck job's pods and Warning Events (``stuck.StuckReader``) and the
reconcile rules write the diagnosis, against the in-memory API (tests/unit/test_reconcile.py's style).

Each test states one rule: what is read and when (only for a cluster being created, one LIST each), what the job's
status and Events say, that nothing flaps or moves a running or finished job, and that refused reads degrade.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import pytest

from finetune_operator import naming
from finetune_operator.failures import ApiFailure
from finetune_operator.reconcile import Reconciler
from tests.support.fake_kube import Events, FakeKube

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
CLUSTER = "job-raycluster-x7k2p"
NO_GPU = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
QUOTA = 'Failed to create head Pod team/x, pods "x" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1'


def started(kube: FakeKube, rec: Reconciler, **rayjob_status: Any) -> dict[str, Any]:
    """A job with its children, its RayJob's status set as KubeRay would; the RayJob as stored."""
    body = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job", "namespace": "team", "uid": "uid-1", "generation": 1},
        "spec": {"model": {"name": "resnet18"}, "dataset": {"format": "digits"}, "output": {"uri": "s3://b/runs"}},
    }
    rec.reconcile(kube.put(body))
    return kube.patch_status("RayJob", "team", naming.rayjob_name("job"), rayjob_status)


def unschedulable_worker(message: str = NO_GPU) -> dict[str, Any]:
    labels = {"ray.io/cluster": CLUSTER, "ray.io/node-type": "worker"}
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    return {
        "kind": "Pod",
        "metadata": {"name": f"{CLUSTER}-worker-a", "namespace": "team", "labels": labels},
        "status": {"phase": "Pending", "conditions": [condition]},
    }


def quota_event(rayjob: dict[str, Any]) -> dict[str, Any]:
    about = {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": rayjob["metadata"]["name"], "uid": rayjob["metadata"]["uid"]}
    meta = {"name": "ev-1", "namespace": "team"}
    return {
        "kind": "Event",
        "metadata": meta,
        "involvedObject": about,
        "type": "Warning",
        "reason": "FailedToCreateRayCluster",
        "message": QUOTA,
    }


def resync(kube: FakeKube, rec: Reconciler) -> None:
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]


def status(kube: FakeKube) -> dict[str, Any]:
    stored = kube.get("FineTuneJob", "team", "job")
    assert stored is not None
    return dict(stored.get("status") or {})


def cluster_ready(kube: FakeKube) -> tuple[str, str, str]:
    found = next(c for c in status(kube)["conditions"] if c["type"] == "ClusterReady")
    return found["status"], found["reason"], found["message"]


def lists(kube: FakeKube) -> list[tuple[str, str]]:
    return [(kind, where) for verb, kind, where in kube.calls if verb == "list" and kind in ("Pod", "Event")]


# ------------------------------------------------------------------------------------------------ rules
def test_a_stuck_job_says_why_after_one_resync_round(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    started(kube, rec, jobDeploymentStatus="Initializing", rayClusterName=CLUSTER)
    kube.put(unschedulable_worker())
    kube.calls.clear()
    events.clear()
    resync(kube, rec)
    assert cluster_ready(kube) == ("False", "Unschedulable", f"pod {CLUSTER}-worker-a cannot be scheduled: {NO_GPU}")
    assert (status(kube)["phase"], status(kube)["message"]) == ("Provisioning", cluster_ready(kube)[2])
    assert events == [("Warning", "Unschedulable", cluster_ready(kube)[2])]
    # one labelled pod LIST, one Event LIST about the RayJob and one about its RayCluster
    assert lists(kube) == [("Pod", "team"), ("Event", "team"), ("Event", "team")]


def test_the_same_reason_posts_no_second_event_and_a_new_one_does(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    rayjob = started(kube, rec, jobDeploymentStatus="Initializing", rayClusterName=CLUSTER)
    kube.put(unschedulable_worker())
    resync(kube, rec)
    kube.put(unschedulable_worker("0/5 nodes are available: 5 Insufficient nvidia.com/gpu."))  # the autoscaler added a node
    resync(kube, rec)
    assert "0/5 nodes" in cluster_ready(kube)[2]
    # KubeRay recreates the cluster and the quota refuses it: with no pod left, the refusal speaks.
    kube.put(quota_event(rayjob))
    del kube.objects[("Pod", "team", f"{CLUSTER}-worker-a")]
    resync(kube, rec)
    assert cluster_ready(kube)[1] == "QuotaExceeded"
    assert [reason for type_, reason, _ in events if type_ == "Warning"] == ["Unschedulable", "QuotaExceeded"]


def test_a_rayjob_event_keeps_the_diagnosis_and_reads_nothing(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    started(kube, rec, jobDeploymentStatus="Initializing", rayClusterName=CLUSTER)
    kube.put(unschedulable_worker())
    resync(kube, rec)
    diagnosed = cluster_ready(kube)
    kube.calls.clear()
    rayjob = kube.patch_status("RayJob", "team", naming.rayjob_name("job"), {"rayClusterStatus": {"state": ""}})
    rec.rayjob_changed("MODIFIED", rayjob)
    assert cluster_ready(kube) == diagnosed  # no flapping back to "KubeRay is creating the Ray cluster"
    assert lists(kube) == []


def test_nothing_wrong_found_restores_kuberays_words(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    started(kube, rec, jobDeploymentStatus="Initializing", rayClusterName=CLUSTER)
    kube.put(unschedulable_worker())
    resync(kube, rec)
    del kube.objects[("Pod", "team", f"{CLUSTER}-worker-a")]
    resync(kube, rec)
    assert cluster_ready(kube)[:2] == ("False", "ClusterStarting")


@pytest.mark.parametrize(
    "rayjob_status",
    [
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": CLUSTER},
        {"jobDeploymentStatus": "Running", "jobStatus": "PENDING", "rayClusterName": CLUSTER},
        {"jobDeploymentStatus": "Waiting", "rayClusterName": CLUSTER},
        {"jobDeploymentStatus": ""},
        {"jobDeploymentStatus": "Suspended", "rayClusterName": CLUSTER},
    ],
    ids=["running", "job-pending", "waiting", "not-picked-up", "queued"],
)
def test_jobs_whose_cluster_is_not_being_created_cost_no_read(
    kube: FakeKube, rec: Reconciler, rayjob_status: dict[str, Any]
) -> None:
    started(kube, rec, **rayjob_status)
    kube.put(unschedulable_worker())  # whatever the pods say
    kube.calls.clear()
    resync(kube, rec)
    assert lists(kube) == []
    assert cluster_ready(kube)[1] != "Unschedulable"


def test_a_running_job_keeps_its_condition_whatever_its_pods_say(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    started(kube, rec, jobDeploymentStatus="Initializing", rayClusterName=CLUSTER)
    kube.put(unschedulable_worker())
    resync(kube, rec)
    kube.patch_status("RayJob", "team", naming.rayjob_name("job"), {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    for _ in range(2):
        resync(kube, rec)
        assert (status(kube)["phase"], cluster_ready(kube)[:2]) == ("Running", ("True", "JobRunning"))


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_job_is_never_diagnosed(kube: FakeKube, rec: Reconciler, phase: str) -> None:
    started(kube, rec, jobDeploymentStatus="Initializing", rayClusterName=CLUSTER)
    kube.put(unschedulable_worker())
    stored = kube.get("FineTuneJob", "team", "job")
    assert stored is not None
    kube.put({**stored, "status": {**stored["status"], "phase": phase}})
    kube.calls.clear()
    resync(kube, rec)
    assert kube.calls == [] and status(kube)["phase"] == phase


def test_refused_reads_degrade_and_are_logged_once(
    kube: FakeKube, events: Events, rec: Reconciler, caplog: pytest.LogCaptureFixture
) -> None:
    rayjob = started(kube, rec, jobDeploymentStatus="Initializing", rayClusterName=CLUSTER)
    kube.put(unschedulable_worker())
    kube.put(quota_event(rayjob))
    kube.faults[("list", "Pod")] = ApiFailure(
        "list Pod team/*", 403, "HTTP 403 Forbidden: pods is forbidden", kind="Pod", verb="list"
    )
    kube.faults[("list", "Event")] = ApiFailure("list Event team/*", 403, "HTTP 403 Forbidden", kind="Event", verb="list")
    with caplog.at_level(logging.WARNING, logger="finetune_operator"):
        for _ in range(3):
            assert rec.resync_all(("team",)) == 0  # no failure counted, no crash
    # KubeRay's own words, as without the reads.
    assert cluster_ready(kube) == ("False", "ClusterStarting", "KubeRay is creating the Ray cluster")
    assert status(kube)["phase"] == "Provisioning" and "Unschedulable" not in events.reasons
    refusals = [r.getMessage() for r in caplog.records if "may not list" in r.getMessage()]
    assert len(refusals) == 2 and "pods in team" in refusals[0] and "events in team" in refusals[1]
    assert lists(kube) == [("Pod", "team"), ("Event", "team")] * 3  # one try each per round, no storm
    del kube.faults[("list", "Pod")]  # pods readable again, Events still not: the pods alone speak
    rec.resync_all(("team",))
    assert cluster_ready(kube)[1] == "Unschedulable"


def test_a_throttled_read_ends_the_round(kube: FakeKube, rec: Reconciler) -> None:
    started(kube, rec, jobDeploymentStatus="Initializing", rayClusterName=CLUSTER)
    kube.faults[("list", "Event")] = ApiFailure("list Event team/*", 429, "HTTP 429", kind="Event", verb="list")
    assert rec.resync_all(("team",)) == 1


def test_a_cluster_not_yet_named_costs_only_the_event_read(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    rayjob = started(kube, rec, jobDeploymentStatus="Initializing")
    kube.put(quota_event(rayjob))
    kube.calls.clear()
    resync(kube, rec)
    assert lists(kube) == [("Event", "team")]
    assert cluster_ready(kube)[1] == "QuotaExceeded"
    assert "exceeded quota: gpu-quota" in status(kube)["message"]


def test_warning_events_are_listed_per_object_not_the_whole_namespace(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    """Each Event LIST names the RayJob (with its uid) or its RayCluster: other jobs' Warnings are never read."""
    rayjob = started(kube, rec, jobDeploymentStatus="Initializing", rayClusterName=CLUSTER)
    kube.put(quota_event(rayjob))
    for i in range(5):  # a busy namespace: other objects' Warning Events
        about = {"apiVersion": "v1", "kind": "Pod", "name": f"other-{i}", "uid": f"u{i}"}
        kube.put({"kind": "Event", "metadata": {"name": f"other-{i}", "namespace": "team"}, "involvedObject": about,
                  "type": "Warning", "reason": "BackOff", "message": "restarting"})  # fmt: skip
    kube.calls.clear()
    resync(kube, rec)
    name, uid = rayjob["metadata"]["name"], rayjob["metadata"]["uid"]
    assert kube.event_selectors == [
        f"type=Warning,involvedObject.kind=RayJob,involvedObject.name={name},involvedObject.uid={uid}",
        f"type=Warning,involvedObject.kind=RayCluster,involvedObject.name={CLUSTER}",
    ]
    assert lists(kube) == [("Pod", "team"), ("Event", "team"), ("Event", "team")]  # two small LISTs, per stuck job
    assert cluster_ready(kube)[1] == "QuotaExceeded"
