"""Why a Ray cluster does not come up (``finetune_operator.diagnosis``): pods and Events in, one reason and one line out.

The pods and Events are shaped as the API server returns them (camelCase JSON); the Event messages are KubeRay
v1.7's ("Failed to create head Pod ns/name, <the API's error>", raycluster_controller.go) around the API
server's own refusals (ResourceQuota, Pod Security admission, a webhook).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from finetune_operator.diagnosis import (
    EVENT_MAX_AGE,
    MESSAGE_MAX,
    NOTHING_WRONG,
    REASONS,
    diagnose,
    diagnosis_event,
    is_stuck,
    one_line,
)

CLUSTER = "job-abc12-raycluster-x7k2p"
HEAD, WORKER = f"{CLUSTER}-head", f"{CLUSTER}-gpu-worker-q8zzt"
UNSCHEDULABLE = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available: 4 No preemption victims found for incoming pod."  # noqa: E501
QUOTA = (
    f'pods "{WORKER}" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1, '
    "used: requests.nvidia.com/gpu=4, limited: requests.nvidia.com/gpu=4"
)
PSA = (
    f'pods "{HEAD}" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false '
    '(container "ray-head" must set securityContext.allowPrivilegeEscalation=false)'
)
WEBHOOK = 'admission webhook "validate.kyverno.svc-fail" denied the request: GPUs need approval'


def rayjob(
    deployment: str = "Initializing", *, cluster: str | None = CLUSTER, workers: int = 1, suspend: bool = False
) -> dict[str, Any]:
    status: dict[str, Any] = {"jobDeploymentStatus": deployment}
    if cluster:
        status["rayClusterName"] = cluster
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "job-abc12", "namespace": "team", "uid": "rj-uid"},
        "spec": {"suspend": suspend, "rayClusterSpec": {"workerGroupSpecs": [{"groupName": "gpu", "replicas": workers}]}},
        "status": status,
    }


def pod(
    name: str,
    *,
    head: bool = False,
    phase: str = "Pending",
    scheduled: tuple[str, str] | None = None,
    waiting: tuple[str, str] | None = None,
    init: bool = False,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": []}
    if scheduled is not None:
        reason, message = scheduled
        status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": reason, "message": message})
    else:
        status["conditions"].append({"type": "PodScheduled", "status": "True"})
    if waiting is not None:
        reason, message = waiting
        container = {
            "name": "ray-worker",
            "image": "registry.example/trainer:v9",
            "state": {"waiting": {"reason": reason, "message": message}},
        }
        status["initContainerStatuses" if init else "containerStatuses"] = [container]
    labels = {"ray.io/cluster": CLUSTER, "ray.io/node-type": "head" if head else "worker"}
    return {"metadata": {"name": name, "namespace": "team", "labels": labels}, "status": status}


def event(
    reason: str,
    message: str,
    *,
    kind: str = "RayCluster",
    name: str = CLUSTER,
    uid: str = "rc-uid",
    when: str = "2026-11-30T12:00:00Z",
) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{name}.1", "namespace": "team"},
        "involvedObject": {"apiVersion": "ray.io/v1", "kind": kind, "name": name, "namespace": "team", "uid": uid},
        "type": "Warning",
        "reason": reason,
        "message": message,
        "eventTime": when,
    }


RUNNING_HEAD = pod(HEAD, head=True, phase="Running")
CASES: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], str | None, str]] = [
    # (id, pods, events, rayjob, reason (None: nothing wrong), a phrase the message must hold)
    (
        "unschedulable GPU worker",
        [RUNNING_HEAD, pod(WORKER, scheduled=("Unschedulable", UNSCHEDULABLE))],
        [],
        rayjob(),
        "Unschedulable",
        f"pod {WORKER} cannot be scheduled: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
    ),
    (
        "two unschedulable workers",
        [
            RUNNING_HEAD,
            pod(WORKER, scheduled=("Unschedulable", UNSCHEDULABLE)),
            pod(WORKER + "2", scheduled=("Unschedulable", UNSCHEDULABLE)),
        ],
        [],
        rayjob(workers=2),
        "Unschedulable",
        "(and 1 more pod alike)",
    ),
    (
        "image pull back-off (the ErrImagePull family)",
        [pod(HEAD, head=True, waiting=("ImagePullBackOff", 'Back-off pulling image "registry.example/trainer:v9"'))],
        [],
        rayjob(),
        "ErrImagePull",
        f"pod {HEAD} cannot pull image 'registry.example/trainer:v9' (ImagePullBackOff): Back-off pulling image",
    ),
    (
        "image pull error in an init container",
        [RUNNING_HEAD, pod(WORKER, waiting=("ErrImagePull", "rpc error: not found"), init=True)],
        [],
        rayjob(),
        "ErrImagePull",
        "not found",
    ),
    (
        "invalid image name",
        [pod(HEAD, head=True, waiting=("InvalidImageName", "bad ref"))],
        [],
        rayjob(),
        "ErrImagePull",
        "(InvalidImageName)",
    ),
    (
        "missing secret key",
        [pod(HEAD, head=True, waiting=("CreateContainerConfigError", 'secret "s3" not found'))],
        [],
        rayjob(),
        "CreateContainerConfigError",
        "container ray-worker of pod " + HEAD + ' cannot start (CreateContainerConfigError): secret "s3" not found',
    ),
    (
        "quota refuses a worker pod",
        [RUNNING_HEAD],
        [event("FailedToCreateWorkerPod", f"Failed to create worker Pod for the cluster team/{CLUSTER}, {QUOTA}")],
        rayjob(),
        "QuotaExceeded",
        "the namespace's ResourceQuota refused the Ray worker pod: Failed to create worker Pod",
    ),
    (
        "pod security refuses the head pod",
        [],
        [event("FailedToCreateHeadPod", f"Failed to create head Pod team/{HEAD}, {PSA}")],
        rayjob(),
        "PodSecurityRejected",
        "Pod Security admission refused the Ray head pod: Failed to create head Pod team/" + HEAD + ', pods "',
    ),
    (
        "a webhook refuses the RayCluster (an Event on the RayJob)",
        [],
        [
            event(
                "FailedToCreateRayCluster",
                f"Failed to create RayCluster team/{CLUSTER}: {WEBHOOK}",
                kind="RayJob",
                name="job-abc12",
                uid="rj-uid",
            )
        ],
        rayjob(cluster=None),
        "RejectedByPolicy",
        "a cluster policy refused the RayCluster: ",
    ),
    (
        "another refusal",
        [],
        [event("FailedToCreateHeadPod", "Failed to create head Pod: etcdserver: request timed out")],
        rayjob(),
        "PodCreationFailed",
        "KubeRay could not create the Ray head pod: ",
    ),
    (
        "a refusal beats an unschedulable pod",
        [RUNNING_HEAD, pod(WORKER, scheduled=("Unschedulable", UNSCHEDULABLE))],
        [event("FailedToCreateWorkerPod", f"Failed to create worker Pod, {QUOTA}")],
        rayjob(workers=2),
        "QuotaExceeded",
        "exceeded quota: gpu-quota",
    ),
    (
        "the latest refusal speaks",
        [],
        [
            event("FailedToCreateHeadPod", f"x, {PSA}", when="2026-11-30T12:00:00Z"),
            event("FailedToCreateHeadPod", f"x, {QUOTA}", when="2026-11-30T12:05:00.000001Z"),
        ],
        rayjob(),
        "QuotaExceeded",
        "exceeded quota",
    ),
    (
        "scheduling gates",
        [pod(HEAD, head=True, scheduled=("SchedulingGated", "Scheduling is blocked due to non-empty scheduling gates"))],
        [],
        rayjob(),
        "PodsPending",
        f"pod {HEAD} is not scheduled: Scheduling is blocked due to non-empty scheduling gates",
    ),
    # ---- nothing wrong (yet), or the trouble is over
    ("no pods yet, no events", [], [], rayjob(), None, ""),
    ("pods starting", [pod(HEAD, head=True), pod(WORKER, waiting=("ContainerCreating", ""))], [], rayjob(), None, ""),
    ("head running, worker running", [RUNNING_HEAD, pod(WORKER, phase="Running")], [], rayjob(), None, ""),
    (
        "a head refusal the head pod outlived",
        [pod(HEAD, head=True)],
        [event("FailedToCreateHeadPod", f"x, {QUOTA}")],
        rayjob(),
        None,
        "",
    ),
    (
        "a worker refusal once every worker exists",
        [RUNNING_HEAD, pod(WORKER)],
        [event("FailedToCreateWorkerPod", f"x, {QUOTA}")],
        rayjob(workers=1),
        None,
        "",
    ),
    (
        "an earlier cluster's events",
        [],
        [event("FailedToCreateHeadPod", f"x, {QUOTA}", name="job-abc12-raycluster-old")],
        rayjob(),
        None,
        "",
    ),
    (
        "an earlier RayJob's events (same name, other uid)",
        [],
        [event("FailedToCreateRayCluster", WEBHOOK, kind="RayJob", name="job-abc12", uid="old-uid")],
        rayjob(cluster=None),
        None,
        "",
    ),
    (
        "events of other reasons",
        [],
        [event("FailedScheduling", UNSCHEDULABLE), event("Unhealthy", "probe failed")],
        rayjob(),
        None,
        "",
    ),
    (
        "a RayCluster refusal once its pods exist",
        [pod(HEAD, head=True)],
        [event("FailedToCreateRayCluster", WEBHOOK, kind="RayJob", name="job-abc12", uid="rj-uid")],
        rayjob(),
        None,
        "",
    ),
]


@pytest.mark.parametrize(("pods", "events", "job", "reason", "phrase"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_diagnosis(
    pods: list[dict[str, Any]], events: list[dict[str, Any]], job: dict[str, Any], reason: str | None, phrase: str
) -> None:
    found = diagnose(pods, events, job)
    if reason is None:
        assert found == NOTHING_WRONG and not found.found
        return
    assert found.reason == reason and reason in REASONS
    assert phrase in found.message
    assert "\n" not in found.message and len(found.message) <= MESSAGE_MAX


def test_a_long_multiline_api_message_becomes_one_short_line() -> None:
    long = "line one\n\tline two " + "x" * 2000
    found = diagnose([pod(HEAD, head=True, waiting=("CrashLoopBackOff", long))], [], rayjob())
    assert found.reason == "CrashLoopBackOff"
    assert len(found.message) == MESSAGE_MAX and found.message.endswith("...")
    assert "line one line two xxx" in found.message
    assert one_line("a \n b") == "a b"


@pytest.mark.parametrize(
    ("job", "stuck"),
    [
        (rayjob("Initializing"), True),
        (rayjob("Retrying"), True),
        (rayjob("Initializing", cluster=None), True),
        (rayjob(""), False),  # KubeRay has not picked it up: no cluster to look at
        (rayjob("Running"), False),
        (rayjob("Waiting"), False),
        (rayjob("Complete"), False),
        (rayjob("Failed"), False),
        (rayjob("Suspended", suspend=True), False),
        (rayjob("Initializing", suspend=True), False),  # being suspended: its pods are going
        ({"metadata": {"name": "x"}}, False),
    ],
)
def test_only_a_rayjob_whose_cluster_is_being_created_is_looked_at(job: dict[str, Any], stuck: bool) -> None:
    assert is_stuck(job) is stuck


def ready(status: str, reason: str, message: str = "m") -> dict[str, Any]:
    return {
        "conditions": [
            {"type": "Validated", "status": "True"},
            {"type": "ClusterReady", "status": status, "reason": reason, "message": message},
        ]
    }


@pytest.mark.parametrize(
    ("old", "patch", "expected"),
    [
        (ready("False", "ClusterStarting"), ready("False", "Unschedulable", "pod x"), ("Warning", "Unschedulable", "pod x")),
        ({}, ready("False", "QuotaExceeded", "q"), ("Warning", "QuotaExceeded", "q")),
        (ready("False", "Unschedulable"), ready("False", "ErrImagePull", "i"), ("Warning", "ErrImagePull", "i")),
        (ready("False", "ImagePullBackOff"), ready("False", "ErrImagePull", "i"), None),  # an earlier version's, same family
        (ready("False", "Unschedulable", "0/4 nodes"), ready("False", "Unschedulable", "0/5 nodes"), None),  # same reason
        (ready("False", "Unschedulable"), ready("False", "ClusterStarting"), None),  # cleared: no Warning
        (ready("False", "Unschedulable"), ready("True", "JobRunning"), None),
        (ready("False", "ClusterStarting"), {"phase": "Provisioning"}, None),  # the patch leaves conditions alone
        (ready("True", "JobRunning"), ready("False", "KubeRayNotInstalled"), None),  # not a diagnosis
    ],
)
def test_a_warning_event_once_per_new_reason(
    old: dict[str, Any], patch: dict[str, Any], expected: tuple[str, str, str] | None
) -> None:
    assert diagnosis_event(old, patch) == expected


def test_a_pull_flipping_between_err_image_pull_and_back_off_keeps_one_reason_and_posts_one_event() -> None:
    """The kubelet alternates ErrImagePull and ImagePullBackOff while it retries; the condition must not follow."""
    status: dict[str, Any] = ready("False", "ClusterStarting")
    reasons, posted = [], []
    for kubelet in ("ErrImagePull", "ImagePullBackOff", "ErrImagePull", "ImagePullBackOff"):
        found = diagnose([pod(HEAD, head=True, waiting=(kubelet, "pull failed"))], [], rayjob())
        reasons.append(found.reason)
        patch = ready("False", found.reason, found.message)
        if (announced := diagnosis_event(status, patch)) is not None:
            posted.append(announced[1])
        status = patch
    assert reasons == ["ErrImagePull"] * 4
    assert posted == ["ErrImagePull"]


NOW = datetime(2026, 11, 30, 15, 0, tzinfo=timezone.utc)


def created_at(job: dict[str, Any], when: datetime) -> dict[str, Any]:
    job["metadata"]["creationTimestamp"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return job


def micro(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.mark.parametrize(
    ("seen", "job_created", "reason"),
    [
        (NOW - timedelta(minutes=5), NOW - timedelta(minutes=30), "QuotaExceeded"),  # this attempt's, recent
        (NOW - timedelta(hours=3), NOW - timedelta(hours=4), None),  # hours old: a refusal that stopped
        (NOW - EVENT_MAX_AGE - timedelta(seconds=1), NOW - timedelta(hours=2), None),
        (NOW - timedelta(minutes=20), NOW - timedelta(minutes=10), None),  # before this RayJob existed: an earlier job's
    ],
    ids=["recent", "hours-old", "just-past-max-age", "before-the-rayjob"],
)
def test_refused_create_events_older_than_the_attempt_are_ignored(
    seen: datetime, job_created: datetime, reason: str | None
) -> None:
    refusal = event("FailedToCreateRayCluster", f"x, {QUOTA}", kind="RayJob", name="job-abc12", uid="", when=micro(seen))
    found = diagnose([], [refusal], created_at(rayjob(cluster=None), job_created), now=NOW)
    assert found.reason == (reason or "")
