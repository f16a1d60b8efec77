"""Suspending and resuming a job's RayJob: its ``spec.suspend`` flag, or for a queued job Kueue's Workload switch.

Kueue owns ``spec.suspend`` of every RayJob carrying its queue label: it un-suspends a job as soon as the
job's Workload is admitted, so a user's suspend written onto an admitted RayJob is undone within a second
(jobframework's reconciler: "Job admitted, unsuspending"). Kueue's own way to stop an admitted job is to
deactivate its Workload: Kueue then evicts it (reason ``InactiveWorkload``), suspends the RayJob itself and
releases the quota; reactivating it queues the job again, and Kueue un-suspends it once re-admitted.

So with a ``queueName``: suspend = deactivate the Workload (and suspend the RayJob, which Kueue would do
anyway); resume = reactivate the Workload and leave ``spec.suspend`` to Kueue. A Workload that does not exist
yet (Kueue creates it shortly after the RayJob) is deactivated on the next pass; the resync makes that pass
every minute, so a suspended job is never admitted behind the user's back. No Kueue installed (no Workload
kind: HTTP 404) means nothing to deactivate: the RayJob's own flag is all there is.

Without a queue label the RayJob's ``spec.suspend`` simply follows the job's ``runPolicy.suspend``. Pure rules
plus the calls, over a small protocol (``k8s.Kube`` in production).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol

from finetune_operator import naming
from finetune_operator.api.versions import RAYJOB_KIND, WORKLOAD_KIND
from finetune_operator.failures import ApiFailure

LABEL_JOB_UID: Final = "kueue.x-k8s.io/job-uid"  # Kueue labels every Workload it makes with its job's uid


class WorkloadApi(Protocol):
    """The calls made here (``k8s.Kube``); each raises ``failures.ApiFailure``."""

    def list_labelled(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]: ...

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]: ...


def is_active(workload: Mapping[str, Any]) -> bool:
    """Kueue's default: a Workload without ``spec.active`` is active."""
    return (workload.get("spec") or {}).get("active") is not False


def workloads_of(rayjob: Mapping[str, Any], listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Workloads among ``listed`` that Kueue made for this RayJob (an owner reference to its uid).

    The label alone is not proof: labels can be written by anyone who can write Workloads."""
    uid = rayjob["metadata"].get("uid")

    def owned(wl: Mapping[str, Any]) -> bool:
        refs = (wl.get("metadata") or {}).get("ownerReferences") or []
        return any(ref.get("kind") == RAYJOB_KIND and ref.get("uid") == uid for ref in refs)

    return [wl for wl in listed if owned(wl)]


class KueueMissing(Exception):
    """The Workload kind is not served (HTTP 404): Kueue is not installed, and the queue label is just a label."""


def set_active(kube: WorkloadApi, rayjob: Mapping[str, Any], active: bool) -> list[str]:
    """Make the RayJob's Workloads ``active``; the names of those changed (none: nothing to do).

    Raises ``KueueMissing`` when the cluster has no Workload kind at all."""
    meta = rayjob["metadata"]
    if not meta.get("uid"):
        return []
    try:
        listed = kube.list_labelled(WORKLOAD_KIND, meta["namespace"], f"{LABEL_JOB_UID}={meta['uid']}")
    except ApiFailure as exc:
        if exc.status == 404:
            raise KueueMissing(str(exc)) from exc
        raise
    changed = []
    for wl in workloads_of(rayjob, listed):
        if is_active(wl) != active:
            kube.patch(WORKLOAD_KIND, meta["namespace"], wl["metadata"]["name"], {"spec": {"active": active}})
            changed.append(str(wl["metadata"]["name"]))
    return changed


def align(kube: WorkloadApi, rayjob: dict[str, Any], wanted: bool) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """Make ``rayjob`` follow the job's ``wanted`` suspension: (the RayJob as it is now, the Event's (reason, message)
    when something changed). Queued (Kueue's label, from ``runtime.queueName`` or Kueue's own defaulting): suspend
    deactivates its Workload, resume reactivates it, and the RayJob's flag is never lifted here: Kueue does that
    when it admits the Workload."""
    actual = bool((rayjob.get("spec") or {}).get("suspend"))
    meta = rayjob["metadata"]
    changed: list[str] = []
    patch = wanted != actual
    if naming.LABEL_KUEUE_QUEUE in (meta.get("labels") or {}):
        try:
            # A running queued job with nothing asked has an active, admitted Workload: no LIST for it.
            changed = set_active(kube, rayjob, not wanted) if wanted or actual else []
            patch = wanted and not actual
        except KueueMissing:  # no Kueue to lift a suspension: the RayJob's own flag is all there is
            pass
    if patch:
        rayjob = kube.patch(RAYJOB_KIND, meta["namespace"], meta["name"], {"spec": {"suspend": wanted}})
    if not (patch or changed):
        return rayjob, None
    verb, reason = ("suspending", "Suspend") if wanted else ("resuming from the last checkpoint", "Resume")
    if changed:
        state = "deactivated" if wanted else "reactivated (Kueue un-suspends the RayJob once it admits it)"
        return rayjob, (reason, f"{verb} through Kueue: Workload {', '.join(changed)} {state}")
    return rayjob, (reason, f"{verb}: RayJob {meta['name']} spec.suspend={str(wanted).lower()}")


__all__ = ["LABEL_JOB_UID", "KueueMissing", "WorkloadApi", "align", "is_active", "set_active", "workloads_of"]
