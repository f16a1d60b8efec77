"""Why a job's Ray cluster does not come up: its pods and Warning Events → one condition reason and one line (pure).

While KubeRay creates a job's Ray cluster (RayJob ``jobDeploymentStatus`` Initializing or Retrying, see
``is_stuck``), ``stuck.StuckReader`` lists the cluster's pods (label ``ray.io/cluster``) and the namespace's
Warning Events; ``diagnose`` turns them into a ``Diagnosis`` that ``status.map_status`` writes as
``ClusterReady=False`` (and the job's message). The first finding wins, in this order:

================================  ================================================================================
reason                            found in
================================  ================================================================================
QuotaExceeded                     a KubeRay ``FailedToCreate{Head,Worker}Pod``/``FailedToCreateRayCluster`` Event
PodSecurityRejected               quoting the API's refusal: a ResourceQuota, Pod Security admission, a webhook
RejectedByPolicy                  (Kyverno, Gatekeeper), or anything else (``PodCreationFailed``,
PodCreationFailed                 ``ClusterCreationFailed``); an Event the pods show to be over (its pod exists
ClusterCreationFailed             now) is ignored, and so is one last seen before the RayJob was created (an
                                  earlier job's) or more than ``EVENT_MAX_AGE`` ago (a refusal that stopped)
ErrImagePull                      a container (or init container) waiting with ErrImagePull, ImagePullBackOff,
                                  InvalidImageName or ErrImageNeverPull: one family, one reason (the kubelet
                                  alternates ErrImagePull and ImagePullBackOff while it retries a pull)
CreateContainerConfigError,       a container waiting with that reason (a missing Secret or ConfigMap key, a
CreateContainerError,             container that cannot start, a head that keeps crashing)
CrashLoopBackOff
Unschedulable                     a pod whose ``PodScheduled`` condition is False with reason Unschedulable (no node
                                  has the GPUs, a taint nobody tolerates, a node selector nobody matches)
PodsPending                       a pod not scheduled for another reason (scheduling gates, a scheduler that has not
                                  looked yet)
================================  ================================================================================

Nothing found → ``NOTHING_WRONG``: the status keeps KubeRay's own words. Messages quote the API on one line, at
most ``MESSAGE_MAX`` characters, and carry no times or counters that change by themselves, so that a cluster stuck
for the same reason keeps the same condition.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from finetune_operator.api.versions import RAYJOB_KIND

CLUSTER_LABEL: Final = "ray.io/cluster"
CLUSTER_KIND: Final = "RayCluster"
# A refused create that KubeRay keeps retrying is posted again at each try (controller-runtime's back-off tops out
# at ~17 minutes; an events.k8s.io series is refreshed every 30): an Event not seen for an hour is about a refusal
# that has stopped, whatever the pods show.
EVENT_MAX_AGE: Final = timedelta(hours=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)
NODE_TYPE_LABEL: Final = "ray.io/node-type"
STUCK_DEPLOYMENT_STATUSES: Final = frozenset({"Initializing", "Retrying"})
MESSAGE_MAX: Final = 400
# KubeRay v1.7's Event reasons for a create the API server refused (ray-operator/controllers/ray/utils/constant.go).
_CREATE_EVENTS: Final = {"FailedToCreateHeadPod": "head", "FailedToCreateWorkerPod": "worker", "FailedToCreateRayCluster": ""}
# One family, one reason: the kubelet flips a failing pull between ErrImagePull and ImagePullBackOff every retry, and
# a reason that flipped with it would rewrite the condition and post a Warning Event at each flip.
_IMAGE: Final = {
    "ErrImagePull": "ErrImagePull",
    "ImagePullBackOff": "ErrImagePull",
    "InvalidImageName": "ErrImagePull",
    "ErrImageNeverPull": "ErrImagePull",
}
_START: Final = ("CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff")
REASONS: Final = frozenset(
    {
        "QuotaExceeded",
        "PodSecurityRejected",
        "RejectedByPolicy",
        "PodCreationFailed",
        "ClusterCreationFailed",
        "ErrImagePull",
        "ImagePullBackOff",  # no longer given (see _IMAGE), but a condition an earlier version wrote still has it
        *_START,
        "Unschedulable",
        "PodsPending",
    }
)
"""Every reason ``diagnose`` gives or gave: a ``ClusterReady`` condition with one of these was written by a diagnosis."""


@dataclass(frozen=True)
class Diagnosis:
    """Why the cluster is not up (``reason`` one of ``REASONS``, ``message`` one line), or nothing found (``""``)."""

    reason: str
    message: str

    @property
    def found(self) -> bool:
        return bool(self.reason)


NOTHING_WRONG: Final = Diagnosis("", "")


def is_stuck(rayjob: Mapping[str, Any]) -> bool:
    """Whether the RayJob waits for KubeRay to bring its Ray cluster up: only then are pods and Events worth reading.

    Not before KubeRay has picked the RayJob up (no cluster yet), not while it is suspended (a queue or the user
    holds it, no pods), and never once the cluster is up, the job running or finished.
    """
    status = rayjob.get("status") or {}
    suspended = bool((rayjob.get("spec") or {}).get("suspend"))
    return not suspended and status.get("jobDeploymentStatus") in STUCK_DEPLOYMENT_STATUSES


def one_line(text: str, limit: int = MESSAGE_MAX) -> str:
    """``text`` with its whitespace runs (newlines included) collapsed to one space, cut to ``limit`` characters."""
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def diagnose(
    pods: Iterable[Mapping[str, Any]],
    events: Iterable[Mapping[str, Any]],
    rayjob: Mapping[str, Any],
    *,
    now: datetime | None = None,
) -> Diagnosis:
    """The first finding in the module docstring's order, from the cluster's pods and the Warning Events about the
    RayJob and its RayCluster; ``now`` (aware): Events older than ``EVENT_MAX_AGE`` before it are ignored."""
    ordered = sorted(pods, key=lambda pod: (_node_type(pod) != "head", str((pod.get("metadata") or {}).get("name"))))
    current = _current(events, rayjob, now)
    for finding in (_refused_create(ordered, current, rayjob), _container_trouble(ordered), _unscheduled(ordered)):
        if finding is not None:
            return finding
    return NOTHING_WRONG


def diagnosis_event(old: Mapping[str, Any], patch: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Warning Event announcing a new diagnosis in a status ``patch`` over ``old``.

    Once per change of reason: a cluster stuck for the same reason, whose API message varies a little (the
    scheduler's node counts), updates the condition but posts no second Event.
    """
    new = _cluster_ready(patch)
    if new is None or new.get("status") != "False" or new.get("reason") not in REASONS:
        return None
    before = _cluster_ready(old)
    same = before is not None and _family(before.get("reason")) == _family(new.get("reason"))
    if before is not None and before.get("status") == "False" and same:
        return None
    return "Warning", str(new["reason"]), str(new.get("message") or "")


