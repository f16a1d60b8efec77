"""Job-level Prometheus series (``finetune_operator.job_metrics``) and the operator's handler metrics (``metrics``).

The series are read back through prometheus_client's own text format and parser, as Prometheus would read them.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import kopf
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from finetune_operator import handlers, metrics
from finetune_operator.job_metrics import DURATION, FAMILIES, QUEUED, JobSeries
from finetune_operator.settings import OperatorSettings
from tests.support.fake_kube import FakeKube

CREATED, STARTED, DONE = "2026-11-30T10:00:00Z", "2026-11-30T10:05:00Z", "2026-11-30T11:05:00Z"


def job(name: str = "a", namespace: str = "team-a", uid: str = "u1", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "creationTimestamp": CREATED},
        "spec": {"resources": {"workers": 4, "gpusPerWorker": 2}},
        "status": status,
    }


def scrape(collector: JobSeries) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def series(collector: JobSeries, family: str, **labels: str) -> float | None:
    return scrape(collector).get((family, tuple(sorted(labels.items()))))


def clock_at(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


JOB = {"namespace": "team-a", "name": "a"}


@pytest.mark.parametrize(
    ("case", "status", "now", "expected"),
    [
        ("pending: queued until now", {"phase": "Pending"}, "2026-11-30T10:02:00Z", {"finetune_job_queued_seconds": 120.0}),
        (
            "running: queued until start, training until now",
            {"phase": "Running", "startTime": STARTED, "metrics": {"bestValAccuracy": 0.8, "imagesPerSecond": 950.5}},
            "2026-11-30T10:35:00Z",
            {
                "finetune_job_queued_seconds": 300.0,
                "finetune_job_duration_seconds": 1800.0,
                "finetune_job_best_val_accuracy": 0.8,
                "finetune_job_images_per_second": 950.5,
            },
        ),
        (
            "finished: frozen at completion",
            {"phase": "Succeeded", "startTime": STARTED, "completionTime": DONE},
            "2026-12-01T00:00:00Z",
            {"finetune_job_queued_seconds": 300.0, "finetune_job_duration_seconds": 3600.0},
        ),
        (
            "failed before it ran: queued until it failed, no duration",
            {"phase": "Failed", "completionTime": "2026-11-30T10:01:00Z"},
            "2026-12-01T00:00:00Z",
            {"finetune_job_queued_seconds": 60.0},
        ),
        (
            "a hand-edited status: odd values are unknown, never a failed scrape",
            {"phase": 3, "startTime": "yesterday", "metrics": {"bestValAccuracy": "high", "imagesPerSecond": True}},
            "2026-11-30T10:02:00Z",
            {"finetune_job_queued_seconds": 120.0},
        ),
    ],
)
def test_series_of_one_job(case: str, status: dict[str, Any], now: str, expected: dict[str, float]) -> None:
    collector = JobSeries(clock=lambda: clock_at(now))
    collector.observe(job(**status))
    for name in ("finetune_job_duration_seconds", "finetune_job_best_val_accuracy", "finetune_job_images_per_second"):
        assert series(collector, name, **JOB) == expected.get(name), (case, name)
    assert series(collector, "finetune_job_queued_seconds", **JOB) == expected["finetune_job_queued_seconds"], case
    assert series(collector, "finetune_job_gpus", **JOB) == 8.0, case  # 4 workers x 2 GPUs
    phases = {dict(labels)["phase"]: value for (name, labels), value in scrape(collector).items() if name.endswith("phase")}
    assert len(phases) == 6 and sum(phases.values()) == (1.0 if isinstance(status["phase"], str) else 0.0), case


def test_labels_are_namespace_and_name_never_uid() -> None:
    collector = JobSeries(clock=lambda: clock_at(DONE))
    collector.observe(job(phase="Running", startTime=STARTED))
    for name, labels in scrape(collector):
        assert {key for key, _ in labels} <= {"namespace", "name", "phase"}, name
        assert "u1" not in dict(labels).values()


def test_a_deleted_job_leaves_no_series_and_the_store_stays_bounded() -> None:
    collector = JobSeries(clock=lambda: clock_at(DONE))
    for i in range(50):  # jobs come and go: the store holds the live ones only
        collector.observe(job(name=f"j{i}", uid=f"u{i}", phase="Running", startTime=STARTED))
        collector.forget("team-a", f"j{i}", f"u{i}")
    collector.observe(job(name="kept", uid="k", phase="Pending"))
    assert len(collector) == 1
    assert {dict(labels)["name"] for _, labels in scrape(collector)} == {"kept"}


def test_a_late_deleted_event_of_an_old_job_keeps_the_new_job_of_that_name() -> None:
    collector = JobSeries(clock=lambda: clock_at(DONE))
    collector.observe(job(uid="new", phase="Pending"))
    collector.forget("team-a", "a", "old")
    assert series(collector, "finetune_job_gpus", **JOB) == 8.0
    collector.forget("team-a", "a", "new")
    assert series(collector, "finetune_job_gpus", **JOB) is None


def test_the_operator_registry_exports_every_family() -> None:
    """What the chart's dashboard may name (tests/unit/test_platform_chart.py) is what /metrics serves."""
    names = {family.name for family in text_string_to_metric_families(metrics.exposition())}
    assert set(FAMILIES) <= names | {name.removesuffix("_total") for name in names}


