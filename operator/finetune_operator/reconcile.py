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
  ``runPolicy.suspend``; with a Kueue ``queueName`` through Kueue's Workload (``suspension``).
- **suspend_changed**: the RayJob's ``spec.suspend`` follows the user's flag (idempotent).
- **mirror**: ``status.map_status`` writes the RayJob's state into the job's status subresource, with an
  Event on every phase change (the writing, its 409 retries and its Events: ``status_writer``). ``resync`` does
  the same every minute, so a missed watch event heals; a job that never got its children is started by it at
  ``failures.retry_delay``'s pace, as Kopf retries it (``_start_late``).
- **diagnose**: at every resync, a job whose RayJob waits for its Ray cluster (``diagnosis.is_stuck``) gets its
  pods and Warning Events read (``stuck.StuckReader``): what holds it up goes into ``ClusterReady=False`` and the
  message, with a Warning Event once per reason. Running and finished jobs cost no read.
- **recreate_if_gone**: a RayJob deleted under a live job is recreated (Warning Event ``RayJobRecreated``).
  Training resumes from the last checkpoint by construction (the run is named after the job), so
  recreating costs at most an epoch, whereas failing would throw away the run over what is usually a
  mistaken ``kubectl delete``; to stop a job, suspend or delete the FineTuneJob. Finished jobs are left
  alone, so KubeRay's clean-up or a user tidying up never resurrects them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol

from finetune_operator import metrics, naming, suspension
from finetune_operator.admission import AdmissionError, AdmittedJob, admit
from finetune_operator.api import timestamps
from finetune_operator.api.versions import KIND, RAYJOB_KIND
from finetune_operator.diagnosis import Diagnosis
from finetune_operator.failures import ApiFailure, Conflict, Refused, Retry, api_failure_verdict, retry_delay
from finetune_operator.ownership import OWNED_RETRY_SECONDS, ParentJob, check_owner, controller_of, controls
from finetune_operator.rayjob import build_children
from finetune_operator.settings import OperatorSettings
from finetune_operator.status import blocked_status, failed_status, lost_rayjob_status
from finetune_operator.status_writer import CONFLICT_ATTEMPTS, EventSink, StatusApi, StatusWriter, log_event
from finetune_operator.stuck import PodsAndEvents, StuckReader

log = logging.getLogger(__name__)


