"""The reads behind "stuck jobs say why": a job's Ray pods and Warning Events, only while its cluster is being created.

``StuckReader.diagnose(rayjob)`` is what ``reconcile`` calls for each job at every resync round (every minute):
nothing for a RayJob that is not stuck (``diagnosis.is_stuck``: not yet picked up, suspended, running, finished),
else one labelled pod LIST (``ray.io/cluster=<status.rayClusterName>``, skipped while KubeRay has not named the
cluster) and the Warning Events about the RayJob and about its RayCluster, handed to ``diagnosis.diagnose``. The
Events are read through field selectors on ``involvedObject`` (kind, name, and the RayJob's uid), one LIST per
object: a busy namespace's other Warning Events are never transferred, once per stuck job and round.

Reading pods and Events is a nicety, never a reason to fail a job's resync: an operator upgraded without its new
RBAC (403) logs it once per namespace and resource and goes on without that half; any other failure is logged and
skipped, except a 429, which ends the resync round as every throttled call does.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

from finetune_operator.api.versions import RAYJOB_KIND
from finetune_operator.diagnosis import CLUSTER_KIND, CLUSTER_LABEL, Diagnosis, diagnose, is_stuck
from finetune_operator.failures import ApiFailure

log = logging.getLogger(__name__)

WARNING_EVENTS = "type=Warning"


def event_selectors(rayjob: dict[str, Any]) -> list[str]:
    """The field selectors of the Warning Events ``diagnose`` may use: those about the RayJob (this one: its uid, when
    known) and, once KubeRay has named it, about its RayCluster (a new name, hence a new cluster, every attempt)."""
    meta = rayjob.get("metadata") or {}
    about_job = f"{WARNING_EVENTS},involvedObject.kind={RAYJOB_KIND},involvedObject.name={meta.get('name')}"
    selectors = [about_job + (f",involvedObject.uid={meta['uid']}" if meta.get("uid") else "")]
    cluster = (rayjob.get("status") or {}).get("rayClusterName")
    if cluster:
        selectors.append(f"{WARNING_EVENTS},involvedObject.kind={CLUSTER_KIND},involvedObject.name={cluster}")
    return selectors


class PodsAndEvents(Protocol):
    """The two reads (``k8s.Kube``); each raises ``failures.ApiFailure``."""

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]: ...

    def list_events(self, namespace: str, field_selector: str) -> list[dict[str, Any]]: ...


class StuckReader:
    """Diagnoses stuck RayJobs through ``kube``, remembering which refusals it has already logged."""

    def __init__(self, kube: PodsAndEvents) -> None:
        self.kube = kube
        self._refused: set[tuple[str, str]] = set()
        self._lock = threading.Lock()  # the resync thread and Kopf's handler threads share one reader

    def diagnose(self, rayjob: dict[str, Any]) -> Diagnosis | None:
        """Why the RayJob's cluster is not up, or None when it is not stuck or neither read answered."""
        if not is_stuck(rayjob):
            return None
        namespace = str(rayjob["metadata"]["namespace"])
        cluster = (rayjob.get("status") or {}).get("rayClusterName")
        pods: list[dict[str, Any]] | None = []  # no cluster named yet: no pods to read, its Events may still say why
        if cluster:
            pods = self._read(namespace, "pods", lambda: self.kube.list_pods(namespace, f"{CLUSTER_LABEL}={cluster}"))
        events: list[dict[str, Any]] | None = []
        for selector in event_selectors(rayjob):
            found = self._read(namespace, "events", functools.partial(self.kube.list_events, namespace, selector))
            if found is None:  # refused or failed: the other LIST would fare alike this round; the pods may still speak
                events = None
                break
            events = [*(events or []), *found]
        if events is None and (pods is None or not cluster):
            return None  # nothing read: keep what the status says
        return diagnose(pods or [], events or [], rayjob, now=datetime.now(timezone.utc))

    def _read(self, namespace: str, resource: str, call: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]] | None:
        try:
            return call()
        except ApiFailure as exc:
            if exc.status == 429:
                raise
            if exc.status != 403:
                log.warning("could not list %s in %s to say why a job is stuck: %s", resource, namespace, exc)
                return None
            with self._lock:
                first = (namespace, resource) not in self._refused
                self._refused.add((namespace, resource))
            if first:  # an old install's RBAC: say it once, not every minute for every stuck job
                log.warning(
                    "the operator may not list %s in %s (grant `list` on %s in its RBAC, as the chart does) to say why "
                    "jobs are stuck; going on without: %s",
                    resource,
                    namespace,
                    resource,
                    exc,
                )
            return None


__all__ = ["PodsAndEvents", "StuckReader"]
