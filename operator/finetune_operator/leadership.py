"""Leader election over a coordination.k8s.io/v1 Lease: which replica reconciles, and when it must stop.

This module owns the rule (``decide``: take, renew or wait, from the Lease and what this replica saw of it)
and the loop (``LeaderElector``) that applies it every retry period and calls ``on_started`` / ``on_stopped``.
It speaks to the API through ``LeaseApi`` (``k8s.Kube`` in the operator, a fake in unit tests) and imports
neither Kopf nor the Kubernetes client; ``handlers`` wires it to Kopf.

The semantics are client-go's (k8s.io/client-go/tools/leaderelection), which every Kubernetes controller uses:

* A standby judges a Lease by its own monotonic clock, never by the timestamps in it: the Lease is free when
  its record (holder, renew time, resourceVersion) has not changed for ``leaseDurationSeconds`` since this
  replica first saw that record. Clock skew between nodes therefore cannot cut a leader's term short.
* Every write carries the resourceVersion that was read, so of two standbys taking over at once one gets 409.
* Fencing: a leader that has not renewed for ``renew_deadline`` (< lease duration) stops reconciling, so it has
  stopped before any standby may consider the Lease free. A leader that sees another holder stops at once.
* A replica that stops on purpose clears the holder, so a standby takes over at its next try instead of
  after the lease duration.
* ``leaseDurationSeconds`` is an integer: a fractional duration is written rounded up, never down, so that the
  others wait at least as long as this replica counts on.
* A Lease that vanishes (deleted by hand, a namespace cleanup) is lost leadership: its leader steps down before it
  creates the Lease again (409 if another replica was first), and a standby that saw another replica hold it waits
  the lease duration before creating it, as if the record had changed to "none": that holder may still be reconciling.
* A fenced write must land before the lease could pass to another replica: ``Fenced`` bounds each write's request
  timeout by what is left of the lease (``LeaderElector.remaining``), not the 30 s a handler's read may take.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from finetune_operator.failures import ApiFailure, Retry

log = logging.getLogger(__name__)


class LeaseApi(Protocol):
    """The three Lease calls of the election (RBAC: get, create, update on leases)."""

    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]: ...

    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]: ...


class Action(enum.Enum):
    CREATE = "create"  # there is no Lease yet
    RENEW = "renew"  # ours
    TAKE = "take"  # released, or not renewed for its duration: take it over
    WAIT = "wait"  # another replica holds it and keeps renewing


@dataclass(frozen=True)
class Observed:
    """A Lease's record as this replica last saw it, and when (its own monotonic clock) that record first appeared."""

    record: tuple[str, str, str]
    since: float


# The record of a Lease that was there and is gone: no holder and a resourceVersion no API server writes.
GONE: tuple[str, str, str] = ("", "", "<gone>")


def record_of(lease: Mapping[str, Any]) -> tuple[str, str, str]:
    spec = lease.get("spec") or {}
    meta = lease.get("metadata") or {}
    return (str(spec.get("holderIdentity") or ""), str(spec.get("renewTime") or ""), str(meta.get("resourceVersion") or ""))


def decide(
    lease: Mapping[str, Any] | None, identity: str, observed: Observed | None, now: float, default_duration: float
) -> tuple[Action, Observed | None]:
    """What ``identity`` does with ``lease`` at ``now`` (monotonic), and what it remembers of the Lease for next time."""
    if lease is None:
        if observed is None or (observed.record != GONE and observed.record[0] in ("", identity)):
            return Action.CREATE, None  # none seen yet, or ours or released: nobody else may be leading
        if observed.record != GONE:
            observed = Observed(GONE, now)  # another replica held it: it may still lead until its term runs out
        if now - observed.since >= default_duration:
            return Action.CREATE, observed
        return Action.WAIT, observed
    record = record_of(lease)
    if observed is None or observed.record != record:
        observed = Observed(record, now)  # a change: the holder is alive, its term starts again on our clock
    holder = record[0]
    if holder == identity:
        return Action.RENEW, observed
    if not holder:
        return Action.TAKE, observed
    duration = (lease.get("spec") or {}).get("leaseDurationSeconds") or default_duration
    if now - observed.since >= float(duration):
        return Action.TAKE, observed
    return Action.WAIT, observed


def lease_seconds(duration: float) -> int:
    """``leaseDurationSeconds`` of a duration: rounded up (a 2.5 s lease written as 2 lets others take over early)."""
    return max(1, math.ceil(duration))


def micro_time(moment: datetime) -> str:
    """A Kubernetes MicroTime (``2026-01-02T03:04:05.000006Z``)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Timing:
    """The election's three durations, in seconds (``settings.OperatorSettings`` checks their order)."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


