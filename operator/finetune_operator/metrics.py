"""Prometheus metrics of the operator: jobs by phase, reconcile errors, handler latency, and the per-job series.

``instrumented(name)`` wraps a Kopf handler with prometheus_client's own decorators (``Histogram.time()``,
``Counter.count_exceptions()``); ``record_phase`` and ``forget`` keep the per-phase gauge in step with what the
handlers write; ``JOB_SERIES`` (``job_metrics.JobSeries``) holds the job-level series. Both are filled only by the
handlers of the replica that leads, and ``step_down`` empties them when it stops leading, so that two replicas
never export the same job twice. ``metrics_server.serve_once`` serves ``REGISTRY`` on ``/metrics``.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar, cast

import prometheus_client
from prometheus_client import CollectorRegistry

from finetune_operator.api.v1alpha1 import Phase
from finetune_operator.job_metrics import JobSeries

PHASES: Final = tuple(phase.value for phase in Phase)
F = TypeVar("F", bound=Callable[..., Any])

REGISTRY = CollectorRegistry(auto_describe=True)
JOBS = prometheus_client.Gauge(
    "finetune_operator_jobs", "FineTuneJobs seen by this operator, by phase.", ["phase"], registry=REGISTRY
)
ERRORS = prometheus_client.Counter(
    "finetune_operator_reconcile_errors",
    "Exceptions raised by handlers (Kopf retries or gives up).",
    ["handler"],
    registry=REGISTRY,
)
LATENCY = prometheus_client.Histogram(
    "finetune_operator_handler_duration_seconds",
    "Time spent in a handler.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)

JOB_SERIES = JobSeries()
REGISTRY.register(JOB_SERIES)

_lock = threading.Lock()
_phases: dict[str, str] = {}
_counting = [True]  # False between ``step_down`` and ``take_over``: a stopping Kopf's late handlers count nothing


def _refresh() -> None:
    counts = Counter(_phases.values())
    for phase in PHASES:
        JOBS.labels(phase=phase).set(counts.get(phase, 0))


def record_phase(uid: str | None, phase: str | None) -> None:
    """Count job ``uid`` in ``phase`` from now on (None: not counted)."""
    if not uid:
        return
    with _lock:
        if phase and _counting[0]:
            _phases[uid] = phase
        else:
            _phases.pop(uid, None)
        _refresh()


def forget(uid: str | None) -> None:
    record_phase(uid, None)


def observe_job(body: Mapping[str, Any]) -> None:
    """Export job ``body``'s series, unless this replica has stepped down: checked under the lock ``step_down`` takes,
    so a step-down between the handler's "leading?" and this call cannot leave the job behind."""
    with _lock:
        if _counting[0]:
            JOB_SERIES.observe(body)


def step_down() -> None:
    """Forget every job, by phase and per job: this replica stopped leading (its handlers no longer see events)."""
    with _lock:
        _counting[0] = False
        _phases.clear()
        _refresh()
        JOB_SERIES.clear()


def take_over() -> None:
    """Count jobs again: this replica starts leading (its Kopf lists every job as it starts)."""
    with _lock:
        _counting[0] = True


def job_count() -> int:
    with _lock:
        return len(_phases)


def instrumented(name: str) -> Callable[[F], F]:
    """Time the handler and count its exceptions (all of them: Kopf's retry signals are errors too).

    The children are created here, at import, so that both series exist (at 0) before the first call: a
    counter that appears only with its first error hides that first increase from ``rate()``.
    """
    timer, errors = LATENCY.labels(handler=name), ERRORS.labels(handler=name)

    def wrap(fn: F) -> F:
        # As context managers inside a wrapper of ours: as decorators they refuse bound methods (resync_all).
        @functools.wraps(fn)
        def handler(*args: Any, **kwargs: Any) -> Any:
            with timer.time(), errors.count_exceptions():
                return fn(*args, **kwargs)

        return cast(F, handler)

    return wrap


def exposition() -> str:
    return prometheus_client.generate_latest(REGISTRY).decode()
