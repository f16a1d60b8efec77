"""Job-level Prometheus series: one set per FineTuneJob, labelled ``namespace`` and ``name``.

``JobSeries`` is a prometheus_client collector over the latest body of every live job: ``observe(body)`` on each
watch event, ``forget`` on DELETED, ``clear`` when this replica stops leading, and ``prune`` after each resync
round's LIST: a DELETED event missed across a watch reconnect must not leave a job's series forever. Values are
computed at scrape time (a running job's duration grows between events), so nothing is stored but what the job's own
status says (and, for a suspended job without its condition yet, when the suspension was first seen).

Why the operator exports these and not a kube-state-metrics CustomResourceState configuration: durations need
"now" and the difference of two timestamps, which CustomResourceState cannot compute, and many clusters run a
kube-state-metrics they cannot re-configure or grant the CRD's list/watch. See docs/platform.md.

Cardinality: the labels are namespace and name (never uid), the phase series are the six phases, and a job's
series go when the job is deleted — the store holds live jobs only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from finetune_operator.api.v1alpha1 import Phase

LABELS: Final = ("namespace", "name")
PHASE: Final = "finetune_job_status_phase"
QUEUED: Final = "finetune_job_queued_seconds"
DURATION: Final = "finetune_job_duration_seconds"
BEST_ACCURACY: Final = "finetune_job_best_val_accuracy"
IMAGES_PER_SECOND: Final = "finetune_job_images_per_second"
GPUS: Final = "finetune_job_gpus"
FAMILIES: Final = {
    PHASE: "1 for the job's current phase, 0 for the others (kube-state-metrics' kube_pod_status_phase shape).",
    QUEUED: "Seconds from creation until training started (counting while it has not, except while Suspended; "
    "frozen if it never ran).",
    DURATION: "Seconds since training started (status.startTime) until status.completionTime, until the job was "
    "suspended while it is Suspended, or until now.",
    BEST_ACCURACY: "Best top-1 validation accuracy so far (status.metrics.bestValAccuracy, 0-1).",
    IMAGES_PER_SECOND: "Training throughput of the last epoch, all workers together (status.metrics.imagesPerSecond).",
    GPUS: "GPUs the job requests: resources.workers x resources.gpusPerWorker.",
}
"""Every series name this module exports, with its HELP text (the chart's dashboard may name only these)."""


@dataclass(frozen=True)
class JobSample:
    """What the series of one job are computed from (epoch seconds; None: not known or not yet)."""

    uid: str
    namespace: str
    name: str
    phase: str | None
    created: float | None
    started: float | None
    completed: float | None
    suspended: float | None
    """When the job was suspended, while its phase is Suspended: the clocks stop there (``JobSeries.collect``)."""
    best_val_accuracy: float | None
    images_per_second: float | None
    gpus: int


def _epoch(value: Any) -> float | None:
    """An RFC 3339 timestamp as epoch seconds; anything else (a hand-edited status) is treated as unknown."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _count(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _suspended_at(phase: Any, status: Mapping[str, Any]) -> float | None:
    """While Suspended, when that began: the Suspended condition's lastTransitionTime (None when unknown)."""
    if phase != Phase.SUSPENDED.value:
        return None
    conditions = status.get("conditions")
    for condition in conditions if isinstance(conditions, list) else []:
        if isinstance(condition, Mapping) and condition.get("type") == "Suspended" and condition.get("status") == "True":
            return _epoch(condition.get("lastTransitionTime"))
    return None


def sample(body: Mapping[str, Any]) -> JobSample | None:
    """The sample of a FineTuneJob body; None without namespace, name or uid. Never raises on odd values: a
    status is partly written by the trainer, and a scrape must not fail over one job."""
    meta = body.get("metadata") or {}
    namespace, name, uid = meta.get("namespace"), meta.get("name"), meta.get("uid")
    if not (isinstance(namespace, str) and isinstance(name, str) and isinstance(uid, str)):
        return None
    spec, status = body.get("spec") or {}, body.get("status") or {}
    resources = _mapping(spec.get("resources"))
    metrics = _mapping(status.get("metrics"))
    phase = status.get("phase")
    return JobSample(
        uid=uid,
        namespace=namespace,
        name=name,
        phase=phase if isinstance(phase, str) else None,
        created=_epoch(meta.get("creationTimestamp")),
        started=_epoch(status.get("startTime")),
        completed=_epoch(status.get("completionTime")),
        suspended=_suspended_at(phase, status),
        best_val_accuracy=_number(metrics.get("bestValAccuracy")),
        images_per_second=_number(metrics.get("imagesPerSecond")),
        gpus=_count(resources.get("workers"), 1) * _count(resources.get("gpusPerWorker"), 0),
    )


class JobSeries(Collector):
    """The per-job series of the live jobs this replica watches (see the module docstring); thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], JobSample] = {}
        self._seen: dict[tuple[str, str], int] = {}  # the observation count when each job was last observed
        self._observed = 0

    def observe(self, body: Mapping[str, Any]) -> None:
        """Take the job's latest body (every watch event of it)."""
        found = sample(body)
        if found is None:
            return
        with self._lock:
            if found.phase == Phase.SUSPENDED.value and found.suspended is None:
                # No Suspended condition yet: the clocks stop when the suspension was first seen.
                held = self._jobs.get((found.namespace, found.name))
                seen = held.suspended if held is not None and held.uid == found.uid else None
                found = replace(found, suspended=seen if seen is not None else self._clock())
            self._jobs[found.namespace, found.name] = found
            self._observed += 1
            self._seen[found.namespace, found.name] = self._observed

    def mark(self) -> int:
        """A mark to ``prune`` against: take it before the LIST, so that jobs observed after it are kept."""
        with self._lock:
            return self._observed

    def prune(self, live_uids: set[str], mark: int) -> None:
        """Drop the jobs a complete LIST (started after ``mark``) did not return, unless observed since ``mark``
        (created after the LIST, or re-created under the same name)."""
        with self._lock:
            for key, job in list(self._jobs.items()):
                if job.uid not in live_uids and self._seen.get(key, 0) <= mark:
                    del self._jobs[key]
                    self._seen.pop(key, None)

    def forget(self, namespace: str | None, name: str | None, uid: str | None = None) -> None:
        """Drop a deleted job's series; with ``uid``, only if the job held under that name is that one (a job
        re-created under the same name must not lose its series to the old one's late DELETED event)."""
        with self._lock:
            held = self._jobs.get((namespace or "", name or ""))
            if held is not None and (uid is None or held.uid == uid):
                del self._jobs[held.namespace, held.name]
                self._seen.pop((held.namespace, held.name), None)

    def clear(self) -> None:
        """Drop every job: this replica stopped leading, and the new leader exports them now."""
        with self._lock:
            self._jobs.clear()
            self._seen.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def describe(self) -> list[Metric]:
        # Names without samples: the registry checks them for clashes without a scrape's worth of work.
        return [GaugeMetricFamily(family, text, labels=_labels(family)) for family, text in FAMILIES.items()]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda job: (job.namespace, job.name))
        now = self._clock()
        families = {family: GaugeMetricFamily(family, text, labels=_labels(family)) for family, text in FAMILIES.items()}
        for job in jobs:
            key = [job.namespace, job.name]
            for phase in Phase:
                families[PHASE].add_metric([*key, phase.value], 1.0 if job.phase == phase.value else 0.0)
            # A finished or suspended job's clocks stand still (docs/platform.md, "Metrics and dashboard").
            stopped = job.completed or job.suspended or now
            if job.created is not None:
                families[QUEUED].add_metric(key, max(0.0, (job.started or stopped) - job.created))
            if job.started is not None:
                families[DURATION].add_metric(key, max(0.0, stopped - job.started))
            if job.best_val_accuracy is not None:
                families[BEST_ACCURACY].add_metric(key, job.best_val_accuracy)
            if job.images_per_second is not None:
                families[IMAGES_PER_SECOND].add_metric(key, job.images_per_second)
            families[GPUS].add_metric(key, float(job.gpus))
        yield from families.values()


def _labels(family: str) -> list[str]:
    return [*LABELS, "phase"] if family == PHASE else list(LABELS)


__all__ = ["FAMILIES", "JobSample", "JobSeries", "sample"]
