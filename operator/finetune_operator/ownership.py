"""Who a FineTuneJob is and what it owns: the typed view of a job body and the ownership rule for its children.

Pure (plain dicts in, typed answers out); ``reconcile`` applies these rules, the unit tests table them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator import naming
from finetune_operator.admission import AdmittedJob
from finetune_operator.api.v1alpha1 import TERMINAL_PHASES
from finetune_operator.api.versions import GROUP, KIND
from finetune_operator.failures import Conflict, Retry

OWNED_RETRY_SECONDS = 5.0


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

    def observed_generation(self, rayjob: Mapping[str, Any]) -> int | None:
        """The generation this status may claim to have acted on: the job's, once the RayJob carries its one mutable
        field (``runPolicy.suspend``, or a suspension Kueue holds), else the one already claimed. A RayJob event
        arriving between the user's flip and the operator's patch must not announce the new generation as done."""
        actual = bool((rayjob.get("spec") or {}).get("suspend"))
        queued = naming.LABEL_KUEUE_QUEUE in ((rayjob.get("metadata") or {}).get("labels") or {})
        if actual == self.suspend or (actual and queued and not self.suspend):
            return self.generation
        observed = self.status.get("observedGeneration")
        return observed if isinstance(observed, int) else None


def controller_of(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The FineTuneJob owner reference marked ``controller`` on ``obj``, if any."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return dict(ref)
    return None


def controls(uid: str | None, rayjob: Mapping[str, Any] | None) -> bool:
    """Whether ``rayjob`` is the job ``uid``'s: controlled by it and labelled with its uid (a renamed copy keeps both,
    which is why its name is checked by whoever asks)."""
    if rayjob is None or uid is None or (controller_of(rayjob) or {}).get("uid") != uid:
        return False
    return (rayjob["metadata"].get("labels") or {}).get(naming.LABEL_JOB_UID) == uid


def check_owner(existing: Mapping[str, Any], admitted: AdmittedJob) -> None:
    """An existing child is ours only when this job's uid controls it; what else it can be decides what to do.

    A 409 means "read it back and check", never "done": an earlier job of the same name (deleted, its
    children waiting for the garbage collector) → ``Retry``; another job whose name maps to the same
    child name → ``Conflict(NameCollision)``; an object no FineTuneJob controls → ``Conflict(ChildConflict)``.
    """
    meta = existing["metadata"]
    owner = controller_of(existing)
    if owner is not None and owner.get("uid") == admitted.metadata.uid:
        return
    what = f"{existing.get('kind')} {meta.get('namespace')}/{meta.get('name')}"
    if owner is not None and owner.get("name") == admitted.metadata.name:
        raise Retry(
            f"{what} still belongs to a deleted {KIND} of the same name; waiting for the garbage collector", OWNED_RETRY_SECONDS
        )
    if owner is not None:
        raise Conflict(
            "NameCollision",
            f"{what} belongs to {KIND} {owner.get('name')!r}: both job names map to this child's name; rename this job",
            kind=existing.get("kind"),
        )
    raise Conflict(
        "ChildConflict", f"{what} exists and no {KIND} controls it; delete it or rename this job", kind=existing.get("kind")
    )
