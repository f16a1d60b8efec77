"""Reconcile policy for FineTuneJobs: what the operator does about a job and the RayJob it owns.

``Reconciler(kube, settings)`` holds the rules; ``handlers`` only turns Kopf's events into calls and its
outcomes into Kopf's words. Pure in the sense that matters for tests: it speaks to the API server only
through the ``KubeApi`` protocol (``k8s.Kube`` in production, an in-memory fake in the unit tests) and
reports through an event callback, so every rule is unit-tested without Kopf or an emulator.

The rules:
- **reconcile** (job created, or found at start-up): ``admission.admit``; a refused job gets phase Failed,
  ``Validated=False`` with ``finetune validate``'s words and a Warning Event, and ``Refused`` is raised.
  An admitted one gets its children (``rayjob.build_children``), created idempotently (deterministic
  names; a 409 reads the existing object), then phase Provisioning and ``rayJobName``.
- **ensure_children**: a RayJob of the same name owned by another uid (an earlier job of the same name,
  not yet garbage-collected) means ``Retry``. The RayJob's ``spec.suspend`` follows the job's
  ``runPolicy.suspend``, except that with a Kueue ``queueName`` the operator never un-suspends a RayJob
  on its own: Kueue holds it suspended until admission (phase Pending, reason Queued).
- **suspend_changed**: the RayJob's ``spec.suspend`` follows the user's flag (idempotent).
- **mirror**: ``status.map_status`` writes the RayJob's state into the job's status subresource, with an
  Event on every phase change. ``resync`` does the same every minute, so a missed watch event heals.
- **recreate_if_gone**: a RayJob deleted under a live job is recreated (Warning Event ``RayJobRecreated``).
  Training resumes from the last checkpoint by construction (the run is named after the job), so
  recreating costs at most an epoch, whereas failing would throw away the run over what is usually a
  mistaken ``kubectl delete``; to stop a job, suspend or delete the FineTuneJob. Finished jobs are left
  alone, so KubeRay's clean-up or a user tidying up never resurrects them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from finetune_operator import metrics, naming
from finetune_operator.admission import AdmissionError, AdmittedJob, admit
from finetune_operator.api import timestamps
from finetune_operator.api.v1alpha1 import TERMINAL_PHASES
from finetune_operator.api.versions import GROUP, KIND, RAYJOB_KIND
from finetune_operator.failures import Refused, Retry
from finetune_operator.rayjob import build_children
from finetune_operator.settings import OperatorSettings
from finetune_operator.status import failed_status, map_status, phase_event, provisioning_status

log = logging.getLogger(__name__)

EVENT_MESSAGE_MAX = 1000
OWNED_RETRY_SECONDS = 5.0

EventSink = Callable[[Mapping[str, Any], str, str, str], None]
"""``emit(object, type, reason, message)``: records a Kubernetes Event about ``object``."""


class KubeApi(Protocol):
    """The API calls the rules make (``k8s.Kube``); each raises ``failures.ApiFailure`` naming the object."""

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create_or_get(self, obj: Mapping[str, Any], *, read_back: bool = True) -> tuple[dict[str, Any] | None, bool]: ...

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]: ...

    def patch_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]: ...


def log_event(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """The event sink outside a running operator (scripts, tests): a log line."""
    log.info("event %s %s on %s: %s", type_, reason, (obj.get("metadata") or {}).get("name"), message)


@dataclass(frozen=True)
class ParentJob:
    """The view of a FineTuneJob body that the rules read (the body itself is kept for Events)."""

    body: dict[str, Any]

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> ParentJob:
        return cls({key: body[key] for key in body})  # a Kopf body view → the plain dict it wraps

    @property
    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = self.body["metadata"]
        return meta

    @property
    def namespace(self) -> str:
        return str(self.meta["namespace"])

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def uid(self) -> str | None:
        return self.meta.get("uid")

    @property
    def generation(self) -> int | None:
        return self.meta.get("generation")

    @property
    def deleting(self) -> bool:
        return bool(self.meta.get("deletionTimestamp"))

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.body.get("status") or {})

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def rayjob_name(self) -> str | None:
        """The RayJob recorded in status: set once the children exist."""
        return self.status.get("rayJobName")

    @property
    def suspend(self) -> bool:
        return bool(((self.body.get("spec") or {}).get("runPolicy") or {}).get("suspend"))


def controller_of(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The FineTuneJob owner reference marked ``controller`` on ``obj``, if any."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return dict(ref)
    return None


class Reconciler:
    """The operator's rules over one API client and one settings object (see the module docstring)."""

    def __init__(
        self,
        kube: KubeApi,
        settings: OperatorSettings,
        *,
        emit: EventSink = log_event,
        clock: Callable[[], datetime] = timestamps.now,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.emit = emit
        self.clock = clock

    # ------------------------------------------------------------------------------- job events
    def reconcile(self, body: Mapping[str, Any]) -> None:
        """Admit, create the children if missing, report Provisioning (or mirror the RayJob after a restart)."""
        parent = ParentJob.of(body)
        if parent.finished:
            metrics.record_phase(parent.uid, parent.phase)
            return
        try:
            admitted = admit(parent.body, self.settings)
        except AdmissionError as exc:
            self._write_status(parent, failed_status("InvalidSpec", exc.lines, parent.generation, self.clock(), parent.status))
            self._emit(parent.body, "Warning", "InvalidSpec", "; ".join(exc.lines))
            raise Refused(f"{KIND} {parent.namespace}/{parent.name} is invalid: " + "; ".join(exc.lines)) from exc
        rayjob, created = self.ensure_children(admitted, known=bool(parent.rayjob_name))
        if created:
            self._emit(parent.body, "Normal", "RayJobCreated", f"created RayJob {rayjob['metadata']['name']}")
        first = provisioning_status(rayjob["metadata"]["name"], parent.generation, self.clock(), parent.status)
        self.mirror(parent, rayjob, first)

    def suspend_changed(self, body: Mapping[str, Any], wanted: bool) -> None:
        """Suspend or resume the RayJob (idempotent; a missing RayJob is reconcile's or resync's business)."""
        parent = ParentJob.of(body)
        if parent.finished:
            return
        rayjob_name = naming.rayjob_name(parent.name)
        rayjob = self.kube.read(RAYJOB_KIND, parent.namespace, rayjob_name)
        if rayjob is None or bool((rayjob.get("spec") or {}).get("suspend")) == wanted:
            return
        self.kube.patch(RAYJOB_KIND, parent.namespace, rayjob_name, {"spec": {"suspend": wanted}})
        verb = "suspending" if wanted else "resuming from the last checkpoint"
        reason = "Suspend" if wanted else "Resume"
        self._emit(parent.body, "Normal", reason, f"{verb}: RayJob {rayjob_name} spec.suspend={str(wanted).lower()}")

    def resync(self, body: Mapping[str, Any]) -> None:
        """Safety net for lost watch events: mirror the RayJob again, or recreate it if it is gone."""
        parent = ParentJob.of(body)
        if parent.finished or not parent.rayjob_name:
            return
        rayjob = self.kube.read(RAYJOB_KIND, parent.namespace, parent.rayjob_name)
        if rayjob is None:
            self.recreate_if_gone(parent)
        else:
            self.mirror(parent, rayjob)

    # ---------------------------------------------------------------------------- RayJob events
    def rayjob_changed(self, event_type: str | None, rayjob: Mapping[str, Any]) -> None:
        """Mirror a RayJob's status into its FineTuneJob; recreate it when deleted under a live job."""
        owner = controller_of(rayjob)
        if owner is None:
            return
        body = self.kube.read(KIND, rayjob["metadata"]["namespace"], owner["name"])
        if body is None:
            return
        parent = ParentJob.of(body)
        if parent.uid != owner.get("uid") or parent.deleting:
            return  # the job is gone or going: its children go too
        if not parent.rayjob_name:
            # The create handler is still on it and mirrors the RayJob itself when done; writing
            # Provisioning from here too would race it and announce the same transition twice.
            return
        if event_type == "DELETED":
            self.recreate_if_gone(parent)
        else:
            self.mirror(parent, rayjob)

    # ------------------------------------------------------------------------------------ rules
    def ensure_children(self, admitted: AdmittedJob, *, known: bool = False) -> tuple[dict[str, Any], bool]:
        """Create what is missing, in dependency order; (the RayJob, whether it was created now).

        ``known``: the job was handled before (a restart), so look for its RayJob first: it is created last,
        so when it exists the rest does too, and one GET replaces a conflicting POST per child.
        """
        children = build_children(admitted, self.settings)
        meta = children.rayjob["metadata"]
        rayjob = self.kube.read(RAYJOB_KIND, meta["namespace"], meta["name"]) if known else None
        created = False
        if rayjob is None:
            for obj in children.all():
                is_rayjob = obj is children.rayjob
                existing, made = self.kube.create_or_get(obj, read_back=is_rayjob)
                if is_rayjob and existing is not None:
                    rayjob, created = existing, made
        if rayjob is None:  # create_or_get reads the RayJob back or raises
            raise Retry(f"RayJob {meta['namespace']}/{meta['name']} could not be read back", OWNED_RETRY_SECONDS)
        if not created:
            owner = controller_of(rayjob)
            if owner is not None and owner.get("uid") != admitted.metadata.uid:
                what = f"RayJob {meta['namespace']}/{meta['name']}"
                raise Retry(f"{what} still belongs to a deleted {KIND}", OWNED_RETRY_SECONDS)
            wanted, actual = admitted.spec.run_policy.suspend, bool((rayjob.get("spec") or {}).get("suspend"))
            # With a Kueue queue, Kueue suspends the RayJob until admission: never un-suspend it behind its back.
            if wanted != actual and (wanted or not admitted.spec.runtime.queue_name):
                rayjob = self.kube.patch(RAYJOB_KIND, meta["namespace"], meta["name"], {"spec": {"suspend": wanted}})
        return rayjob, created

    def recreate_if_gone(self, parent: ParentJob) -> None:
        """The RayJob of a live job vanished: recreate it (see the module docstring for why)."""
        if parent.finished or not parent.rayjob_name:
            return
        try:
            admitted = admit(parent.body, self.settings)
        except AdmissionError:
            return
        rayjob, created = self.ensure_children(admitted)
        if created:
            message = (
                f"RayJob {rayjob['metadata']['name']} was deleted while the job was {parent.phase}; "
                "recreated it, training resumes from the last checkpoint"
            )
            self._emit(parent.body, "Warning", "RayJobRecreated", message)
        self.mirror(parent, rayjob)

    def mirror(self, parent: ParentJob, rayjob: Mapping[str, Any], first: Mapping[str, Any] | None = None) -> None:
        """Write ``first`` plus whatever the RayJob's status changes, in one status patch."""
        patch = dict(first or {})
        mirrored = map_status(
            rayjob.get("status"),
            {**parent.status, **patch},
            parent.generation,
            self.clock(),
            suspend=parent.suspend,
            rayjob_suspend=(rayjob.get("spec") or {}).get("suspend"),
        )
        self._write_status(parent, {**patch, **mirrored})

    def _write_status(self, parent: ParentJob, patch: Mapping[str, Any]) -> None:
        current = parent.status
        if not patch:
            metrics.record_phase(parent.uid, current.get("phase"))
            return
        self.kube.patch_status(KIND, parent.namespace, parent.name, patch)
        old, new = current.get("phase"), patch.get("phase", current.get("phase"))
        announced = phase_event(old, new, str(patch.get("message") or current.get("message") or ""))
        if announced is not None:
            self._emit(parent.body, *announced)
        metrics.record_phase(parent.uid, new)

    def _emit(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.emit(obj, type_, reason, message[:EVENT_MESSAGE_MAX])


__all__ = ["EventSink", "KubeApi", "ParentJob", "Reconciler", "controller_of", "log_event"]
