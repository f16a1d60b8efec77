"""RayJob status → FineTuneJob status: the full jobDeploymentStatus × jobStatus table, reasons, conditions, times."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from finetune_operator.api.v1alpha1 import FineTuneJobStatus
from finetune_operator.diagnosis import NOTHING_WRONG, Diagnosis
from finetune_operator.status import (
    CONDITION_TYPES,
    DEPLOYMENT_STATUSES,
    JOB_STATUSES,
    failed_status,
    failure_detail,
    map_status,
    phase_event,
    provisioning_status,
    verdict,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
T1 = T0 + timedelta(minutes=1)
T2 = T0 + timedelta(minutes=2)
S0, S1, S2 = "2026-01-02T03:04:05Z", "2026-01-02T03:05:05Z", "2026-01-02T03:06:05Z"

# Expected phase for each jobDeploymentStatus (rows) × jobStatus (columns: "", PENDING, RUNNING, STOPPED,
# SUCCEEDED, FAILED), with the job not asking to be suspended. Written out, not computed: this is the spec.
PV, RU, SU, FA, SP, PE = "Provisioning", "Running", "Succeeded", "Failed", "Suspended", "Pending"
TABLE: dict[str, tuple[str, str, str, str, str, str]] = {
    "": (PV, PV, PV, PV, PV, PV),
    "Initializing": (PV, PV, PV, PV, PV, PV),
    "Running": (PV, PV, RU, RU, RU, RU),
    "Complete": (FA, FA, FA, FA, SU, FA),
    "Failed": (FA, FA, FA, FA, FA, FA),  # even with jobStatus RUNNING (kuberay#2314)
    "ValidationFailed": (FA, FA, FA, FA, FA, FA),
    "Suspending": (PE, PE, PE, PE, PE, PE),  # suspended by a queue (Kueue), not by the job
    "Suspended": (PE, PE, PE, PE, PE, PE),
    "Retrying": (PV, PV, PV, PV, PV, PV),
    "Waiting": (PV, PV, PV, PV, PV, PV),
}
REASONS = ("", "AppFailed", "DeadlineExceeded", "SubmissionFailed", "JobDeploymentStatusTransitionGracePeriodExceeded")


def test_table_covers_every_kuberay_status() -> None:
    assert set(TABLE) == set(DEPLOYMENT_STATUSES)
    assert len(DEPLOYMENT_STATUSES) == 10 and len(JOB_STATUSES) == 6


CROSS = [(d, j, r) for d in DEPLOYMENT_STATUSES for j in JOB_STATUSES for r in REASONS]


@pytest.mark.parametrize(("deployment", "job", "reason"), CROSS, ids=lambda v: v or '""')
def test_phase_for_every_combination(deployment: str, job: str, reason: str) -> None:
    rayjob = {"jobDeploymentStatus": deployment, "jobStatus": job, "reason": reason, "message": "ray said so"}
    expected = TABLE[deployment][JOB_STATUSES.index(job)]
    patch = map_status(rayjob, {"phase": "Provisioning"}, 1, T0)
    assert patch.get("phase", "Provisioning") == expected
    status = FineTuneJobStatus.model_validate({"phase": "Provisioning", **patch})  # the patch is a valid status
    conditions = {c.type: c for c in status.conditions}
    assert list(conditions) == list(CONDITION_TYPES)
    assert conditions["Succeeded"].status == ("True" if expected == SU else "False")
    assert conditions["Failed"].status == ("True" if expected == FA else "False")
    assert conditions["Suspended"].status == ("True" if expected == SP else "False")
    assert conditions["Training"].status == ("True" if (deployment, job) == ("Running", "RUNNING") else "False")
    assert conditions["Validated"].status == "True"
    if expected == FA:
        assert status.message and status.completion_time == S0
        if deployment == "Failed" and reason:
            assert conditions["Failed"].reason == reason and "ray said so" in (status.message or "")


@pytest.mark.parametrize("job", JOB_STATUSES, ids=lambda v: v or '""')
def test_suspended_by_the_job(job: str) -> None:
    for deployment in ("Suspending", "Suspended"):
        patch = map_status({"jobDeploymentStatus": deployment, "jobStatus": job}, {"phase": "Running"}, 2, T0, suspend=True)
        assert patch["phase"] == "Suspended"
        suspended = next(c for c in patch["conditions"] if c["type"] == "Suspended")
        assert suspended["status"] == "True" and suspended["observedGeneration"] == 2


def test_resuming_after_unsuspend_is_provisioning_not_queued() -> None:
    rayjob = {"jobDeploymentStatus": "Suspended"}
    assert map_status(rayjob, {"phase": "Suspended"}, 3, T0, suspend=False, rayjob_suspend=False)["phase"] == "Provisioning"
    assert map_status(rayjob, {"phase": "Suspended"}, 3, T0, suspend=False, rayjob_suspend=True)["phase"] == "Pending"


@pytest.mark.parametrize(
    ("reason", "expected_reason", "words"),
    [
        ("DeadlineExceeded", "DeadlineExceeded", "activeDeadlineSeconds"),
        ("PreRunningDeadlineExceeded", "PreRunningDeadlineExceeded", "deadline"),
        ("SubmissionFailed", "SubmissionFailed", "submit"),
        ("AppFailed", "AppFailed", "trainer failed"),
        ("JobStatusCheckTimeoutExceeded", "JobStatusCheckTimeoutExceeded", "dashboard"),
        ("", "RayJobFailed", "RayJob failed"),
    ],
)
def test_failure_reasons(reason: str, expected_reason: str, words: str) -> None:
    v = verdict({"jobDeploymentStatus": "Failed", "jobStatus": "RUNNING", "reason": reason, "message": "m"})
    assert (v.phase, v.reason) == ("Failed", expected_reason)
    assert words in v.message and v.message.endswith(": m")


def test_validation_failed_and_stopped_reasons() -> None:
    assert verdict({"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed"}).reason == "RayJobValidationFailed"
    assert verdict({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}).reason == "Stopped"
    grace = {
        "jobDeploymentStatus": "Complete",
        "jobStatus": "SUCCEEDED",
        "reason": "JobDeploymentStatusTransitionGracePeriodExceeded",
    }
    assert verdict(grace).phase == "Succeeded"


def test_no_rayjob_status_yet() -> None:
    assert verdict(None).phase == "Provisioning"
    assert map_status({}, None, 1, T0)["phase"] == "Provisioning"


# ---------------------------------------------------------------------------------- transitions
def _apply(status: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(status)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_a_successful_run_step_by_step() -> None:
    status = _apply({}, provisioning_status("ftj-a-12345", 1, T0, None))
    assert status["phase"] == "Provisioning" and status["rayJobName"] == "ftj-a-12345"
    assert _cond(status, "Validated")["status"] == "True"

    running = {
        "jobDeploymentStatus": "Running",
        "jobStatus": "RUNNING",
        "rayClusterName": "ftj-a-12345-abcde",
        "dashboardURL": "ftj-a-12345-abcde-head-svc.ns.svc:8265",
        "rayJobInfo": {"startTime": "2026-01-02T03:04:30Z"},
        "failed": 0,
        "succeeded": 0,
    }
    status = _apply(status, map_status(running, status, 1, T1))
    assert status["phase"] == "Running"
    assert status["startTime"] == "2026-01-02T03:04:30Z"
    assert (status["rayClusterName"], status["dashboardURL"], status["attempts"]) == (
        "ftj-a-12345-abcde",
        "ftj-a-12345-abcde-head-svc.ns.svc:8265",
        1,
    )
    assert (_cond(status, "Training")["status"], _cond(status, "Training")["lastTransitionTime"]) == ("True", S1)
    assert _cond(status, "Validated")["lastTransitionTime"] == S0  # set at creation, not flipped since

    # The same RayJob status again: nothing to write.
    assert map_status(running, status, 1, T2) == {}

    done = {
        **running,
        "jobDeploymentStatus": "Complete",
        "jobStatus": "SUCCEEDED",
        "endTime": "2026-01-02T03:05:59Z",
        "succeeded": 1,
    }
    patch = map_status(done, status, 1, T2)
    status = _apply(status, patch)
    assert status["phase"] == "Succeeded" and status["completionTime"] == "2026-01-02T03:05:59Z"
    assert (_cond(status, "Succeeded")["status"], _cond(status, "Succeeded")["lastTransitionTime"]) == ("True", S2)
    assert (_cond(status, "Training")["status"], _cond(status, "Training")["lastTransitionTime"]) == ("False", S2)
    assert _cond(status, "Failed")["lastTransitionTime"] == S1  # False since the first mapping; no flip
    assert status["startTime"] == "2026-01-02T03:04:30Z"
    assert status["attempts"] == 1

    # Terminal phases are final: the RayJob's TTL clean-up (or anything else) changes nothing.
    assert map_status({"jobDeploymentStatus": "Failed"}, status, 1, T2 + timedelta(hours=1)) == {}


def test_a_retry_counts_attempts_and_keeps_the_first_start_time() -> None:
    status = {"phase": "Running", "startTime": S0, "attempts": 1, "conditions": []}
    retrying = {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "failed": 1, "succeeded": 0, "reason": "AppFailed"}
    status = _apply(status, map_status(retrying, status, 1, T1))
    assert (status["phase"], status["attempts"]) == ("Provisioning", 2)
    assert _cond(status, "Training")["reason"] == "Retrying"
    rerun = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "failed": 1, "succeeded": 0}
    status = _apply(status, map_status(rerun, status, 1, T2))
    assert (status["phase"], status["attempts"], status["startTime"]) == ("Running", 2, S0)
    failed = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "failed": 2, "succeeded": 0, "reason": "AppFailed"}
    status = _apply(status, map_status(failed, status, 1, T2))
    assert (status["phase"], status["attempts"]) == ("Failed", 2)


def test_cluster_facts_are_cleared_when_kuberay_clears_them() -> None:
    status = {"phase": "Running", "rayClusterName": "c", "dashboardURL": "d", "conditions": []}
    patch = map_status({"jobDeploymentStatus": "Suspended"}, status, 2, T1, suspend=True)
    assert patch["rayClusterName"] is None and patch["dashboardURL"] is None  # merge patch: null deletes
    assert patch["phase"] == "Suspended"


def test_suspend_and_resume_flip_conditions_once() -> None:
    status = _apply({}, map_status({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, None, 1, T0))
    status = _apply(status, map_status({"jobDeploymentStatus": "Suspended"}, status, 2, T1, suspend=True))
    assert (_cond(status, "Suspended")["status"], _cond(status, "Suspended")["lastTransitionTime"]) == ("True", S1)
    assert _cond(status, "ClusterReady")["status"] == "False"
    status = _apply(status, map_status({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, status, 3, T2))
    assert (_cond(status, "Suspended")["status"], _cond(status, "Suspended")["lastTransitionTime"]) == ("False", S2)
    assert (_cond(status, "ClusterReady")["status"], _cond(status, "ClusterReady")["lastTransitionTime"]) == ("True", S2)
    assert status["observedGeneration"] == 3


def test_invalid_spec_status() -> None:
    lines = ["spec.model.name: 'resnet5' is not a torchvision classification model"]
    status = failed_status("InvalidSpec", lines, 1, T0, None)
    model = FineTuneJobStatus.model_validate(status)
    validated = next(c for c in model.conditions if c.type == "Validated")
    assert (model.phase, validated.status, validated.reason, validated.message) == ("Failed", "False", "InvalidSpec", lines[0])
    assert next(c for c in model.conditions if c.type == "Failed").status == "True"


def test_provisioning_status_is_idempotent() -> None:
    status = _apply({}, provisioning_status("rj", 1, T0, None))
    assert provisioning_status("rj", 1, T1, status) == {}
    # A job already running keeps its phase when the create handler runs again (operator restart).
    assert "phase" not in provisioning_status("rj", 1, T1, {**status, "phase": "Running"})


def test_phase_events() -> None:
    assert phase_event("Running", "Running", "x") is None
    assert phase_event(None, "Provisioning", "created") == ("Normal", "PhaseProvisioning", "New → Provisioning: created")
    assert phase_event("Running", "Failed", "boom") == ("Warning", "PhaseFailed", "Running → Failed: boom")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("", ""),
        ("DeadlineExceeded", "DeadlineExceeded"),
        (
            "Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
            "\x1b[36m(RayTrainWorker pid=12)\x1b[0m loading\nTraceback (most recent call last):\n  File x\n"
            "error: model.weightsUri: /w.pt: no such file\n",
            "error: model.weightsUri: /w.pt: no such file",
        ),
        ("\x1b[31mboom\x1b[0m\nmore", "boom"),
        ("x" * 5000, "x" * 997 + "..."),
    ],
    ids=["empty", "reason-only", "trainer-error-line", "ansi", "long"],
)
def test_failure_detail(message: str, expected: str) -> None:
    assert failure_detail(message) == expected


# ----------------------------------------------------------------------------- a stuck cluster's diagnosis
STUCK = Diagnosis("Unschedulable", "pod w cannot be scheduled: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")
CREATING = {"jobDeploymentStatus": "Initializing", "rayClusterName": "rc"}


def _cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_a_diagnosis_says_why_the_cluster_is_not_ready() -> None:
    status = _apply({"phase": "Provisioning"}, map_status(CREATING, {"phase": "Provisioning"}, 1, T0, diagnosis=STUCK))
    ready = _cond(status, "ClusterReady")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "Unschedulable", STUCK.message)
    assert (status["phase"], status["message"]) == ("Provisioning", STUCK.message)
    assert _cond(status, "Training")["reason"] == "ClusterStarting"  # only ClusterReady carries the diagnosis
    # A RayJob event brings no diagnosis: the last one stays (no flapping between the two words).
    assert map_status(CREATING, status, 1, T1) == {}
    assert map_status({**CREATING, "rayClusterStatus": {"state": ""}}, status, 1, T1) == {}
    # The next round finds nothing wrong: KubeRay's words come back.
    cleared = _apply(status, map_status(CREATING, status, 1, T1, diagnosis=NOTHING_WRONG))
    assert (_cond(cleared, "ClusterReady")["reason"], cleared["message"]) == (
        "ClusterStarting",
        "KubeRay is creating the Ray cluster",
    )


@pytest.mark.parametrize(
    ("rayjob", "phase", "ready"),
    [
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running", ("True", "JobRunning")),
        ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, "Provisioning", ("True", "JobPending")),
        ({"jobDeploymentStatus": "Waiting"}, "Provisioning", ("True", "WaitingForSubmission")),
        ({"jobDeploymentStatus": ""}, "Provisioning", ("False", "RayJobCreated")),
        ({"jobDeploymentStatus": "Suspended"}, "Pending", ("False", "Queued")),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "Succeeded", ("False", "JobSucceeded")),
    ],
)
def test_a_diagnosis_never_speaks_once_the_cluster_is_past_creation(
    rayjob: dict[str, Any], phase: str, ready: tuple[str, str]
) -> None:
    diagnosed = _apply({"phase": "Provisioning"}, map_status(CREATING, {"phase": "Provisioning"}, 1, T0, diagnosis=STUCK))
    for given in (STUCK, None):
        status = _apply(diagnosed, map_status(rayjob, diagnosed, 1, T1, diagnosis=given))
        assert status["phase"] == phase
        assert (_cond(status, "ClusterReady")["status"], _cond(status, "ClusterReady")["reason"]) == ready
        assert status["message"] != STUCK.message


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_diagnosis_never_moves_a_finished_job(phase: str) -> None:
    assert map_status(CREATING, {"phase": phase}, 1, T0, diagnosis=STUCK) == {}


def test_a_missed_pre_running_deadline_says_what_held_the_cluster_up() -> None:
    diagnosed = _apply({"phase": "Provisioning"}, map_status(CREATING, {"phase": "Provisioning"}, 1, T0, diagnosis=STUCK))
    failed = {"jobDeploymentStatus": "Failed", "reason": "PreRunningDeadlineExceeded"}
    status = _apply(diagnosed, map_status(failed, diagnosed, 1, T1))
    assert status["phase"] == "Failed"
    assert status["message"] == f"the Ray cluster did not start running before its deadline; it was stuck: {STUCK.message}"
    assert _cond(status, "Failed")["message"] == status["message"]


def test_a_trainer_warning_becomes_a_condition_with_the_newest_words() -> None:
    """Issue 11 item 10: a run that 'succeeds' with a collapsed model must say so where people look."""
    running = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    current = {"phase": "Running", "warnings": ["checkpoint epoch 2 unusable", "validation accuracy is at chance: BatchNorm"]}
    status = _apply(current, map_status(running, current, 1, T0))
    warned = _cond(status, "TrainerWarning")
    assert (warned["status"], warned["reason"], warned["message"]) == ("True", "TrainerWarning", current["warnings"][-1])
    quiet = _apply({"phase": "Running"}, map_status(running, {"phase": "Running"}, 1, T0))
    assert all(c["type"] != "TrainerWarning" for c in quiet["conditions"])
