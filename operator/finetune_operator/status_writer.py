"""Writing a FineTuneJob's status and its Events: how the reconcile rules' decisions reach the job.

``StatusWriter(kube, emit, clock)`` owns the mechanics the rules (``reconcile.Reconciler``) leave out:
- **write**: one status patch under the job's resourceVersion precondition, then the Events a change deserves
  (``status.phase_event``, ``diagnosis.diagnosis_event``) and the job's phase in the metrics; an empty patch
  only records the phase.
- **mirror**: ``status.map_status`` of the RayJob's state, written; on 409 the job (and the RayJob) are read again
  and the decision taken anew, up to ``CONFLICT_ATTEMPTS`` writes.
- **emit**: an Event through the sink, its message cut to what the API server stores.

Pure in the same sense as ``reconcile``: it speaks to the API server only through ``StatusApi`` and reports
through an ``EventSink``, so the unit tests run it against an in-memory fake.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from finetune_operator import metrics
from finetune_operator.api import timestamps
from finetune_operator.api.versions import KIND, RAYJOB_KIND
from finetune_operator.diagnosis import Diagnosis, diagnosis_event
from finetune_operator.failures import ApiFailure
from finetune_operator.ownership import ParentJob, controls
from finetune_operator.status import map_status, phase_event, provisioning_status

log = logging.getLogger(__name__)

EVENT_MESSAGE_MAX = 1000
CONFLICT_ATTEMPTS = 5
"""Status writes per mirror when each meets a 409 (client-go's ``retry.DefaultRetry`` makes 5 too): a job whose
status other writers keep changing (the create handler, the trainer's progress) is re-read and re-decided."""

EventSink = Callable[[Mapping[str, Any], str, str, str], None]
"""``emit(object, type, reason, message)``: records a Kubernetes Event about ``object``."""


class StatusApi(Protocol):
    """The API calls status writes make (``k8s.Kube``); each raises ``failures.ApiFailure`` naming the object."""

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any], *, resource_version: str | None = None
    ) -> dict[str, Any]: ...


def log_event(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """The event sink outside a running operator (scripts, tests): a log line."""
    log.info("event %s %s on %s: %s", type_, reason, (obj.get("metadata") or {}).get("name"), message)


class StatusWriter:
    """A job's status patches and Events over one API client (see the module docstring)."""

    def __init__(self, kube: StatusApi, *, emit: EventSink = log_event, clock: Callable[[], datetime] = timestamps.now) -> None:
        self.kube = kube
        self.sink = emit
        self.clock = clock

    def mirror(
        self, parent: ParentJob, rayjob: Mapping[str, Any], *, record: bool = False, diagnosis: Diagnosis | None = None
    ) -> None:
        """Bring the job's status in line with the RayJob's, in one status patch; ``record``: also record the
        RayJob's name (and Provisioning, Validated) when the job has no ``rayJobName`` yet; ``diagnosis``: why its
        cluster is not up (None: not looked, ``status.map_status`` keeps the last one).

        The patch carries the job's resourceVersion as a precondition; on 409 the job is read again and the
        decision taken anew (up to ``CONFLICT_ATTEMPTS`` writes), so that two writers racing (an event and a handler)
        never undo each other, and a busy job is not left for the resync round (a minute) after two conflicts.
        """
        for attempt in range(CONFLICT_ATTEMPTS):
            patch: dict[str, Any] = {}
            # Recorded on the first status, and put right when the status names another (``ensure_children``).
            if (record and not parent.rayjob_name) or parent.rayjob_name not in (None, "", rayjob["metadata"]["name"]):
                patch = provisioning_status(rayjob["metadata"]["name"], parent.generation, self.clock(), parent.status)
            mirrored = map_status(
                rayjob.get("status"),
                {**parent.status, **patch},
                parent.observed_generation(rayjob),
                self.clock(),
                suspend=parent.suspend,
                rayjob_suspend=(rayjob.get("spec") or {}).get("suspend"),
                diagnosis=diagnosis,
            )
            try:
                self.write(parent, {**patch, **mirrored})
                return
            except ApiFailure as exc:
                if exc.status != 409 or attempt == CONFLICT_ATTEMPTS - 1:
                    raise
            fresh = self.kube.read(KIND, parent.namespace, parent.name)
            if fresh is None or fresh["metadata"].get("uid") != parent.uid:
                return
            parent = ParentJob.of(fresh)
            # The RayJob may have moved on too: deciding on the old one could send the phase backwards. One the job
            # does not control now has its name (it was replaced): never decide on that, converge reports it.
            current = self.kube.read(RAYJOB_KIND, parent.namespace, rayjob["metadata"]["name"])
            if current is not None and not controls(parent.uid, current):
                return
            if current is not None:
                rayjob = current

    def write(self, parent: ParentJob, patch: Mapping[str, Any]) -> None:
        """Patch the job's status (precondition: the resourceVersion ``parent`` was read at), announce what changed."""
        current = parent.status
        if not patch:
            metrics.record_phase(parent.uid, current.get("phase"))
            return
        version = parent.meta.get("resourceVersion")
        self.kube.patch_status(KIND, parent.namespace, parent.name, patch, resource_version=version)
        old, new = current.get("phase"), patch.get("phase", current.get("phase"))
        announced = phase_event(old, new, str(patch.get("message") or current.get("message") or ""))
        for event in (announced, diagnosis_event(current, patch)):
            if event is not None:
                self.emit(parent.body, *event)
        metrics.record_phase(parent.uid, new)

    def emit(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.sink(obj, type_, reason, message[:EVENT_MESSAGE_MAX])
