"""Adversarial review of issue 13 (observability): each test states a defect found in review and fails on main."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest
from pydantic import ValidationError

from finetune_operator import handlers, metrics
from finetune_operator.api.tracking import MlflowSpec
from finetune_operator.job_metrics import DURATION, JobSeries
from tests.unit.test_platform_chart import render
from tests.unit.test_tracking import CLASSES, INPUT, config, read_events, tiny_model_and_data, train, write_pngs


# --------------------------------------------------------------------------------- Prometheus / Grafana
def test_servicemonitor_keeps_the_jobs_namespace_label() -> None:
    """The job series are labelled ``namespace``; Prometheus' target label ``namespace`` (the operator's) wins unless
    the ServiceMonitor sets honorLabels, so every job shows up in finetune-system (the job's own namespace becomes
    ``exported_namespace``) and the dashboard's $namespace filter and its ``on (namespace, name)`` join break."""
    objects = render("metrics.serviceMonitor.enabled=true")
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert all(endpoint.get("honorLabels") is True for endpoint in monitor["spec"]["endpoints"])


def test_helm_test_pod_is_not_selected_by_the_operators_pdb_or_network_policy() -> None:
    """The smoke pod carries the selector labels (``finetune-operator.labels``): the operator's PodDisruptionBudget
    (and NetworkPolicy, Services) select it. A controller-less pod under a maxUnavailable PDB makes the disruption
    controller fail safe (no disruptions allowed) while it exists, and a failed test pod is kept."""
    objects = render("networkPolicy.enabled=true")
    (pod,) = [o for o in objects if o["kind"] == "Pod"]
    labels = pod["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for obj in (o for o in objects if o["kind"] == kind):
            key = "selector" if kind == "PodDisruptionBudget" else "podSelector"
            selector = obj["spec"][key]["matchLabels"]
            assert not all(labels.get(k) == v for k, v in selector.items()), f"{kind} {obj['metadata']['name']} selects it"


def test_a_suspended_jobs_training_duration_does_not_grow() -> None:
    """finetune_job_duration_seconds is 'until now while running', but any phase without completionTime counts on:
    a job suspended after it started shows ever-growing training time on the dashboard."""
    now = [1_000_000.0]
    series = JobSeries(clock=lambda: now[0])
    series.observe({
        "metadata": {"name": "a", "namespace": "t", "uid": "u", "creationTimestamp": "1970-01-12T13:40:00Z"},
        "spec": {}, "status": {"phase": "Suspended", "startTime": "1970-01-12T13:45:00Z"},
    })  # fmt: skip

    def duration() -> float:
        (family,) = [f for f in series.collect() if f.name == DURATION]
        return family.samples[0].value

    first = duration()
    now[0] += 3600
    assert duration() == first


def test_a_step_down_between_the_leading_check_and_observe_leaves_no_series() -> None:
    """``forget`` asks ``leading()`` and then observes, unlocked; ``step_down`` in between (the elector's thread)
    clears the store first, and the late observe puts the job back: this replica exports it after stepping down
    (record_phase is guarded by ``_counting``, JOB_SERIES.observe is not)."""
    metrics.step_down()

    def leading() -> bool:
        metrics.step_down()  # the elector steps down right after the check said 'leading'
        return True

    body = kopf.Body({"metadata": {"name": "a", "namespace": "t", "uid": "u"}, "spec": {}, "status": {}})
    try:
        handlers.forget(type="MODIFIED", body=body, meta=body.meta, memo=kopf.Memo(leading=leading))
        assert len(metrics.JOB_SERIES) == 0
    finally:
        metrics.JOB_SERIES.clear()
        metrics.take_over()


# ----------------------------------------------------------------------------------------------- MLflow
@pytest.mark.parametrize(
    "uri",
    ["https://mlflow.example.com/?token=s3cr3t", "https://mlflow.example.com/api?access_token=s3cr3t#x"],
)
def test_a_tracking_uri_with_a_token_in_its_query_is_refused(uri: str) -> None:
    """Only user:password@ is refused; a token in the query string is accepted, stored in the spec (readable by
    finetune-view) and echoed verbatim into status.warnings ('MLflow at <uri> failed ...') when the server fails."""
    with pytest.raises(ValidationError):
        MlflowSpec.model_validate({"trackingUri": uri, "experimentName": "x"})


def test_a_resume_does_not_log_an_epochs_mlflow_metrics_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow metrics are logged before the epoch's checkpoint; a crash after that and before the checkpoint re-runs
    the epoch on resume and logs it again under the same run id and step: two val_accuracy points at step 2
    (TensorBoard purges, MLflow does not)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path / 'mlruns'}"
    cfg = config(tmp_path / "runs", mlflow={"trackingUri": store, "experimentName": "digits"})
    (tmp_path / "runs" / "job").mkdir(parents=True)
    first = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    train(first, 1, 3, 0.5)
    train(first, 2, 3, 0.6)  # logged; its checkpoint was never written
    second = Tracker(cfg, resumed_epoch=1, on_warning=pytest.fail)
    train(second, 2, 3, 0.7)
    assert second.mlflow is not None and second.mlflow.run_id is not None
    history = MlflowClient(tracking_uri=store).get_metric_history(second.mlflow.run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.7)]


