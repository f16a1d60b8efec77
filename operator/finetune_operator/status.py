"""RayJob status → FineTuneJob status (phase, conditions, times, cluster facts): pure, table-tested.

Called by the RayJob watch handler and the resync timer with the RayJob's ``status``, the FineTuneJob's
current ``status`` and the time; returns a *merge patch* holding only what changed (``{}`` when nothing
did), so watch events that change nothing write nothing.

The phase comes from KubeRay's ``jobDeploymentStatus`` and ``reason`` first and from ``jobStatus`` only
to refine it, because the deployment status is KubeRay's verdict and the job status is a copy of what Ray
last said: a RayJob can be ``Failed`` with ``reason: DeadlineExceeded`` while ``jobStatus`` still reads
``RUNNING`` (kuberay#2314). In short:

=====================  =========================================================================
jobDeploymentStatus    phase
=====================  =========================================================================
"" / Initializing      Provisioning (the Ray cluster is being created)
Waiting                Provisioning (cluster up, waiting for a submission)
Running                Running when jobStatus is RUNNING or terminal, else Provisioning (job pending)
Retrying               Provisioning (an attempt failed, KubeRay starts another within backoffLimit)
Suspending/Suspended   Suspended; Pending (reason Queued) when the job did not ask to be suspended,
                       i.e. a queue such as Kueue holds it; Provisioning (Resuming) once un-suspended
Complete               Succeeded when jobStatus is SUCCEEDED, else Failed (STOPPED → reason Stopped)
Failed                 Failed, with KubeRay's reason (AppFailed, DeadlineExceeded, SubmissionFailed…), or
                       BelowAccuracyGate when the trainer's last line says the model missed spec.evaluation
ValidationFailed       Failed (reason RayJobValidationFailed: KubeRay refused the RayJob)
=====================  =========================================================================

Succeeded and Failed are final: once there, later RayJob changes (TTL clean-up) change nothing.
``lastTransitionTime`` of a condition moves only when its ``status`` flips.

While KubeRay creates the cluster, a ``diagnosis`` (``diagnosis.diagnose``, made by the resync round) replaces
KubeRay's words in ``ClusterReady`` and the job's message; a RayJob event, which brings none, keeps the last one,
so the condition never flips between the two. A job that fails its pre-running deadline keeps the last
diagnosis in its failure message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final

from finetune_operator.api.timestamps import rfc3339
from finetune_operator.api.v1alpha1 import TERMINAL_PHASES, Phase
from finetune_operator.diagnosis import REASONS, STUCK_DEPLOYMENT_STATUSES, Diagnosis

CONDITION_TYPES: Final = ("Validated", "ClusterReady", "Training", "Succeeded", "Failed", "Suspended")
DEPLOYMENT_STATUSES: Final = (
    "",
    "Initializing",
    "Running",
    "Complete",
    "Failed",
    "ValidationFailed",
    "Suspending",
    "Suspended",
    "Retrying",
    "Waiting",
)
JOB_STATUSES: Final = ("", "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED")
_JOB_TERMINAL: Final = frozenset({"STOPPED", "SUCCEEDED", "FAILED"})
_FAILURE_TEXT: Final = {
    "AppFailed": "the trainer failed",
    "DeadlineExceeded": "the job ran past runPolicy.activeDeadlineSeconds",
    "PreRunningDeadlineExceeded": "the Ray cluster did not start running before its deadline",
    "SubmissionFailed": "KubeRay could not submit the Ray job",
    "JobDeploymentStatusTransitionGracePeriodExceeded": "KubeRay did not see the job finish in time",
    "JobStatusCheckTimeoutExceeded": "the Ray dashboard stopped answering job status checks",
    "ValidationFailed": "KubeRay rejected the RayJob",
}


@dataclass(frozen=True)
class Verdict:
    """What the RayJob says, in FineTuneJob terms: the phase, why, and the condition statuses."""

    phase: Phase
    reason: str
    message: str
    cluster_ready: bool
    training: bool


GATE_REASON: Final = "BelowAccuracyGate"
GATE_LINE: Final = f"error: {GATE_REASON}:"  # how the trainer's evaluation gate (finetune_trainer.gate) fails a run
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_DETAIL = 1000


def failure_detail(message: str) -> str:
    """The part of KubeRay's failure message a person needs, on one short line.

    KubeRay copies the tail of the Ray job's log into ``message`` (tracebacks, ANSI colours, up to
    ~20,000 characters). The trainer reports user errors as one ``error: …`` line: when there is one,
    that line is the whole story; otherwise the message's first line, shortened.
    """
    text = _ANSI.sub("", message)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    chosen = errors[-1] if errors else (lines[0] if lines else "")
    return chosen if len(chosen) <= MAX_DETAIL else chosen[: MAX_DETAIL - 3] + "..."


def verdict(rayjob_status: Mapping[str, Any] | None, *, suspend: bool = False, rayjob_suspend: bool | None = None) -> Verdict:
    """The phase and reasons for one RayJob status (see the table in the module docstring).

    ``suspend`` is the FineTuneJob's ``runPolicy.suspend``; ``rayjob_suspend`` the RayJob's ``spec.suspend``
    (None: unknown). A suspended RayJob the job did not ask for is held by a queue, unless its own flag is
    already false again, which means it is resuming.
    """
    st = rayjob_status or {}
    deployment = str(st.get("jobDeploymentStatus") or "")
    job = str(st.get("jobStatus") or "")
    reason = str(st.get("reason") or "")
    ray_message = failure_detail(str(st.get("message") or ""))

    def with_detail(text: str) -> str:
        return f"{text}: {ray_message}" if ray_message else text

    if ray_message.startswith(GATE_LINE) and (deployment == "Failed" or (deployment == "Complete" and job == "FAILED")):
        # The trainer finished and wrote its artifacts, then the model missed spec.evaluation.minAccuracy.
        detail = ray_message[len(GATE_LINE) :].strip()
        return Verdict(Phase.FAILED, GATE_REASON, f"the model failed its accuracy gate: {detail}", False, False)
    if deployment == "Failed" or deployment == "ValidationFailed":
        why = "RayJobValidationFailed" if deployment == "ValidationFailed" else (reason or "RayJobFailed")
        text = _FAILURE_TEXT.get(reason, "the RayJob failed")
        return Verdict(Phase.FAILED, why, with_detail(text), False, False)
    if deployment == "Complete":
        if job == "SUCCEEDED":
            return Verdict(Phase.SUCCEEDED, "JobSucceeded", "training finished and the model was exported", False, False)
        if job == "STOPPED":
            return Verdict(Phase.FAILED, "Stopped", with_detail("the Ray job was stopped before it finished"), False, False)
        why = reason or ("AppFailed" if job == "FAILED" else "JobNotSucceeded")
        return Verdict(
            Phase.FAILED, why, with_detail(f"the RayJob completed with Ray job status {job or 'unknown'}"), False, False
        )
    if deployment in ("Suspending", "Suspended"):
        if suspend:
            return Verdict(
                Phase.SUSPENDED, "Suspended", "suspended by runPolicy.suspend; resumes from the last checkpoint", False, False
            )
        if rayjob_suspend is False:
            return Verdict(Phase.PROVISIONING, "Resuming", "resuming: KubeRay recreates the Ray cluster", False, False)
        return Verdict(
            Phase.PENDING, "Queued", "the RayJob is suspended by its queue (e.g. Kueue) until it is admitted", False, False
        )
    if deployment == "Retrying":
        failed = int(st.get("failed") or 0)
        return Verdict(Phase.PROVISIONING, "Retrying", f"attempt {failed} failed; KubeRay is starting another", False, False)
    if deployment == "Running":
        if job == "RUNNING":
            return Verdict(Phase.RUNNING, "JobRunning", "training on the Ray cluster", True, True)
        if job in _JOB_TERMINAL:
            # Ray is done but KubeRay has not yet completed the RayJob (it waits for the submitter).
            return Verdict(
                Phase.RUNNING, "JobFinishing", f"the Ray job is {job}; waiting for KubeRay to complete the RayJob", True, False
            )
        return Verdict(Phase.PROVISIONING, "JobPending", "the Ray cluster is ready; the trainer is starting", True, False)
    if deployment == "Waiting":
        return Verdict(
            Phase.PROVISIONING, "WaitingForSubmission", "the Ray cluster is ready; waiting for the job submission", True, False
        )
    if deployment == "Initializing":
        return Verdict(Phase.PROVISIONING, "ClusterStarting", "KubeRay is creating the Ray cluster", False, False)
    return Verdict(Phase.PROVISIONING, "RayJobCreated", "waiting for KubeRay to pick up the RayJob", False, False)


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """``conditions`` with ``type_`` set; its lastTransitionTime kept unless its status flips."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old is not None and old.get("status") == value else None
    new: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or now,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out = [c for c in conditions if c.get("type") != type_]
    out.append(new)
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(str(c.get("type")), len(order)))