def test_stepping_down_empties_the_job_series_and_the_phase_gauge() -> None:
    """Two replicas must never export the same job: the leader's ``on_stopped`` forgets every job, and events that
    its stopping Kopf still delivers add nothing back."""
    settings = OperatorSettings(leader_election=True, leader_election_namespace="finetune-system")
    ran = threading.Event()
    metrics.step_down()  # the process-wide store starts empty whatever ran before in this process

    def run_kopf(memo: kopf.Memo, stop: threading.Event) -> None:
        leading = kopf.Memo(leading=lambda: True)  # this fake elector holds no Lease: the event as while leading
        handlers.forget(type="ADDED", body=kopf.Body(job(uid="lead")), meta=kopf.Body(job(uid="lead")).meta, memo=leading)
        metrics.record_phase("lead", "Running")
        ran.set()
        stop.wait(5)

    elector = handlers.leader_elector(settings, FakeKube(), "replica-a", run_kopf)  # type: ignore[arg-type]
    try:
        elector.on_started()
        assert ran.wait(5)
        assert len(metrics.JOB_SERIES) == 1 and metrics.job_count() == 1
    finally:
        elector.on_stopped()
    assert len(metrics.JOB_SERIES) == 0 and metrics.job_count() == 0
    assert 'finetune_operator_jobs{phase="Running"} 0.0' in metrics.exposition()
    metrics.record_phase("late", "Running")  # a handler of the stopping Kopf, after the step-down
    assert metrics.job_count() == 0
    late = kopf.Memo(leading=lambda: False)
    handlers.forget(type="MODIFIED", body=kopf.Body(job(uid="lead")), meta=kopf.Body(job(uid="lead")).meta, memo=late)
    assert len(metrics.JOB_SERIES) == 0
    metrics.take_over()  # leading again: counted again
    metrics.record_phase("again", "Running")
    assert metrics.job_count() == 1
    metrics.forget("again")


