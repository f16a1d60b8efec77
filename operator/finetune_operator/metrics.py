"""Prometheus metrics of the operator: jobs by phase, reconcile errors, handler latency.

``instrumented(name)`` wraps a Kopf handler (timing it, counting what it raises); ``record_phase`` and
``forget`` keep the per-phase gauge in step with what the handlers write. ``serve(port)`` starts the
``/metrics`` endpoint (prometheus_client's own HTTP thread) once; port 0 leaves it off.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

import prometheus_client
from prometheus_client import CollectorRegistry

from finetune_operator.api.v1alpha1 import Phase

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

_lock = threading.Lock()
_phases: dict[str, str] = {}
_served: list[int] = []


def _refresh() -> None:
    counts = Counter(_phases.values())
    for phase in PHASES:
        JOBS.labels(phase=phase).set(counts.get(phase, 0))


def record_phase(uid: str | None, phase: str | None) -> None:
    """Count job ``uid`` in ``phase`` from now on (None: not counted)."""
    if not uid:
        return
    with _lock:
        if phase:
            _phases[uid] = phase
        else:
            _phases.pop(uid, None)
        _refresh()


def forget(uid: str | None) -> None:
    record_phase(uid, None)


def job_count() -> int:
    with _lock:
        return len(_phases)


def instrumented(name: str) -> Callable[[F], F]:
    """Time the handler and count its exceptions (all of them: Kopf's retry signals are errors too)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def handler(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            except Exception:
                ERRORS.labels(handler=name).inc()
                raise
            finally:
                LATENCY.labels(handler=name).observe(time.perf_counter() - started)

        return cast(F, handler)

    return wrap


def serve(port: int) -> bool:
    """Start the /metrics endpoint on ``port`` (once per process); False when off or already serving."""
    with _lock:
        if port == 0 or _served:
            return False
        prometheus_client.start_http_server(port, registry=REGISTRY)
        _served.append(port)
        return True


def exposition() -> str:
    return prometheus_client.generate_latest(REGISTRY).decode()