def _time(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def map_status(
    rayjob_status: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    generation: int | None,
    now: datetime,
    *,
    suspend: bool = False,
    rayjob_suspend: bool | None = None,
    diagnosis: Diagnosis | None = None,
) -> dict[str, Any]:
    """The merge patch that brings the FineTuneJob's status (``current``, camelCase) in line with the RayJob's.

    ``diagnosis``: why the cluster is not up, when it was looked for (None: not looked, keep the last one).
    """
    cur = dict(current or {})
    if cur.get("phase") in TERMINAL_PHASES:
        return {}
    st = rayjob_status or {}
    v = verdict(st, suspend=suspend, rayjob_suspend=rayjob_suspend)
    stamp = rfc3339(now)
    conditions: list[dict[str, Any]] = [dict(c) for c in cur.get("conditions") or []]
    v, cluster = _diagnosed(v, st, conditions, diagnosis)
    flags = {
        "Validated": (True, "SpecValid", "the spec is valid"),
        "ClusterReady": (v.cluster_ready, *cluster),
        "Training": (v.training, v.reason, v.message),
        "Succeeded": (v.phase is Phase.SUCCEEDED, v.reason, v.message),
        "Failed": (v.phase is Phase.FAILED, v.reason, v.message),
        "Suspended": (v.phase is Phase.SUSPENDED, v.reason, v.message),
    }
    for type_, (status, reason, message) in flags.items():
        if type_ == "Validated" and any(c.get("type") == "Validated" and c.get("status") == "True" for c in conditions):
            continue  # set by the create handler; keep its words
        conditions = set_condition(conditions, type_, status, reason, message, stamp, generation)
    if warnings := cur.get("warnings"):  # the trainer's (a BatchNorm collapse, a checkpoint fallback): the newest says
        conditions = set_condition(conditions, "TrainerWarning", True, "TrainerWarning", str(warnings[-1]), stamp, generation)

    wanted: dict[str, Any] = {
        "phase": v.phase.value,
        "message": cluster[1] if cluster[0] in REASONS else v.message,
        "conditions": conditions,
        "rayClusterName": st.get("rayClusterName") or None,
        "dashboardURL": st.get("dashboardURL") or None,
        "attempts": _attempts(st),
    }
    if generation is not None:
        wanted["observedGeneration"] = generation
    if v.training and not cur.get("startTime"):
        info = st.get("rayJobInfo") or {}
        wanted["startTime"] = _time(info.get("startTime")) or stamp
    if v.phase in TERMINAL_PHASES and not cur.get("completionTime"):
        info = st.get("rayJobInfo") or {}
        wanted["completionTime"] = _time(st.get("endTime")) or _time(info.get("endTime")) or stamp
    return {k: value for k, value in wanted.items() if cur.get(k) != value}


def _diagnosed(
    v: Verdict, st: Mapping[str, Any], conditions: list[dict[str, Any]], diagnosis: Diagnosis | None
) -> tuple[Verdict, tuple[str, str]]:
    """The verdict (a missed pre-running deadline says what held the cluster up) and ``ClusterReady``'s (reason,
    message): KubeRay's words, or a diagnosis while the cluster is being created (see the module docstring)."""
    old = next((c for c in conditions if c.get("type") == "ClusterReady"), None)
    last = (str(old["reason"]), str(old.get("message") or "")) if old and old.get("reason") in REASONS else None
    if last is not None and v.reason == "PreRunningDeadlineExceeded":
        v = replace(v, message=f"{v.message}; it was stuck: {last[1]}")
    creating = v.phase is Phase.PROVISIONING and st.get("jobDeploymentStatus") in STUCK_DEPLOYMENT_STATUSES
    if creating and diagnosis is None and last is not None:
        return v, last
    if creating and diagnosis is not None and diagnosis.found:
        return v, (diagnosis.reason, diagnosis.message)
    return v, (v.reason, v.message)


def _attempts(st: Mapping[str, Any]) -> int | None:
    """1 + retries: finished attempts from KubeRay's counters, plus the one in flight."""
    if not st.get("jobDeploymentStatus"):
        return None if st.get("failed") is None else int(st["failed"]) + 1
    finished = int(st.get("failed") or 0) + int(st.get("succeeded") or 0)
    in_flight = st.get("jobDeploymentStatus") not in ("Complete", "Failed", "ValidationFailed")
    return finished + 1 if in_flight else max(1, finished)


def phase_event(old: str | None, new: str | None, message: str) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event announcing a phase change, or None when it did not change."""
    if new is None or new == old:
        return None
    kind = "Warning" if new == Phase.FAILED.value else "Normal"
    return kind, f"Phase{new}", f"{old or 'New'} → {new}: {message}"


def failed_status(
    reason: str,
    lines: list[str],
    generation: int | None,
    now: datetime,
    current: Mapping[str, Any] | None,
    *,
    invalid: bool = True,
) -> dict[str, Any]:
    """The status of a job the operator gives up on before it runs: Failed, and ``Validated=False`` when
    ``invalid`` (a bad spec); a valid job blocked for good (a name collision, a rejected child) keeps it."""
    stamp = rfc3339(now)
    message = "; ".join(lines)
    conditions: list[dict[str, Any]] = [dict(c) for c in (current or {}).get("conditions") or []]
    if invalid:
        conditions = set_condition(conditions, "Validated", False, reason, message, stamp, generation)
    else:
        conditions = set_condition(conditions, "Validated", True, "SpecValid", "the spec is valid", stamp, generation)
    conditions = set_condition(conditions, "Failed", True, reason, message, stamp, generation)
    return {
        "phase": Phase.FAILED.value,
        "message": message,
        "conditions": conditions,
        "observedGeneration": generation,
        "completionTime": (current or {}).get("completionTime") or stamp,
    }


def blocked_status(
    reason: str, message: str, generation: int | None, now: datetime, current: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A job the operator cannot start yet, for a reason people must fix (KubeRay missing, RBAC, a policy):
    Pending, with ``ClusterReady=False`` saying why. It moves on by itself once the cause is gone."""
    cur = current or {}
    stamp = rfc3339(now)
    conditions: list[dict[str, Any]] = [dict(c) for c in cur.get("conditions") or []]
    conditions = set_condition(conditions, "ClusterReady", False, reason, message, stamp, generation)
    patch: dict[str, Any] = {"phase": Phase.PENDING.value, "message": message, "conditions": conditions}
    return {k: v for k, v in patch.items() if cur.get(k) != v}


def lost_rayjob_status(
    reason: str, message: str, generation: int | None, now: datetime, current: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A started job whose RayJob is gone and whose RayJob name another object holds now: its phase stays (a running
    job is never failed over a child, and it comes back once the name is free), but ``ClusterReady`` and ``Training``
    say it has no Ray cluster, and why, instead of mirroring a RayJob that is no longer there."""
    cur = current or {}
    stamp = rfc3339(now)
    conditions: list[dict[str, Any]] = [dict(c) for c in cur.get("conditions") or []]
    for type_ in ("ClusterReady", "Training"):
        conditions = set_condition(conditions, type_, False, reason, message, stamp, generation)
    patch: dict[str, Any] = {"message": message, "conditions": conditions}
    return {k: v for k, v in patch.items() if cur.get(k) != v}


def provisioning_status(
    rayjob_name: str, generation: int | None, now: datetime, current: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The status right after the children were created: Provisioning, Validated=True, the RayJob's name."""
    cur = current or {}
    stamp = rfc3339(now)
    conditions: list[dict[str, Any]] = [dict(c) for c in cur.get("conditions") or []]
    conditions = set_condition(conditions, "Validated", True, "SpecValid", "the spec is valid", stamp, generation)
    patch: dict[str, Any] = {"rayJobName": rayjob_name, "observedGeneration": generation, "conditions": conditions}
    if not cur.get("phase"):
        patch["phase"] = Phase.PROVISIONING.value
        patch["message"] = "the RayJob was created; waiting for KubeRay"
    return {k: v for k, v in patch.items() if cur.get(k) != v}