class LeaderElector:
    """Campaigns for ``namespace/name`` as ``identity``; ``run(stop)`` loops until ``stop`` is set.

    ``on_started`` is called when this replica becomes the leader (a new ``term``), ``on_stopped`` when it stops
    being one: lost, fenced by the renew deadline, stopping, or ``healthy()`` false while leading; neither may block
    for long. ``leading`` may be read from any thread; it turns false on its own once the last renewal is older than
    the renew deadline, even between two tries.
    """

    def __init__(
        self,
        leases: LeaseApi,
        namespace: str,
        name: str,
        identity: str,
        *,
        timing: Timing = Timing(),
        on_started: Callable[[], None] = lambda: None,
        on_stopped: Callable[[], None] = lambda: None,
        healthy: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.leases, self.namespace, self.name, self.identity = leases, namespace, name, identity
        self.timing, self.on_started, self.on_stopped, self.healthy = timing, on_started, on_stopped, healthy
        self.clock, self.wall_clock = clock, wall_clock
        self._observed: Observed | None = None
        self._renewed_at: float | None = None  # when the last successful write started; None: not leading
        self._downs = 0  # step-downs so far: a renewal that a step-down overtook does not count
        self.term = 0  # terms led so far: the work of an earlier term stays fenced (``leads``) when a new one begins
        self._lock = threading.Lock()
        self._transition = threading.Lock()  # one start or stop at a time, whichever thread sees it

    @property
    def leading(self) -> bool:
        with self._lock:
            renewed = self._renewed_at
        return renewed is not None and self.clock() - renewed < self.timing.renew_deadline

    def leads(self, term: int) -> bool:
        """Whether this replica leads and is still in ``term`` (what the fence of that term's work asks)."""
        return self.term == term and self.leading

    def remaining(self, term: int) -> float:
        """Seconds until another replica may take the Lease over (0: not leading in ``term``): a write of ``term``'s
        work must have landed by then. Counted from the start of the last renewal that succeeded: the others start
        counting the lease duration only once they see that renewal, which is later."""
        with self._lock:
            renewed = self._renewed_at
        if renewed is None or self.term != term or not self.leading:
            return 0.0
        return max(0.0, renewed + self.timing.lease_duration - self.clock())

    def run(self, stop: threading.Event) -> None:
        """Try, renew or wait every retry period until ``stop``; then step down and release the Lease."""
        # The deadline is also watched from a thread of its own: a renewal hanging on a dead connection must not
        # keep this replica reconciling past the renew deadline.
        fence = threading.Thread(target=self._fence, args=(stop,), name="finetune-lease-fence", daemon=True)
        fence.start()
        try:
            while not stop.is_set():
                self.step()
                stop.wait(self.timing.retry_period)
        finally:
            stop.set()
            fence.join()
            if self._step_down("stopping"):
                self.release()

    def _fence(self, stop: threading.Event) -> None:
        while not stop.wait(min(0.5, self.timing.retry_period / 2)):
            self.check_deadline()

    def check_deadline(self) -> None:
        """Step down if the last renewal is older than the renew deadline."""
        with self._lock:
            renewed = self._renewed_at
        if renewed is not None and self.clock() - renewed >= self.timing.renew_deadline:
            self._step_down(f"the Lease was not renewed for {self.timing.renew_deadline:g}s")

    def step(self) -> None:
        """One try: acquire or renew; step down when another replica holds the Lease or the deadline has passed."""
        if self._renewed_at is not None and not self.healthy():
            # Leading without reconciling helps nobody: hand the Lease on (a next try may take it back).
            if self._step_down("the reconciling operator stopped"):
                self.release()
            return
        started, downs = self.clock(), self._downs
        held = self._try(started)
        if held:
            with self._transition:
                with self._lock:
                    if downs != self._downs:  # stepped down meanwhile (the deadline): the next try starts afresh
                        return
                    was_leading, self._renewed_at = self._renewed_at is not None, started
                if not was_leading:
                    self.term += 1
                    log.info("leader election: %s leads (Lease %s/%s)", self.identity, self.namespace, self.name)
                    self.on_started()
        elif held is False:
            self._step_down("another replica holds the Lease")
        else:
            self.check_deadline()

    def _try(self, now: float) -> bool | None:
        """True: this replica holds the Lease now; False: another does; None: the API failed (unknown)."""
        try:
            lease = self.leases.read_lease(self.namespace, self.name)
            action, self._observed = decide(lease, self.identity, self._observed, now, self.timing.lease_duration)
            if action is Action.WAIT:
                return False
            if lease is None and self._step_down("the Lease is gone (deleted)"):
                # Another replica may create it right now: stop first; the create below (409 if it was faster)
                # starts a new term at the next try.
                self._observed = None
            if lease is None:
                self.leases.create_lease(self.namespace, self._body(None))
            else:
                self.leases.replace_lease(self.namespace, self.name, self._body(lease))
            return True
        except ApiFailure as exc:  # 409: another replica wrote first; the next read tells who
            log.warning("leader election: Lease %s/%s: %s", self.namespace, self.name, exc)
            return None

    def _body(self, lease: Mapping[str, Any] | None) -> dict[str, Any]:
        now = micro_time(self.wall_clock())
        spec: dict[str, Any] = dict((lease or {}).get("spec") or {})
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            metadata["resourceVersion"] = (lease.get("metadata") or {}).get("resourceVersion")
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if lease is not None else 0)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=lease_seconds(self.timing.lease_duration), renewTime=now)
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    def _step_down(self, why: str) -> bool:
        """Stop leading (once, whichever thread sees it first); False if this replica was not leading."""
        with self._transition:
            with self._lock:
                if self._renewed_at is None:
                    return False
                self._renewed_at, self._downs = None, self._downs + 1
            log.warning("leader election: %s stops leading: %s", self.identity, why)
            self.on_stopped()
        return True

    def release(self) -> None:
        """Clear the holder if it is still this replica, so that a standby takes over at its next try."""
        try:
            lease = self.leases.read_lease(self.namespace, self.name)
            if lease is None or record_of(lease)[0] != self.identity:
                return
            body = self._body(lease)
            body["spec"]["holderIdentity"] = None
            body["spec"]["leaseDurationSeconds"] = 1
            self.leases.replace_lease(self.namespace, self.name, body)
        except ApiFailure as exc:  # the standby takes over after the lease duration instead
            log.warning("leader election: could not release Lease %s/%s: %s", self.namespace, self.name, exc)