class KubeApi(StatusApi, PodsAndEvents, Protocol):
    """The API calls the rules make (``k8s.Kube``); each raises ``failures.ApiFailure`` naming the object."""

    def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]: ...

    def list_labelled(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]: ...

    def create_or_get(self, obj: Mapping[str, Any], *, read_back: bool = True) -> tuple[dict[str, Any] | None, bool]: ...

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]: ...


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
        self.stuck = StuckReader(kube)
        self.writer = StatusWriter(kube, emit=emit, clock=clock)
        self._late_starts: dict[str, tuple[int, datetime]] = {}  # uid: (failed starts, not before); ``_start_late``

    # ------------------------------------------------------------------------------- job events
    def reconcile(self, body: Mapping[str, Any]) -> None:
        """Admit, create the children if missing, report Provisioning (or converge after a restart)."""
        parent = ParentJob.of(body)
        if parent.finished:
            metrics.record_phase(parent.uid, parent.phase)
            return
        try:
            admitted = admit(parent.body, self.settings)
        except AdmissionError as exc:
            if (running := self._started(parent)) is not None:  # admitted under laxer rules: follow it, never fail it
                self.writer.emit(parent.body, "Warning", "NoLongerValid", "; ".join(exc.lines))
                self.mirror(parent, running)
                return
            self.writer.write(parent, failed_status("InvalidSpec", exc.lines, parent.generation, self.clock(), parent.status))
            self.writer.emit(parent.body, "Warning", "InvalidSpec", "; ".join(exc.lines))
            raise Refused(f"{KIND} {parent.namespace}/{parent.name} is invalid: " + "; ".join(exc.lines)) from exc
        if not self._still_there(parent):
            return
        rayjob, created = self._ensure(parent, admitted, fresh=not parent.rayjob_name)
        if created:
            self.writer.emit(parent.body, "Normal", "RayJobCreated", f"created RayJob {rayjob['metadata']['name']}")
        self.mirror(parent, rayjob, record=True)

    def _still_there(self, parent: ParentJob) -> bool:
        """Whether the job still exists as this uid and is not being deleted.

        Checked by the create/resume handler before anything else: Kopf can hand it the last body of a job
        deleted meanwhile (the DELETED event of a job it had not finished with looks like a creation when no
        finalizer holds the job), and children must never be created for a job that is gone.
        """
        current = self.kube.read(KIND, parent.namespace, parent.name)
        return current is not None and current["metadata"].get("uid") == parent.uid and not ParentJob.of(current).deleting

    def suspend_changed(self, body: Mapping[str, Any], wanted: bool) -> None:
        """Suspend or resume the RayJob (idempotent; a missing RayJob is reconcile's or resync's business). Only a
        RayJob this job controls: the name comes from the status, which the job's trainer may write, and another
        job's RayJob named there must not be suspended (or its Ray cluster torn down, again and again)."""
        parent = ParentJob.of(body)
        if parent.finished:
            return
        rayjob = self._started(parent)
        if rayjob is not None:
            self._align_suspend(parent.body, wanted, rayjob)

    def resync(self, body: Mapping[str, Any]) -> None:
        """Safety net for lost watch events: check every child (recreating what is gone), mirror the RayJob."""
        parent = ParentJob.of(body)
        if parent.finished or parent.deleting:
            return
        if not parent.rayjob_name:  # never got its children (a handler Kopf dropped, a failure): start it now
            self._start_late(parent)
            return
        self.converge(parent)

    def _start_late(self, parent: ParentJob) -> None:
        """``reconcile`` a job that never got its children, from the resync round, at ``failures.retry_delay``'s pace.

        Such a job is usually blocked (KubeRay missing, RBAC, a throttled API server) and Kopf's handler retries it
        at growing delays already: a round that started it anew every minute, with a POST per child, would undo
        that back-off for every blocked job at once. A job whose last start here failed waits out its delay.
        """
        uid = str(parent.uid)
        failures, not_before = self._late_starts.get(uid, (0, None))
        if not_before is not None and self.clock() < not_before:
            return
        try:
            self.reconcile(parent.body)
        except (ApiFailure, Retry) as exc:
            self._late_starts[uid] = (failures + 1, self.clock() + timedelta(seconds=retry_delay(failures, exc)))
            raise
        self._late_starts.pop(uid, None)

    def resync_all(self, namespaces: tuple[str, ...] = ()) -> int:
        """``resync`` every job in ``namespaces`` (empty: all), one LIST each; the jobs it could not resync.

        The operator's safety net, run every minute by a thread of its own rather than a Kopf timer: Kopf puts
        a finalizer on every object that has a timer, and deleting a job must never wait for the operator.
        One job's failure is logged and never stops the others. After complete LISTs, the per-job series of jobs
        no longer listed go (a DELETED event lost across a watch reconnect).
        """
        failed, mark, live, complete = 0, metrics.JOB_SERIES.mark(), set[str](), True
        for namespace in namespaces or (None,):
            try:
                listed = self.kube.list_jobs(namespace)
            except ApiFailure as exc:  # one namespace refused (its Role gone, throttled): the others still get their round
                log.warning("resync could not list %s in %s: %s", KIND, namespace or "all namespaces", exc)
                failed, complete = failed + 1, False
                if exc.status == 429:
                    return failed
                continue
            live.update(str((item.get("metadata") or {}).get("uid")) for item in listed)
            for item in listed:
                meta = item.get("metadata") or {}
                try:
                    # The list may be a minute old by this job's turn: act on the job as it is now, or not at all.
                    body = self.kube.read(KIND, meta.get("namespace", ""), meta.get("name", ""))
                    if body is not None and body["metadata"].get("uid") == meta.get("uid"):
                        self.resync(body)
                except ApiFailure as exc:
                    failed += 1
                    log.warning("resync of %s %s/%s failed: %s", KIND, meta.get("namespace"), meta.get("name"), exc)
                    if exc.status == 429:  # the API server asks for less: end the round here
                        return failed
                except Exception as exc:  # one job's surprise never stops the others'
                    failed += 1
                    log.warning("resync of %s %s/%s failed: %s", KIND, meta.get("namespace"), meta.get("name"), exc)
        if complete:
            metrics.JOB_SERIES.prune(live, mark)
            self._late_starts = {uid: due for uid, due in self._late_starts.items() if uid in live}
        return failed

    # ---------------------------------------------------------------------------- RayJob events
    def rayjob_changed(self, event_type: str | None, rayjob: Mapping[str, Any]) -> None:
        """Mirror a RayJob's status into its FineTuneJob; recreate it when deleted under a live job.

        Only the RayJob the job's status names, labelled with the job's uid and controlled by it, speaks for
        the job: a renamed copy (``kubectl get -o yaml``, rename, apply) keeps the owner reference and labels
        but not the name, and must never turn the job Failed.
        """
        owner = controller_of(rayjob)
        if owner is None:
            return
        meta = rayjob["metadata"]
        body = self.kube.read(KIND, meta["namespace"], owner["name"])
        if body is None:
            return
        parent = ParentJob.of(body)
        if parent.uid != owner.get("uid") or parent.deleting:
            return  # the job is gone or going: its children go too
        expected = parent.rayjob_name or naming.rayjob_name(parent.name)
        if meta.get("name") != expected or (meta.get("labels") or {}).get(naming.LABEL_JOB_UID) != parent.uid:
            log.warning("ignoring RayJob %s/%s: not the RayJob of %s %s", meta["namespace"], meta.get("name"), KIND, parent.name)
            return
        if event_type == "DELETED":
            # Its last status first: a RayJob deleted after it finished (TTL, a tidy user) is not run again.
            self.mirror(parent, rayjob)
            after = self.kube.read(KIND, parent.namespace, parent.name)
            if after is not None and after["metadata"].get("uid") == parent.uid:
                self.converge(ParentJob.of(after))
            return
        # Before the create handler has recorded the RayJob, its first status may already be here: mirror
        # it now with the name, or it is lost until the next resync. The status precondition settles the
        # race with the handler's own write (the loser re-reads and announces nothing twice).
        self.mirror(parent, rayjob, record=True)

    # ------------------------------------------------------------------------------------ rules
    def converge(self, parent: ParentJob) -> None:
        """Check every child of an admitted, live job: recreate what is gone (a deleted RayJob included, see the
        module docstring), refuse what is not ours, then mirror the RayJob. Not for a job being deleted: its children
        go with it (a RayJob's DELETED event can read the job live, then again as a `kubectl delete` begins)."""
        if parent.finished or parent.deleting or not parent.rayjob_name:
            return
        try:
            admitted = admit(parent.body, self.settings)
        except AdmissionError as exc:
            if (running := self._started(parent)) is not None:  # rules grew stricter since: keep mirroring its RayJob
                self.mirror(parent, running, diagnosis=self.stuck.diagnose(running))
            else:  # its RayJob is gone (never recreated against today's rules), or it was never admitted at all
                lines = [*exc.lines, "no RayJob of this job exists, so none is started under the operator's current rules"]
                self.writer.write(parent, failed_status("InvalidSpec", lines, parent.generation, self.clock(), parent.status))
                self.writer.emit(parent.body, "Warning", "InvalidSpec", "; ".join(lines))
            return
        rayjob, created = self._ensure(parent, admitted, fresh=False)
        if created:
            message = (
                f"RayJob {rayjob['metadata']['name']} was deleted while the job was {parent.phase}; "
                "recreated it, training resumes from the last checkpoint"
            )
            self.writer.emit(parent.body, "Warning", "RayJobRecreated", message)
        self.mirror(parent, rayjob, diagnosis=self.stuck.diagnose(rayjob))

    def _started(self, parent: ParentJob) -> dict[str, Any] | None:
        """The job's RayJob when one exists, controlled and labelled by this job's uid: the only proof that this
        operator admitted the job. Its status is none (the trainer's Role may patch it: ``Validated=True`` or a
        ``rayJobName`` there could have been written by a stale pod of a deleted namesake)."""
        rayjob = self.kube.read(RAYJOB_KIND, parent.namespace, parent.rayjob_name or naming.rayjob_name(parent.name))
        return rayjob if controls(parent.uid, rayjob) else None

    def ensure_children(
        self, admitted: AdmittedJob, *, fresh: bool = True, parent: ParentJob | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Every child exists and is this job's; (the RayJob, whether it was created now).

        ``fresh``: a job seen for the first time, so create first (a 409 reads the object back); otherwise
        (restart, resync) read first and create only what is missing, so a healthy job costs GETs, not POSTs.
        An existing child must be controlled by this job's uid (``ownership.check_owner``), or nothing goes on.
        A job whose status records another RayJob name keeps it while a RayJob of that name is this job's (an older
        operator may have named it differently); any other name there is ignored, since the job's trainer may write
        the status: a RayJob is only ever created under the job's own name (a made-up name once created an extra Ray
        cluster at every resync, and another job's future name stole it). A started job gets no NetworkPolicy it
        was not started with: its running pods may not carry the labels the policy admits.
        """
        children = build_children(admitted, self.settings)
        recorded = parent.rayjob_name if parent is not None else None
        if recorded and recorded != children.rayjob["metadata"]["name"]:
            legacy = self.kube.read(RAYJOB_KIND, admitted.metadata.namespace or "", recorded)
            if controls(admitted.metadata.uid, legacy):
                children.rayjob["metadata"]["name"] = recorded
        running = (
            None if fresh else self.kube.read(RAYJOB_KIND, admitted.metadata.namespace or "", children.rayjob["metadata"]["name"])
        )
        rayjob: dict[str, Any] | None = None
        created = False
        for obj in children.all():
            meta = obj["metadata"]
            existing: dict[str, Any] | None
            if obj is children.rayjob and running is not None:
                existing, made = running, False
            else:
                existing = None if fresh else self.kube.read(obj["kind"], meta["namespace"], meta["name"])
                made = False
                if existing is None and running is not None and obj is children.network_policy:
                    continue
                if existing is None:
                    existing, made = self.kube.create_or_get(obj)
            if existing is None:  # create_or_get reads back or raises; keep mypy and a broken fake honest
                raise Retry(f"{obj['kind']} {meta['namespace']}/{meta['name']} could not be read back", OWNED_RETRY_SECONDS)
            if not made:
                check_owner(existing, admitted)
            if obj is children.rayjob:
                rayjob, created = existing, made
        assert rayjob is not None  # the RayJob is always among the children
        if not created:
            about = parent.body if parent is not None else {"kind": KIND, "metadata": admitted.metadata.model_dump()}
            rayjob = self._align_suspend(about, admitted.spec.run_policy.suspend, rayjob)
        return rayjob, created

    def _align_suspend(self, about: Mapping[str, Any], wanted: bool, rayjob: dict[str, Any]) -> dict[str, Any]:
        """The RayJob's suspension follows the job's (``suspension.align``: through Kueue for a queued job)."""
        rayjob, announced = suspension.align(self.kube, rayjob, wanted)
        if announced is not None:
            self.writer.emit(about, "Normal", *announced)
        return rayjob

    def _ensure(self, parent: ParentJob, admitted: AdmittedJob, *, fresh: bool) -> tuple[dict[str, Any], bool]:
        """``ensure_children``, with what people must know written into the job's status.

        Before a job has its RayJob, a failure decides its phase (Pending while people fix RBAC or install
        KubeRay, Failed when the API refuses it for good). A job whose RayJob exists keeps its phase whatever
        a later check meets: a Warning Event says what is wrong and the next round tries again, so a running
        job is never failed or sent back to Pending over a child.
        """
        try:
            return self.ensure_children(admitted, fresh=fresh, parent=parent)
        except Conflict as exc:
            if parent.rayjob_name:
                if exc.kind == RAYJOB_KIND:  # its RayJob is gone and another object has its name: say so
                    self.writer.write(
                        parent, lost_rayjob_status(exc.reason, str(exc), parent.generation, self.clock(), parent.status)
                    )
                self.writer.emit(parent.body, "Warning", exc.reason, str(exc))
                raise Retry(str(exc), OWNED_RETRY_SECONDS) from exc
            self._give_up(parent, exc.reason, str(exc))
            raise AssertionError("unreachable") from exc  # _give_up raises
        except ApiFailure as exc:
            verdict = api_failure_verdict(exc)
            if verdict is None:
                raise
            reason, message, permanent = verdict
            if parent.rayjob_name:
                self.writer.emit(parent.body, "Warning", reason, message)
                raise
            if permanent:
                self._give_up(parent, reason, message)
            self.writer.write(parent, blocked_status(reason, message, parent.generation, self.clock(), parent.status))
            raise

    def _give_up(self, parent: ParentJob, reason: str, message: str) -> None:
        """Fail a valid job that can never start as it is; raises ``Refused``."""
        self.writer.write(parent, failed_status(reason, [message], parent.generation, self.clock(), parent.status, invalid=False))
        self.writer.emit(parent.body, "Warning", reason, message)
        raise Refused(f"{KIND} {parent.namespace}/{parent.name}: {message}")

    def mirror(
        self, parent: ParentJob, rayjob: Mapping[str, Any], *, record: bool = False, diagnosis: Diagnosis | None = None
    ) -> None:
        """Bring the job's status in line with the RayJob's (``status_writer.StatusWriter.mirror``)."""
        self.writer.mirror(parent, rayjob, record=record, diagnosis=diagnosis)


__all__ = ["CONFLICT_ATTEMPTS", "KubeApi", "Reconciler"]  # CONFLICT_ATTEMPTS: status_writer's, the tests read it here