# ------------------------------------------------------------------------------------------- findings
def _refused_create(
    pods: list[Mapping[str, Any]], events: Iterable[Mapping[str, Any]], rayjob: Mapping[str, Any]
) -> Diagnosis | None:
    """The latest KubeRay Event saying the API server refused a pod or the cluster, unless the pods show it is over."""
    meta, status = rayjob.get("metadata") or {}, rayjob.get("status") or {}
    cluster = status.get("rayClusterName")
    heads = sum(1 for pod in pods if _node_type(pod) == "head")
    workers = len(pods) - heads
    wanted = _wanted_workers(rayjob)
    relevant = []
    for event in events:
        reason = str(event.get("reason") or "")
        if reason not in _CREATE_EVENTS or event.get("type") != "Warning":
            continue
        about = event.get("involvedObject") or {}
        if about.get("kind") == "RayCluster":
            ours = bool(cluster) and about.get("name") == cluster
        else:  # the RayJob's own: an earlier job of the same name left Events under another uid
            ours = about.get("kind") == RAYJOB_KIND and about.get("name") == meta.get("name")
            ours = ours and about.get("uid") in (None, "", meta.get("uid"))
        which = _CREATE_EVENTS[reason]
        over = (which == "head" and heads > 0) or (which == "worker" and wanted is not None and workers >= wanted)
        if ours and not over and not (which == "" and pods):
            relevant.append(event)
    if not relevant:
        return None
    latest = max(relevant, key=lambda event: _seen(event) or _EPOCH)
    which = _CREATE_EVENTS[str(latest["reason"])]
    what = f"the Ray {which} pod" if which else "the RayCluster"
    text = str(latest.get("message") or latest.get("note") or "")
    if "exceeded quota" in text:
        return _found("QuotaExceeded", f"the namespace's ResourceQuota refused {what}: {text}")
    if "violates PodSecurity" in text:
        return _found("PodSecurityRejected", f"Pod Security admission refused {what}: {text}")
    if "admission webhook" in text or "denied the request" in text:
        return _found("RejectedByPolicy", f"a cluster policy refused {what}: {text}")
    return _found("PodCreationFailed" if which else "ClusterCreationFailed", f"KubeRay could not create {what}: {text}")