# ------------------------------------------------------------------------------------------ TensorBoard
def test_a_hostile_class_name_still_gets_its_sample_predictions(tmp_path: Path) -> None:
    """Class names are the tenant's folder names; matplotlib parses '$...$' as mathtext, so a name like '$\\frac$'
    raises inside the sample-predictions figure (titles are not escaped): no sample predictions, a status warning,
    and ``_tb_failed`` drops the writer without closing it (its file and flush thread stay open)."""
    cfg = config(tmp_path)
    run_dir = tmp_path / "job"
    run_dir.mkdir()
    warnings: list[str] = []
    tracker = Tracker(cfg, resumed_epoch=0, on_warning=warnings.append)
    train(tracker, 1, 2, 0.5)
    write_pngs(run_dir)
    model, data = tiny_model_and_data()
    tracker.finish(model, data, ["$\\frac$", *CLASSES[1:]], INPUT)
    assert warnings == []
    assert "eval/sample_predictions" in read_events(run_dir).Tags()["images"]


def test_a_remote_run_dir_relaunched_before_its_first_checkpoint_logs_no_step_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an s3:// or gs:// run dir, epoch 1's events and tracking.json are uploaded before its checkpoint; a crash
    in between relaunches from epoch 0, which drops tracking.json's epoch 1, and ``_has_events`` is False for remote
    dirs, so the writer opens without purge_step: steps 1-4 and epoch 1 appear twice (and hparams again). Simulated
    with a local dir that Tracker believes remote (uploads are local copies)."""
    import time
    import types

    import finetune_trainer.tracking as tracking
    from finetune_trainer import storage

    proxy = types.SimpleNamespace(**{k: getattr(storage, k) for k in dir(storage) if not k.startswith("__")})
    proxy.is_remote = lambda uri: True
    monkeypatch.setattr(tracking, "storage", proxy)
    cfg = config(tmp_path)
    (tmp_path / "job").mkdir()
    first = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    train(first, 1, 4, 0.5)  # uploaded at the epoch's end; the checkpoint upload then dies
    time.sleep(1.1)  # event file names carry the second
    second = Tracker(cfg, resumed_epoch=0, on_warning=pytest.fail)
    train(second, 1, 4, 0.7)
    second.finish(*tiny_model_and_data(), CLASSES, INPUT)
    acc = read_events(tmp_path / "job")
    assert [e.step for e in acc.Scalars("step/train_loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("epoch/val_accuracy")] == [4]


from finetune_trainer.tracking import Tracker  # noqa: E402  (after the helpers: the trainer's torch import is slow)