def test_instrumented_times_calls_and_counts_exceptions_with_the_client_decorators() -> None:
    def count(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    @metrics.instrumented("unit-test")
    def handler(*, fail: bool) -> str:
        if fail:
            raise kopf.TemporaryError("again")
        return "done"

    # Present (at 0) before the first error, so that rate() sees the first increase: the hand-written wrapper
    # created the series only with its first error.
    assert metrics.REGISTRY.get_sample_value("finetune_operator_reconcile_errors_total", {"handler": "unit-test"}) == 0.0
    assert handler(fail=False) == "done"
    with pytest.raises(kopf.TemporaryError):
        handler(fail=True)
    assert count("finetune_operator_reconcile_errors_total", handler="unit-test") == 1.0
    assert count("finetune_operator_handler_duration_seconds_count", handler="unit-test") == 2.0


def duration_and_queued(series: JobSeries) -> tuple[list[float], list[float]]:
    families = {f.name: [s.value for s in f.samples] for f in series.collect()}
    return families[DURATION], families[QUEUED]


@pytest.mark.parametrize(
    ("status", "frozen_at"),
    [
        # Suspended after it started, the condition saying when: the clocks stop there.
        (
            {"phase": "Suspended", "startTime": STARTED, "conditions": [
                {"type": "Suspended", "status": "True", "lastTransitionTime": "2026-11-30T10:35:00Z"}]},
            "2026-11-30T10:35:00Z",
        ),
        ({"phase": "Suspended", "startTime": STARTED}, "observed"),  # no condition yet: when the suspension was seen
        ({"phase": "Suspended"}, "observed"),  # suspended before it started: queued time stops too
    ],
)  # fmt: skip
def test_a_suspended_jobs_duration_and_queued_time_stand_still(status: dict[str, Any], frozen_at: str) -> None:
    """Duration was 'until now' for any phase without completionTime: a suspended job's training time grew."""
    now = [datetime.fromisoformat("2026-11-30T10:40:00+00:00").timestamp()]
    series = JobSeries(clock=lambda: now[0])
    series.observe(job(**status))
    first = duration_and_queued(series)
    now[0] += 3600
    series.observe(job(**status))  # a later event of the same suspension keeps the moment it began
    assert duration_and_queued(series) == first
    end = now[0] - 3600 if frozen_at == "observed" else datetime.fromisoformat(frozen_at).timestamp()
    start, created = (datetime.fromisoformat(t).timestamp() for t in (STARTED, CREATED))
    expected = ([end - start], [start - created]) if "startTime" in status else ([], [end - created])
    assert first == expected


def test_a_step_down_between_the_leading_check_and_observe_leaves_no_series() -> None:
    """``forget`` asked ``leading()`` and then observed, unlocked; a step-down in between (the elector's thread)
    cleared the store first and the late observe put the job back: exported after stepping down."""
    metrics.take_over()

    def leading() -> bool:
        metrics.step_down()  # the elector steps down right after the check said 'leading'
        return True

    body = kopf.Body(job(uid="raced"))
    try:
        handlers.forget(type="MODIFIED", body=body, meta=body.meta, memo=kopf.Memo(leading=leading))
        assert len(metrics.JOB_SERIES) == 0
    finally:
        metrics.JOB_SERIES.clear()
        metrics.take_over()


@pytest.mark.parametrize("list_fails", [False, True])
def test_the_resync_round_prunes_series_of_jobs_its_list_no_longer_returns(list_fails: bool) -> None:
    """A DELETED event missed across a watch reconnect left the job's series forever; the resync round's complete
    LIST now prunes them (a failed LIST prunes nothing: absence from it proves nothing)."""
    from finetune_operator.failures import ApiFailure
    from finetune_operator.reconcile import Reconciler

    kube = FakeKube()
    kept = kube.put({"kind": "FineTuneJob", **job("kept", uid="u-kept", phase="Succeeded")})
    metrics.JOB_SERIES.clear()
    try:
        metrics.JOB_SERIES.observe(kept)
        metrics.JOB_SERIES.observe(job("missed", uid="u-missed", phase="Running"))
        if list_fails:
            kube.faults[("list", "FineTuneJob")] = ApiFailure("list FineTuneJob", 500, "HTTP 500")
        Reconciler(kube, OperatorSettings(metrics_port=0)).resync_all()
        names = {s.labels["name"] for f in metrics.JOB_SERIES.collect() for s in f.samples}
        assert names == ({"kept", "missed"} if list_fails else {"kept"})
    finally:
        metrics.JOB_SERIES.clear()


def test_a_job_observed_after_the_lists_mark_is_not_pruned() -> None:
    """A job created after the round's LIST is absent from it; its watch event came later, so it stays."""
    series = JobSeries()
    series.observe(job("old", uid="u-old"))
    mark = series.mark()
    series.observe(job("new", uid="u-new"))
    series.prune(set(), mark)
    assert {s.labels["name"] for f in series.collect() for s in f.samples} == {"new"}