def _container_trouble(pods: list[Mapping[str, Any]]) -> Diagnosis | None:
    """A container that cannot pull its image, then one that cannot start (head first, then by name)."""
    for wanted in (set(_IMAGE), set(_START)):
        hits = []
        for pod in pods:
            status = pod.get("status") or {}
            for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
                waiting = (container.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in wanted:
                    hits.append((pod, container, waiting))
                    break
        if hits:
            pod, container, waiting = hits[0]
            reason = str(waiting["reason"])
            name = (pod.get("metadata") or {}).get("name")
            if reason in _IMAGE:
                head = f"pod {name} cannot pull image {container.get('image')!r} ({reason})"
            else:
                head = f"container {container.get('name')} of pod {name} cannot start ({reason})"
            detail = str(waiting.get("message") or "")
            return _found(_IMAGE.get(reason, reason), head + (f": {detail}" if detail else "") + _more(len(hits)))
    return None


def _unscheduled(pods: list[Mapping[str, Any]]) -> Diagnosis | None:
    """Pending pods the scheduler refused (Unschedulable), or holds back for another reason (PodsPending)."""
    refused: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = []
    held: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = []
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") not in (None, "", "Pending"):
            continue
        scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
        if scheduled is not None and scheduled.get("status") == "False":
            (refused if scheduled.get("reason") == "Unschedulable" else held).append((pod, scheduled))
    for reason, hits in (("Unschedulable", refused), ("PodsPending", held)):
        if hits:
            pod, scheduled = hits[0]
            name = (pod.get("metadata") or {}).get("name")
            why = str(scheduled.get("message") or scheduled.get("reason") or "not scheduled yet")
            head = f"pod {name} cannot be scheduled" if reason == "Unschedulable" else f"pod {name} is not scheduled"
            return _found(reason, f"{head}: {why}{_more(len(hits))}")
    return None


# -------------------------------------------------------------------------------------------- helpers
def _family(reason: Any) -> str:
    """A reason with its family's (an ImagePullBackOff condition an earlier version wrote is ErrImagePull now)."""
    return _IMAGE.get(str(reason), str(reason))


def _current(events: Iterable[Mapping[str, Any]], rayjob: Mapping[str, Any], now: datetime | None) -> list[Mapping[str, Any]]:
    """The Events of this attempt: none last seen before the RayJob was created, or (with ``now``) over
    ``EVENT_MAX_AGE`` ago. An Event without a readable time is kept: there is nothing to judge it by."""
    created = _instant((rayjob.get("metadata") or {}).get("creationTimestamp"))
    oldest = now - EVENT_MAX_AGE if now is not None else None
    kept = []
    for event in events:
        seen = _seen(event)
        if seen is None or ((created is None or seen >= created) and (oldest is None or seen >= oldest)):
            kept.append(event)
    return kept


def _instant(stamp: Any) -> datetime | None:
    """An API timestamp (``2026-01-02T03:04:05Z``, a MicroTime, an ISO offset) as an aware datetime; None if unreadable."""
    try:
        moment = datetime.fromisoformat(str(stamp)) if stamp else None
    except ValueError:
        return None
    return moment if moment is None or moment.tzinfo is not None else None


def _found(reason: str, message: str) -> Diagnosis:
    return Diagnosis(reason, one_line(message))


def _more(count: int) -> str:
    return f" (and {count - 1} more pod{'s' if count > 2 else ''} alike)" if count > 1 else ""


def _node_type(pod: Mapping[str, Any]) -> str:
    return str(((pod.get("metadata") or {}).get("labels") or {}).get(NODE_TYPE_LABEL) or "")


def _wanted_workers(rayjob: Mapping[str, Any]) -> int | None:
    """The worker pods the RayJob's cluster asks for (replicas × numOfHosts), None when its spec does not say."""
    groups = ((rayjob.get("spec") or {}).get("rayClusterSpec") or {}).get("workerGroupSpecs")
    if not isinstance(groups, list):
        return None
    try:
        return sum(int(group.get("replicas") or 0) * int(group.get("numOfHosts") or 1) for group in groups)
    except (TypeError, ValueError, AttributeError):
        return None


def _seen(event: Mapping[str, Any]) -> datetime | None:
    """When an Event was last seen: core/v1 writers fill lastTimestamp, events.k8s.io/v1 ones (KubeRay) eventTime and
    a series; the latest readable of them (None: none readable)."""
    series = event.get("series") or {}
    created = (event.get("metadata") or {}).get("creationTimestamp")
    stamps = [series.get("lastObservedTime"), *(event.get(key) for key in ("lastTimestamp", "eventTime", "firstTimestamp"))]
    instants = [moment for stamp in (*stamps, created) if (moment := _instant(stamp)) is not None]
    return max(instants, default=None)


def _cluster_ready(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == "ClusterReady"), None)


__all__ = ["EVENT_MAX_AGE", "NOTHING_WRONG", "REASONS", "Diagnosis", "diagnose", "diagnosis_event", "is_stuck", "one_line"]