class LeaderWork:
    """``work(stop)`` (Kopf's reconciling operator) in a thread of its own, started and stopped by the elector."""

    def __init__(self, work: Callable[[threading.Event], None], *, stop_timeout: float = 10.0) -> None:
        self.work, self.stop_timeout = work, stop_timeout
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start a new run now; an earlier one still stopping is left to finish (its term's writes are fenced)."""
        self._stop.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="finetune-leader", daemon=True)
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        try:
            self.work(stop)
        except Exception:  # the elector notices (alive is False) and hands the Lease on
            log.exception("the reconciling operator failed")

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(self.stop_timeout)
            if thread.is_alive():
                log.error("the reconciling operator did not stop within %gs", self.stop_timeout)


class Fenced:
    """The reconciling operator's API client (``reconcile.KubeApi``): reads pass, writes are refused once this replica
    does not lead. Kopf takes a moment to stop; a handler still running then must not write over the new leader's
    work, so its create or patch raises ``failures.Retry`` (Kopf's own annotations are the one thing left unfenced).
    ``remaining`` (the lease left to this term, ``LeaderElector.remaining``) bounds each write's request timeout
    through ``kube.within``: a write sent while leading cannot be answered after another replica may lead."""

    def __init__(self, kube: Any, leading: Callable[[], bool], remaining: Callable[[], float] | None = None) -> None:
        self.kube, self.leading, self.remaining = kube, leading, remaining

    def _check(self, what: str) -> Any:
        """The client for the write (``kube.within`` the lease left, when ``remaining`` is given); Retry when not leading."""
        left = self.remaining() if self.remaining is not None else None
        if not self.leading() or (left is not None and left <= 0):
            raise Retry(f"{what}: this replica is not the leader any more; the leader takes the job over", delay=1.0)
        return self.kube if left is None else self.kube.within(left)

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.kube.read(kind, namespace, name)
        return found

    def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.kube.list_jobs(namespace)
        return jobs

    def list_labelled(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.kube.list_labelled(kind, namespace, selector)
        return found

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = self.kube.list_pods(namespace, label_selector)
        return pods

    def list_events(self, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.kube.list_events(namespace, field_selector)
        return events

    def post_event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str, *, component: str) -> None:
        self._check(f"post Event {reason}").post_event(obj, type_, reason, message, component=component)

    def create_or_get(self, obj: Mapping[str, Any], *, read_back: bool = True) -> tuple[dict[str, Any] | None, bool]:
        kube = self._check(f"create {obj['kind']} {obj['metadata']['namespace']}/{obj['metadata']['name']}")
        result: tuple[dict[str, Any] | None, bool] = kube.create_or_get(obj, read_back=read_back)
        return result

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        kube = self._check(f"patch {kind} {namespace}/{name}")
        patched: dict[str, Any] = kube.patch(kind, namespace, name, patch)
        return patched

    def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any], *, resource_version: str | None = None
    ) -> dict[str, Any]:
        kube = self._check(f"patch {kind} {namespace}/{name} status")
        patched: dict[str, Any] = kube.patch_status(kind, namespace, name, status, resource_version=resource_version)
        return patched
