"""The reconcile rules (``finetune_operator.reconcile.Reconciler``) against an in-memory API: no Kopf, no emulator.

Each test states one rule and checks the end state: objects, status, Events and the API calls made.
The same flows run against the HTTP emulator and Kopf in tests/integration/test_operator.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import pytest

from finetune_operator import naming
from finetune_operator.admission import admit
from finetune_operator.failures import RETRY_CAP_SECONDS, ApiFailure, Refused, Retry, retry_delay
from finetune_operator.ownership import ParentJob, controller_of
from finetune_operator.rayjob import build_children
from finetune_operator.reconcile import CONFLICT_ATTEMPTS, Reconciler
from finetune_operator.settings import OperatorSettings
from tests.support.fake_kube import Events, FakeKube

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
SETTINGS = OperatorSettings(metrics_port=0)
RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
KINDS_IN_ORDER = ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy", "RayJob"]


def job(name: str = "job", uid: str = "uid-1", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"name": "resnet18"}, "dataset": {"format": "digits"}, "output": {"uri": "s3://b/runs"}}
    base.update(spec)
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team", "uid": uid, "generation": 1},
        "spec": base,
    }


def created(kube: FakeKube, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` stored in the fake API (as kubectl apply would), returned as stored."""
    return kube.put(body)


def status(kube: FakeKube, name: str = "job") -> dict[str, Any]:
    stored = kube.get("FineTuneJob", "team", name)
    assert stored is not None
    return dict(stored.get("status") or {})


def rayjob_of(kube: FakeKube, name: str = "job") -> dict[str, Any]:
    found = kube.get("RayJob", "team", naming.rayjob_name(name))
    assert found is not None
    return found


# ------------------------------------------------------------------------------------- reconcile
def test_a_new_job_gets_its_children_in_order_and_provisioning(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    assert [kind for verb, kind, _ in kube.calls if verb == "create"] == KINDS_IN_ORDER
    children = [obj for obj in kube.objects.values() if obj["kind"] != "FineTuneJob"]
    assert [(controller_of(obj) or {}).get("uid") for obj in children] == ["uid-1"] * len(KINDS_IN_ORDER)
    st = status(kube)
    assert (st["phase"], st["rayJobName"]) == ("Provisioning", naming.rayjob_name("job"))
    assert {c["type"]: c["status"] for c in st["conditions"]}["Validated"] == "True"
    assert events.reasons == ["RayJobCreated", "PhaseProvisioning"]


def test_an_invalid_job_fails_with_every_line_and_is_refused(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    body = created(kube, job(model={"name": "resnet5"}, output={"uri": "runs"}))
    with pytest.raises(Refused, match="team/job is invalid"):
        rec.reconcile(body)
    st = status(kube)
    assert st["phase"] == "Failed"
    validated = next(c for c in st["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "InvalidSpec")
    assert validated["message"].startswith("spec.model.name: 'resnet5'")
    assert kube.count("create") == 0
    assert events.reasons == ["PhaseFailed", "InvalidSpec"]


def test_operator_limits_refuse_a_new_job(kube: FakeKube) -> None:
    rec = Reconciler(kube, OperatorSettings(metrics_port=0, max_workers=1), clock=lambda: NOW)
    with pytest.raises(Refused, match="FINETUNE_OPERATOR_MAX_WORKERS"):
        rec.reconcile(created(kube, job(resources={"workers": 2})))


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_job_is_left_alone(kube: FakeKube, rec: Reconciler, phase: str) -> None:
    rec.reconcile(created(kube, {**job(), "status": {"phase": phase}}))
    assert kube.calls == []


def test_a_restart_reads_the_known_rayjob_instead_of_posting_every_create(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    kube.calls.clear()
    rec.reconcile(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert kube.count("create") == 0
    assert kube.count("read", "RayJob") == 1


def test_a_rayjob_of_a_deleted_namesake_is_waited_for_not_adopted(kube: FakeKube, rec: Reconciler) -> None:
    Reconciler(kube, SETTINGS, clock=lambda: NOW).reconcile(created(kube, job(uid="old-uid")))
    kube.objects.pop(("FineTuneJob", "team", "job"))
    with pytest.raises(Retry, match="still belongs to a deleted FineTuneJob") as info:
        rec.reconcile(created(kube, job(uid="new-uid")))
    assert info.value.delay > 0
    assert controller_of(rayjob_of(kube))["uid"] == "old-uid"  # type: ignore[index]


@pytest.mark.parametrize(
    ("queue", "rayjob_suspended", "job_suspend", "expected"),
    [
        (None, True, False, False),  # a plain job resumes its RayJob
        (None, False, True, True),  # and suspends it
        ("gpu-queue", True, False, True),  # Kueue holds it until admission: never un-suspend behind its back
        ("gpu-queue", False, True, True),  # the user's suspend still goes through
    ],
)
def test_ensure_children_aligns_suspend_except_behind_kueue(
    kube: FakeKube, rec: Reconciler, queue: str | None, rayjob_suspended: bool, job_suspend: bool, expected: bool
) -> None:
    runtime = {"queueName": queue} if queue else {}
    body = created(kube, job(runtime=runtime, runPolicy={"suspend": job_suspend}))
    Reconciler(kube, SETTINGS, clock=lambda: NOW).reconcile(body)
    kube.objects[("RayJob", "team", naming.rayjob_name("job"))]["spec"]["suspend"] = rayjob_suspended
    rec.reconcile(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert rayjob_of(kube)["spec"]["suspend"] is expected


def test_api_failures_propagate_with_the_object_named(kube: FakeKube, rec: Reconciler) -> None:
    kube.faults[("create", "Role")] = ApiFailure("create Role team/job-trainer-status", 403, "HTTP 403 Forbidden")
    with pytest.raises(ApiFailure, match="create Role team/job-trainer-status") as info:
        rec.reconcile(created(kube, job()))
    assert info.value.status == 403
    assert kube.count("create", "RayJob") == 0  # nothing after the failed step


# --------------------------------------------------------------------------------------- suspend
@pytest.mark.parametrize(("wanted", "reason"), [(True, "Suspend"), (False, "Resume")])
def test_suspend_changed_flips_the_rayjob_once(
    kube: FakeKube, events: Events, rec: Reconciler, wanted: bool, reason: str
) -> None:
    rec.reconcile(created(kube, job(runPolicy={"suspend": not wanted})))
    events.clear()
    body = kube.get("FineTuneJob", "team", "job")
    rec.suspend_changed(body, wanted)  # type: ignore[arg-type]
    rec.suspend_changed(body, wanted)  # type: ignore[arg-type]
    assert rayjob_of(kube)["spec"]["suspend"] is wanted
    assert kube.count("patch", "RayJob") == 1
    assert events.reasons == [reason]


def test_suspend_of_a_finished_job_does_nothing(kube: FakeKube, rec: Reconciler) -> None:
    rec.suspend_changed({**job(), "status": {"phase": "Succeeded"}}, True)
    assert kube.calls == []


# ---------------------------------------------------------------------------------------- mirror
@pytest.mark.parametrize(
    ("rayjob_status", "phase"),
    [
        ({"jobDeploymentStatus": "Initializing"}, "Provisioning"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "Succeeded"),
        ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, "Failed"),
    ],
)
def test_rayjob_changes_are_mirrored(kube: FakeKube, rec: Reconciler, rayjob_status: dict[str, Any], phase: str) -> None:
    rec.reconcile(created(kube, job()))
    rayjob = kube.patch_status("RayJob", "team", naming.rayjob_name("job"), rayjob_status)
    rec.rayjob_changed("MODIFIED", rayjob)
    assert status(kube)["phase"] == phase
    assert type(status(kube)["phase"]) is str  # a plain string on the wire, never the Phase enum itself


def test_a_finished_job_never_moves_again(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    name = naming.rayjob_name("job")
    rec.rayjob_changed(
        "MODIFIED", kube.patch_status("RayJob", "team", name, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    )
    patches = kube.count("patch_status", "FineTuneJob")
    rec.rayjob_changed(
        "MODIFIED", kube.patch_status("RayJob", "team", name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    )
    assert status(kube)["phase"] == "Succeeded"
    assert kube.count("patch_status", "FineTuneJob") == patches


def test_events_of_a_rayjob_whose_owner_is_gone_or_another_uid_are_ignored(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    rayjob = rayjob_of(kube)
    stranger = {
        **rayjob,
        "metadata": {**rayjob["metadata"], "ownerReferences": [{**rayjob["metadata"]["ownerReferences"][0], "uid": "other"}]},
    }
    before = status(kube)
    rec.rayjob_changed("MODIFIED", {**stranger, "status": {"jobDeploymentStatus": "Failed"}})
    assert status(kube) == before
    rec.rayjob_changed("MODIFIED", {**rayjob, "metadata": {**rayjob["metadata"], "ownerReferences": []}})
    assert status(kube) == before


def test_a_rayjob_status_that_beats_the_create_handler_is_not_lost(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    """KubeRay reports Running before the handler recorded the RayJob: mirrored at once, announced once."""
    body = created(kube, job())
    handler = Reconciler(kube, SETTINGS, emit=events, clock=lambda: NOW)
    handler.ensure_children(admit(body, SETTINGS))  # the handler has created the children, not yet written status
    running = kube.patch_status(
        "RayJob", "team", naming.rayjob_name("job"), {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    )
    rec.rayjob_changed("MODIFIED", running)
    assert (status(kube)["phase"], status(kube)["rayJobName"]) == ("Running", naming.rayjob_name("job"))
    handler.mirror(ParentJob.of(body), running, record=True)  # the handler's own write, on its stale body: 409, re-read
    assert status(kube)["phase"] == "Running"
    assert events.reasons.count("PhaseRunning") == 1


# ------------------------------------------------------------------------------- recreate / resync
def test_a_rayjob_deleted_under_a_live_job_is_recreated(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    old = kube.objects.pop(("RayJob", "team", naming.rayjob_name("job")))
    events.clear()
    rec.rayjob_changed("DELETED", old)
    assert rayjob_of(kube)["metadata"]["uid"] != old["metadata"]["uid"]
    assert events.reasons == ["RayJobRecreated"]


def test_resync_recreates_a_lost_rayjob_and_mirrors_a_missed_change(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    name = naming.rayjob_name("job")
    kube.patch_status("RayJob", "team", name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert status(kube)["phase"] == "Running"
    kube.objects.pop(("RayJob", "team", name))
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert kube.get("RayJob", "team", name) is not None


def test_a_deleted_rayjob_of_a_finished_job_is_not_resurrected(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    name = naming.rayjob_name("job")
    rec.rayjob_changed(
        "MODIFIED", kube.patch_status("RayJob", "team", name, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    )
    old = kube.objects.pop(("RayJob", "team", name))
    rec.rayjob_changed("DELETED", old)
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert kube.get("RayJob", "team", name) is None


def test_parent_job_view_reads_a_plain_body() -> None:
    view = ParentJob.of({**job(runPolicy={"suspend": True}), "status": {"phase": "Running", "rayJobName": "r"}})
    assert (view.namespace, view.name, view.uid, view.generation) == ("team", "job", "uid-1", 1)
    assert (view.phase, view.rayjob_name, view.suspend, view.finished, view.deleting) == ("Running", "r", True, False, False)


# ------------------------------------------------------------------ issue 10: a busy, shared cluster
def test_a_renamed_copy_of_the_rayjob_cannot_drive_the_job(kube: FakeKube, rec: Reconciler) -> None:
    """`kubectl get rayjob -o yaml`, rename, apply, mark Failed: the job follows only its own RayJob."""
    rec.reconcile(created(kube, job()))
    real = rayjob_of(kube)
    copy_meta = {**real["metadata"], "name": "ftj-copy", "uid": "copy-uid"}
    copy = kube.put({**real, "metadata": copy_meta, "status": {"jobDeploymentStatus": "Failed", "reason": "AppFailed"}})
    rec.rayjob_changed("MODIFIED", copy)
    rec.rayjob_changed("DELETED", copy)
    assert status(kube)["phase"] == "Provisioning"
    rec.rayjob_changed(
        "MODIFIED", kube.patch_status("RayJob", "team", real["metadata"]["name"], {"jobDeploymentStatus": "Failed"})
    )
    assert status(kube)["phase"] == "Failed"


def test_a_rayjob_without_the_jobs_uid_label_cannot_drive_the_job(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    real = rayjob_of(kube)
    labels = {k: v for k, v in real["metadata"]["labels"].items() if k != naming.LABEL_JOB_UID}
    rec.rayjob_changed(
        "MODIFIED", {**real, "metadata": {**real["metadata"], "labels": labels}, "status": {"jobDeploymentStatus": "Failed"}}
    )
    assert status(kube)["phase"] == "Provisioning"


@pytest.mark.parametrize("kind", KINDS_IN_ORDER)
def test_a_child_left_by_a_deleted_namesake_is_waited_for_then_replaced(kube: FakeKube, rec: Reconciler, kind: str) -> None:
    """Delete + re-create of a job (GitOps, `kubectl replace --force`) while the garbage collector lags."""
    Reconciler(kube, SETTINGS, clock=lambda: NOW).reconcile(created(kube, job(uid="old-uid")))
    kube.objects.pop(("FineTuneJob", "team", "job"))
    for key in [k for k in kube.objects if k[0] != kind]:
        kube.objects.pop(key)  # the collector got the others already: only `kind` lingers
    new = created(kube, job(uid="new-uid", hyperparameters={"learningRate": 0.5}))
    with pytest.raises(Retry, match=f"{kind} team/.* still belongs to a deleted FineTuneJob"):
        rec.reconcile(new)
    # The old job's create, plus the new job's attempt when the RayJob is what lingers (it comes last).
    assert kube.count("create", "RayJob") == (2 if kind == "RayJob" else 1)
    kube.objects.pop(next(k for k in kube.objects if k[0] == kind))  # the collector catches up
    rec.reconcile(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    children = [o for o in kube.objects.values() if o["kind"] != "FineTuneJob"]
    assert {(controller_of(o) or {}).get("uid") for o in children} == {"new-uid"}
    config = kube.get("ConfigMap", "team", naming.config_map_name("job"))
    assert config is not None and '"learningRate": 0.5' in config["data"]["trainer.json"]


@pytest.mark.parametrize(
    ("owner", "reason"),
    [
        (None, "ChildConflict"),
        (
            {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "other", "uid": "u-9", "controller": True},
            "NameCollision",
        ),
    ],
)
def test_a_child_name_taken_by_something_else_fails_the_job_with_the_reason(
    kube: FakeKube, events: Events, rec: Reconciler, owner: dict[str, Any] | None, reason: str
) -> None:
    meta: dict[str, Any] = {"name": naming.config_map_name("job"), "namespace": "team"}
    if owner:
        meta["ownerReferences"] = [owner]
    kube.put({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"trainer.json": "{}"}})
    with pytest.raises(Refused, match="belongs to FineTuneJob 'other'" if owner else "no FineTuneJob controls it"):
        rec.reconcile(created(kube, job()))
    st = status(kube)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert (st["phase"], failed["status"], failed["reason"]) == ("Failed", "True", reason)
    assert "ConfigMap team/job-trainer-config" in failed["message"]
    assert next(c for c in st["conditions"] if c["type"] == "Validated")["status"] == "True"  # the spec is fine
    assert kube.count("create", "RayJob") == 0
    assert reason in events.reasons


def test_resync_checks_every_child_and_recreates_what_is_gone(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    kube.objects.pop(("ConfigMap", "team", naming.config_map_name("job")))
    kube.calls.clear()
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert kube.get("ConfigMap", "team", naming.config_map_name("job")) is not None
    assert sorted(k for v, k, _ in kube.calls if v == "read") == sorted(["FineTuneJob", *KINDS_IN_ORDER][1:])
    assert kube.count("create") == 1


def test_a_healthy_resync_costs_reads_only(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    kube.calls.clear()
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert {verb for verb, _, _ in kube.calls} == {"read"}
    assert len(kube.calls) == len(KINDS_IN_ORDER)


def test_a_running_job_is_not_judged_again_under_stricter_settings(kube: FakeKube) -> None:
    """Issue 9, item 4: a restart with a lower maxWorkers must not fail a job that is already running."""
    Reconciler(kube, SETTINGS, clock=lambda: NOW).reconcile(created(kube, job(resources={"workers": 4})))
    stricter = Reconciler(kube, OperatorSettings(metrics_port=0, max_workers=2), clock=lambda: NOW)
    stricter.reconcile(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]  # on.resume after the restart
    stricter.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert status(kube)["phase"] == "Provisioning"
    with pytest.raises(Refused):  # a new job is judged by the new limits
        stricter.reconcile(created(kube, job(name="new", uid="uid-2", resources={"workers": 4})))


@pytest.mark.parametrize("entry", ["reconcile", "resync"])
def test_a_forged_admission_in_status_is_not_trusted(kube: FakeKube, events: Events, entry: str) -> None:
    """The trainer's Role may patch status: a stale pod of a deleted namesake (or anyone with status access) could
    write Validated=True and a rayJobName onto a job the operator never admitted. Limits still apply to it."""
    stricter = Reconciler(kube, OperatorSettings(metrics_port=0, max_workers=2), emit=events, clock=lambda: NOW)
    forged = {
        "phase": "Provisioning",
        "rayJobName": naming.rayjob_name("job"),
        "conditions": [{"type": "Validated", "status": "True", "reason": "Admitted", "message": ""}],
    }
    body = created(kube, {**job(resources={"workers": 4}), "status": forged})
    if entry == "reconcile":
        with pytest.raises(Refused, match="FINETUNE_OPERATOR_MAX_WORKERS"):
            stricter.reconcile(body)
    else:
        stricter.resync(body)
    assert kube.count("create") == 0
    assert status(kube)["phase"] == "Failed"
    assert "InvalidSpec" in events.reasons


def test_a_deleted_rayjob_is_not_recreated_against_stricter_limits(kube: FakeKube, events: Events) -> None:
    Reconciler(kube, SETTINGS, clock=lambda: NOW).reconcile(created(kube, job(resources={"workers": 4})))
    kube.objects.pop(("RayJob", "team", naming.rayjob_name("job")))
    stricter = Reconciler(kube, OperatorSettings(metrics_port=0, max_workers=2), emit=events, clock=lambda: NOW)
    stricter.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert kube.get("RayJob", "team", naming.rayjob_name("job")) is None
    st = status(kube)
    assert st["phase"] == "Failed" and "no RayJob of this job exists" in st["message"]


# -------------------------------------------------------------------------------------- API faults
def _failure(status_code: int, kind: str, detail: str, verb: str = "create") -> ApiFailure:
    return ApiFailure(f"{verb} {kind} team/x", status_code, detail, kind=kind, verb=verb)


@pytest.mark.parametrize(
    ("code", "kind", "detail", "phase", "reason", "refused"),
    [
        (
            404,
            "RayJob",
            "HTTP 404 Not Found: the server could not find the requested resource",
            "Pending",
            "KubeRayNotInstalled",
            False,
        ),
        (
            403,
            "Role",
            'HTTP 403 Forbidden: roles.rbac.authorization.k8s.io is forbidden: User "x" cannot create',
            "Pending",
            "Forbidden",
            False,
        ),
        (
            403,
            "RayJob",
            'HTTP 403 Forbidden: admission webhook "validate.kyverno.svc" denied the request: no GPUs',
            "Pending",
            "RejectedByPolicy",
            False,
        ),
        (422, "RayJob", "HTTP 422 Unprocessable Entity: spec.rayClusterSpec: Invalid value", "Failed", "RejectedByAPI", True),
        (400, "ConfigMap", "HTTP 400 Bad Request: bad body", "Failed", "RejectedByAPI", True),
        (500, "RayJob", "HTTP 500 Internal Server Error", None, None, False),
        (429, "RayJob", "HTTP 429 Too Many Requests", None, None, False),
    ],
)
def test_api_faults_on_create_say_what_is_wrong(
    kube: FakeKube, rec: Reconciler, code: int, kind: str, detail: str, phase: str | None, reason: str | None, refused: bool
) -> None:
    kube.faults[("create", kind)] = _failure(code, kind, detail)
    with pytest.raises(Refused if refused else ApiFailure):
        rec.reconcile(created(kube, job()))
    st = status(kube)
    assert st.get("phase") == phase
    if reason is not None:
        condition = next(c for c in st["conditions"] if c["reason"] == reason)
        assert condition["type"] == ("Failed" if refused else "ClusterReady")
        assert detail.split(": ", 1)[-1][:20] in condition["message"]
    del kube.faults[("create", kind)]
    if not refused:  # the cause is fixed: the next retry goes on by itself
        rec.reconcile(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
        assert status(kube)["phase"] == "Provisioning"
        ready = next(c for c in status(kube)["conditions"] if c["type"] == "ClusterReady")
        assert ready["reason"] != reason


@pytest.mark.parametrize(
    ("attempt", "failure", "expected"),
    [
        (0, Retry("x", 5.0), 5.0),
        (3, Retry("x", 5.0), 40.0),
        (20, Retry("x", 5.0), RETRY_CAP_SECONDS),
        (0, _failure(500, "RayJob", "boom"), 10.0),
        (2, _failure(500, "RayJob", "boom"), 40.0),
        (0, _failure(403, "Role", "forbidden"), 30.0),
        (1, _failure(404, "RayJob", "not found"), 60.0),
        (50, _failure(403, "Role", "forbidden"), RETRY_CAP_SECONDS),
    ],
)
def test_retry_delays_grow_to_a_cap(attempt: int, failure: BaseException, expected: float) -> None:
    assert retry_delay(attempt, failure) == expected


def test_retry_after_from_a_429_is_honoured() -> None:
    throttled = ApiFailure("create RayJob team/x", 429, "HTTP 429", kind="RayJob", verb="create", retry_after=120.0)
    assert retry_delay(0, throttled) == 120.0
    assert retry_delay(5, throttled) == 320.0  # our own backoff, when longer, still wins
    assert retry_delay(0, ApiFailure("x y z", 429, "HTTP 429", retry_after=1e9)) == RETRY_CAP_SECONDS


def test_a_stale_decision_never_overwrites_a_newer_status(kube: FakeKube, rec: Reconciler) -> None:
    """Two writers race: one saw Running, the job has meanwhile Succeeded; the stale one must not win."""
    rec.reconcile(created(kube, job()))
    name = naming.rayjob_name("job")
    stale_parent = ParentJob.of(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    running = kube.patch_status("RayJob", "team", name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    rec.rayjob_changed(
        "MODIFIED", kube.patch_status("RayJob", "team", name, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    )
    assert status(kube)["phase"] == "Succeeded"
    rec.mirror(stale_parent, running)  # decided on a read from before the success
    assert status(kube)["phase"] == "Succeeded"
    assert kube.count("patch_status", "FineTuneJob") >= 3  # the stale write was tried, refused (409) and re-decided


def test_the_run_directory_is_unique_per_namespace(kube: FakeKube) -> None:
    """Two tenants, one bucket, one job name: different run directories, so neither resumes the other."""
    roots = []
    for namespace in ("team-a", "team-b"):
        body = job()
        body["metadata"]["namespace"] = namespace
        children = build_children(admit(body, SETTINGS), SETTINGS)
        config = json.loads(children.config_map["data"]["trainer.json"])
        roots.append(f"{config['outputRoot']}/{config['jobName']}")
    assert roots == ["s3://b/runs/team-a/job", "s3://b/runs/team-b/job"]


@pytest.mark.parametrize("what", ["deleted", "replaced", "deleting"])
def test_no_children_for_a_job_that_is_gone(kube: FakeKube, rec: Reconciler, what: str) -> None:
    """Kopf can call the create handler with the last body of a job deleted meanwhile: create nothing."""
    body = created(kube, job())
    if what == "deleted":
        kube.objects.pop(("FineTuneJob", "team", "job"))
    elif what == "replaced":
        kube.put(job(uid="another-uid"))
    else:
        kube.objects[("FineTuneJob", "team", "job")]["metadata"]["deletionTimestamp"] = "2026-11-30T12:00:00Z"
    rec.reconcile(body)
    assert kube.count("create") == 0 and kube.count("patch_status") == 0


def test_resync_starts_a_job_that_never_got_its_children(kube: FakeKube, rec: Reconciler) -> None:
    """The safety net covers a creation Kopf dropped (or one that failed): the resync round starts it."""
    created(kube, job())
    assert rec.resync_all() == 0
    assert status(kube)["phase"] == "Provisioning"
    assert kube.count("create", "RayJob") == 1


def test_a_running_job_that_newer_rules_refuse_is_followed_not_failed(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    """An operator upgrade with stricter validation: a job admitted earlier runs to its end."""
    rec.reconcile(created(kube, job()))
    stored = kube.objects[("FineTuneJob", "team", "job")]
    stored["spec"]["model"]["name"] = "resnet5"  # what the new rules refuse (the API server kept the old spec)
    kube.patch_status("RayJob", "team", naming.rayjob_name("job"), {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    rec.reconcile(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]  # on.resume after the upgrade
    assert status(kube)["phase"] == "Running"
    assert "NoLongerValid" in events.reasons
    kube.patch_status("RayJob", "team", naming.rayjob_name("job"), {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert status(kube)["phase"] == "Succeeded"


# ------------------------------------------------------- found by an adversarial review of the above
def _rayjob_named(kube: FakeKube, name: str) -> dict[str, Any] | None:
    return kube.get("RayJob", "team", name)


def test_an_upgrade_keeps_the_rayjob_an_older_operator_named(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    """Names got a longer hash: a running job's RayJob keeps its old name, and no second one is started."""
    rec.reconcile(created(kube, job()))
    new_name = naming.rayjob_name("job")
    old_name = "ftj-job-5e8c9"  # what the previous operator's 5-hex hash gave
    rayjob = kube.objects.pop(("RayJob", "team", new_name))
    kube.put(
        {
            **rayjob,
            "metadata": {**rayjob["metadata"], "name": old_name},
            "status": RUNNING,
        }
    )
    kube.objects.pop(("NetworkPolicy", "team", next(k[2] for k in kube.objects if k[0] == "NetworkPolicy")))  # it had none
    stored = kube.objects[("FineTuneJob", "team", "job")]
    stored["status"] = {**stored["status"], "rayJobName": old_name, "phase": "Running"}
    events.clear()
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    rec.reconcile(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]  # on.resume
    assert _rayjob_named(kube, new_name) is None
    assert status(kube)["phase"] == "Running"
    assert not any(k[0] == "NetworkPolicy" for k in kube.objects)  # running pods may lack the labels it admits
    rec.suspend_changed(kube.get("FineTuneJob", "team", "job"), True)  # type: ignore[arg-type]
    assert _rayjob_named(kube, old_name)["spec"]["suspend"] is True  # type: ignore[index]
    assert "RayJobCreated" not in events.reasons and "RayJobRecreated" not in events.reasons


class StaleList(FakeKube):
    """LIST answers with what the jobs were when the round began."""

    snapshot: list[dict[str, Any]]

    def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]:
        return [dict(body) for body in self.snapshot]


def test_resync_acts_on_the_job_as_it_is_now_not_as_listed() -> None:
    kube = StaleList()
    rec = Reconciler(kube, SETTINGS, clock=lambda: NOW)
    rec.reconcile(created(kube, job(runPolicy={"suspend": True})))
    kube.snapshot = [kube.get("FineTuneJob", "team", "job")]  # type: ignore[list-item]
    # Meanwhile the user resumes the job, and the operator resumes its RayJob.
    kube.objects[("FineTuneJob", "team", "job")]["spec"]["runPolicy"]["suspend"] = False
    rec.suspend_changed(kube.get("FineTuneJob", "team", "job"), False)  # type: ignore[arg-type]
    assert rec.resync_all() == 0
    assert rayjob_of(kube)["spec"]["suspend"] is False  # not suspended again from the stale listing
    # A job deleted after the LIST gets nothing recreated.
    kube.objects = {k: v for k, v in kube.objects.items() if k[0] == "FineTuneJob"}
    kube.objects.pop(("FineTuneJob", "team", "job"))
    kube.calls.clear()
    assert rec.resync_all() == 0
    assert kube.count("create") == 0


def test_a_failing_namespace_or_job_never_stops_the_round(kube: FakeKube, rec: Reconciler) -> None:
    for name in ("a", "b"):
        rec.reconcile(created(kube, job(name=name, uid=f"uid-{name}")))
    kube.objects.pop(("ConfigMap", "team", naming.config_map_name("b")))
    kube.faults[("read", "ServiceAccount")] = ApiFailure(
        "read ServiceAccount team/a-trainer", 500, "HTTP 500", kind="ServiceAccount", verb="read"
    )
    assert rec.resync_all(("team",)) == 2  # both jobs' reads of their ServiceAccount fail ...
    del kube.faults[("read", "ServiceAccount")]
    kube.faults[("list", "FineTuneJob")] = ApiFailure(
        "list FineTuneJob other/*", 403, "HTTP 403", kind="FineTuneJob", verb="list"
    )
    assert rec.resync_all(("other",)) == 1  # ... a namespace that refuses the LIST is counted and skipped
    del kube.faults[("list", "FineTuneJob")]
    assert rec.resync_all(("team",)) == 0
    assert kube.get("ConfigMap", "team", naming.config_map_name("b")) is not None


@pytest.mark.parametrize(
    ("verb", "kind", "code", "detail"),
    [
        ("read", "NetworkPolicy", 403, "HTTP 403 Forbidden: networkpolicies is forbidden"),
        ("create", "ConfigMap", 422, "HTTP 422: denied by ValidatingAdmissionPolicy"),
    ],
)
def test_a_running_job_keeps_its_phase_whatever_a_later_check_meets(
    kube: FakeKube, events: Events, rec: Reconciler, verb: str, kind: str, code: int, detail: str
) -> None:
    rec.reconcile(created(kube, job()))
    rec.rayjob_changed(
        "MODIFIED",
        kube.patch_status("RayJob", "team", naming.rayjob_name("job"), RUNNING),
    )
    kube.objects.pop(("ConfigMap", "team", naming.config_map_name("job")))
    kube.faults[(verb, kind)] = ApiFailure(f"{verb} {kind} team/x", code, detail, kind=kind, verb=verb)
    events.clear()
    with pytest.raises(ApiFailure):
        rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert status(kube)["phase"] == "Running"
    assert events and events[0][0] == "Warning"


def test_a_conflict_found_under_a_running_job_is_reported_not_fatal(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    cm = kube.objects.pop(("ConfigMap", "team", naming.config_map_name("job")))
    kube.put({**cm, "metadata": {"name": cm["metadata"]["name"], "namespace": "team"}})  # someone else's now
    with pytest.raises(Retry):
        rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert status(kube)["phase"] == "Provisioning"
    assert "ChildConflict" in events.reasons


def test_kueue_alone_lifts_a_queued_suspension(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job(runtime={"queueName": "gpu"})))
    kube.objects[("RayJob", "team", naming.rayjob_name("job"))]["spec"]["suspend"] = True  # Kueue holds it
    stored = kube.objects[("FineTuneJob", "team", "job")]
    for wanted in (True, False):  # the user suspends, then resumes, while Kueue has not admitted the job
        stored["spec"]["runPolicy"] = {"suspend": wanted}
        rec.reconcile(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]  # on.update runs first
        rec.suspend_changed(kube.get("FineTuneJob", "team", "job"), wanted)  # type: ignore[arg-type]
        assert rayjob_of(kube)["spec"]["suspend"] is True
    assert "Resume" not in events.reasons


def test_suspend_and_resume_are_announced_once_in_handler_order(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    stored = kube.objects[("FineTuneJob", "team", "job")]
    for wanted in (True, False):
        stored["spec"]["runPolicy"] = {"suspend": wanted}
        rec.reconcile(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]  # on.update, then on.field
        rec.suspend_changed(kube.get("FineTuneJob", "team", "job"), wanted)  # type: ignore[arg-type]
    assert [r for r in events.reasons if r in ("Suspend", "Resume")] == ["Suspend", "Resume"]


def test_a_finished_rayjob_deleted_before_its_status_was_mirrored_is_not_run_again(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    name = naming.rayjob_name("job")
    finished = kube.patch_status("RayJob", "team", name, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    kube.objects.pop(("RayJob", "team", name))  # the operator missed the Complete event; then the RayJob went
    rec.rayjob_changed("DELETED", finished)
    assert status(kube)["phase"] == "Succeeded"
    assert kube.get("RayJob", "team", name) is None


def test_a_retried_mirror_decides_on_the_current_rayjob(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    """A stale RayJob (Initializing) must not send a Running job back to Provisioning after a 409."""
    rec.reconcile(created(kube, job()))
    name = naming.rayjob_name("job")
    stale_parent = ParentJob.of(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    initializing = kube.patch_status("RayJob", "team", name, {"jobDeploymentStatus": "Initializing"})
    rec.rayjob_changed("MODIFIED", kube.patch_status("RayJob", "team", name, RUNNING))
    rec.mirror(stale_parent, initializing)
    assert status(kube)["phase"] == "Running"
    assert "PhaseProvisioning" not in events.reasons[events.reasons.index("PhaseRunning") :]


def test_observed_generation_moves_only_once_the_suspend_is_applied(kube: FakeKube, rec: Reconciler) -> None:
    """Issue 10 item 11: a RayJob event between the user's flip and the operator's patch claims nothing new."""
    rec.reconcile(created(kube, job()))
    stored = kube.objects[("FineTuneJob", "team", "job")]
    stored["spec"]["runPolicy"] = {"suspend": True}
    stored["metadata"]["generation"] = 2  # what the API server does on a spec change
    rec.rayjob_changed("MODIFIED", kube.patch_status("RayJob", "team", naming.rayjob_name("job"), RUNNING))
    assert status(kube)["observedGeneration"] == 1
    rec.suspend_changed(kube.get("FineTuneJob", "team", "job"), True)  # type: ignore[arg-type]
    rec.rayjob_changed("MODIFIED", rayjob_of(kube))
    assert status(kube)["observedGeneration"] == 2


# ------------------------------------------------------------------------------------------ Kueue
def workload(kube: FakeKube, rayjob: dict[str, Any], name: str = "rayjob-wl", *, owner_uid: str | None = None) -> dict[str, Any]:
    """The Workload Kueue makes for ``rayjob`` (labelled and owned by its uid; ``owner_uid`` forges the owner)."""
    uid = rayjob["metadata"]["uid"]
    owner = {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": rayjob["metadata"]["name"], "uid": owner_uid or uid}
    meta = {"name": name, "namespace": "team", "labels": {"kueue.x-k8s.io/job-uid": uid}, "ownerReferences": [owner]}
    return kube.put({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload", "metadata": meta, "spec": {"queueName": "gpu"}})


def flip_suspend(kube: FakeKube, rec: Reconciler, wanted: bool) -> None:
    """The user flips ``runPolicy.suspend``; Kopf runs on.update, then the field handler."""
    kube.objects[("FineTuneJob", "team", "job")]["spec"]["runPolicy"] = {"suspend": wanted}
    rec.reconcile(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    rec.suspend_changed(kube.get("FineTuneJob", "team", "job"), wanted)  # type: ignore[arg-type]


def test_suspending_an_admitted_queued_job_deactivates_its_workload(kube: FakeKube, events: Events, rec: Reconciler) -> None:
    """Kueue un-suspends an admitted RayJob whose spec.suspend someone else sets: only the Workload's
    spec.active=false holds. Resume reactivates it and leaves spec.suspend to Kueue's admission."""
    rec.reconcile(created(kube, job(runtime={"queueName": "gpu"})))
    workload(kube, rayjob_of(kube))  # admitted: the RayJob runs
    flip_suspend(kube, rec, True)
    assert kube.get("Workload", "team", "rayjob-wl")["spec"]["active"] is False  # type: ignore[index]
    assert rayjob_of(kube)["spec"]["suspend"] is True
    assert any(r == "Suspend" and "through Kueue: Workload rayjob-wl deactivated" in m for _, r, m in events)
    flip_suspend(kube, rec, False)
    assert kube.get("Workload", "team", "rayjob-wl")["spec"]["active"] is True  # type: ignore[index]
    assert rayjob_of(kube)["spec"]["suspend"] is True  # Kueue lifts it once it re-admits the Workload
    kube.patch_status("RayJob", "team", naming.rayjob_name("job"), {"jobDeploymentStatus": "Suspended"})  # KubeRay's word
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert (status(kube)["phase"], status(kube)["message"]) == (
        "Pending",
        "the RayJob is suspended by its queue (e.g. Kueue) until it is admitted",
    )
    assert [r for r in events.reasons if r in ("Suspend", "Resume")] == ["Suspend", "Resume"]


def test_a_workload_kueue_makes_after_the_suspend_is_deactivated_by_the_resync(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job(runtime={"queueName": "gpu"}, runPolicy={"suspend": True})))
    assert rayjob_of(kube)["spec"]["suspend"] is True
    workload(kube, rayjob_of(kube))  # Kueue makes it after the RayJob: active by default
    kube.patch_status("RayJob", "team", naming.rayjob_name("job"), {"jobDeploymentStatus": "Suspended"})
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert kube.get("Workload", "team", "rayjob-wl")["spec"]["active"] is False  # type: ignore[index]
    assert status(kube)["phase"] == "Suspended"


def test_only_the_rayjobs_own_workload_is_switched(kube: FakeKube, rec: Reconciler) -> None:
    """A Workload carrying the job-uid label but owned by something else (a forged label) is left alone."""
    rec.reconcile(created(kube, job(runtime={"queueName": "gpu"})))
    workload(kube, rayjob_of(kube), "forged", owner_uid="another-rayjob")
    flip_suspend(kube, rec, True)
    assert "active" not in kube.get("Workload", "team", "forged")["spec"]  # type: ignore[index]
    assert rayjob_of(kube)["spec"]["suspend"] is True  # no Workload of its own: the RayJob's flag is all there is


def test_no_kueue_installed_suspends_and_resumes_the_rayjob_directly(kube: FakeKube, rec: Reconciler) -> None:
    """A queueName on a cluster without Kueue: nobody else will ever lift the suspension, so resume does."""
    rec.reconcile(created(kube, job(runtime={"queueName": "gpu"})))
    kube.faults[("list", "Workload")] = ApiFailure(
        "list Workload team/x", 404, "HTTP 404 Not Found", kind="Workload", verb="list"
    )
    flip_suspend(kube, rec, True)
    assert rayjob_of(kube)["spec"]["suspend"] is True
    flip_suspend(kube, rec, False)
    assert rayjob_of(kube)["spec"]["suspend"] is False


def test_a_running_queued_job_costs_no_workload_list(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job(runtime={"queueName": "gpu"})))
    workload(kube, rayjob_of(kube))
    kube.calls.clear()
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert kube.count("list", "Workload") == 0 and kube.count("patch", "Workload") == 0


@pytest.mark.parametrize(("conflicts", "mirrored"), [(1, True), (CONFLICT_ATTEMPTS - 1, True), (CONFLICT_ATTEMPTS, False)])
def test_a_status_write_that_keeps_conflicting_is_redecided_until_it_lands(
    kube: FakeKube, rec: Reconciler, conflicts: int, mirrored: bool
) -> None:
    """Other writers (the trainer's progress, the create handler) change the job between each read and write: the
    mirror re-reads and writes again, up to CONFLICT_ATTEMPTS times, instead of leaving it to the minute's resync."""
    rec.reconcile(created(kube, job()))
    name = naming.rayjob_name("job")
    running = kube.patch_status("RayJob", "team", name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    parent = ParentJob.of(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    left = [conflicts]
    write = kube.patch_status

    def racing(kind: str, namespace: str, name: str, status: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
        if kind == "FineTuneJob" and left[0] > 0:  # another writer lands first: this write's resourceVersion is stale
            left[0] -= 1
            write(kind, namespace, name, {"progress": {"epoch": left[0]}})
        return write(kind, namespace, name, status, **kw)

    kube.patch_status = racing  # type: ignore[method-assign]
    if mirrored:
        rec.mirror(parent, running)
        assert status(kube)["phase"] == "Running"
    else:
        with pytest.raises(ApiFailure) as failure:
            rec.mirror(parent, running)
        assert failure.value.status == 409
        assert status(kube)["phase"] != "Running"


@pytest.mark.parametrize("wanted", [True, False])
def test_a_job_never_suspends_a_rayjob_it_does_not_control(kube: FakeKube, events: Events, rec: Reconciler, wanted: bool) -> None:
    """The review's attack: a job's trainer may patch its own status, so ``rayJobName`` there can name another job's
    RayJob; the job's suspend then flipped that RayJob (and tore its Ray cluster down, at every resync)."""
    rec.reconcile(created(kube, job("victim", uid="uid-v", runPolicy={"suspend": not wanted})))
    rec.reconcile(created(kube, job("evil", uid="uid-e", runPolicy={"suspend": not wanted})))
    evil = kube.get("FineTuneJob", "team", "evil")
    assert evil is not None
    evil["status"]["rayJobName"] = naming.rayjob_name("victim")  # written through the trainer's status Role
    events.clear()
    kube.calls.clear()
    rec.suspend_changed(evil, wanted)
    assert rayjob_of(kube, "victim")["spec"]["suspend"] is (not wanted)
    assert kube.count("patch") == 0 and events.reasons == []


def test_a_rayjob_replaced_by_a_foreign_one_is_said_in_the_conditions_not_mirrored(
    kube: FakeKube, events: Events, rec: Reconciler
) -> None:
    """The review's case: the job's RayJob deleted and another (no owner) created under its name. Each resync met a
    ChildConflict and only emitted an Event: the status went on saying Running / Training=True for a Ray cluster that
    was gone. Now the phase stays (never Failed over a child) and ClusterReady and Training say why."""
    rec.reconcile(created(kube, job()))
    name = naming.rayjob_name("job")
    kube.patch_status("RayJob", "team", name, RUNNING)
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert status(kube)["phase"] == "Running"
    gone = kube.objects.pop(("RayJob", "team", name))
    kube.put({"apiVersion": gone["apiVersion"], "kind": "RayJob", "metadata": {"name": name, "namespace": "team"}, "spec": {}})
    events.clear()
    for _ in range(2):
        with pytest.raises(Retry):
            rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    st = status(kube)
    conditions = {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}
    assert st["phase"] == "Running"
    assert conditions["ClusterReady"] == conditions["Training"] == ("False", "ChildConflict")
    assert st["message"].startswith(f"RayJob team/{name} exists and no FineTuneJob controls it")
    assert events.reasons == ["ChildConflict", "ChildConflict"]
    assert kube.get("RayJob", "team", name)["spec"] == {}  # type: ignore[index]  # never adopted nor changed


@pytest.mark.parametrize("written", ["another-cluster", naming.rayjob_name("victim")])
def test_a_rayjob_name_the_trainer_wrote_is_never_created(kube: FakeKube, rec: Reconciler, written: str) -> None:
    """The review's attacks through a job's own status (its trainer's Role may patch it): a made-up rayJobName made
    each resync create one more Ray cluster of the job's size, and a job's future RayJob name, taken first, failed that
    job as a name collision. Only a RayJob the job controls is followed under a recorded name; the status is put right."""
    rec.reconcile(created(kube, job("evil", uid="uid-e")))
    evil = kube.get("FineTuneJob", "team", "evil")
    assert evil is not None
    kube.patch_status("FineTuneJob", "team", "evil", {"rayJobName": written})
    rec.resync(kube.get("FineTuneJob", "team", "evil"))  # type: ignore[arg-type]
    assert sorted(k[2] for k in kube.objects if k[0] == "RayJob") == [naming.rayjob_name("evil")]
    assert status(kube, "evil")["rayJobName"] == naming.rayjob_name("evil")
    rec.reconcile(created(kube, job("victim", uid="uid-v")))
    assert status(kube, "victim")["phase"] == "Provisioning"
    assert controller_of(rayjob_of(kube, "victim"))["uid"] == "uid-v"  # type: ignore[index]


def test_a_rayjob_name_an_older_operator_recorded_is_followed_while_it_is_the_jobs(kube: FakeKube, rec: Reconciler) -> None:
    rec.reconcile(created(kube, job()))
    ours = kube.objects.pop(("RayJob", "team", naming.rayjob_name("job")))
    legacy = {**ours, "metadata": {**ours["metadata"], "name": "job-legacy-name"}}
    kube.put(legacy)
    kube.patch_status("FineTuneJob", "team", "job", {"rayJobName": "job-legacy-name"})
    rec.resync(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert sorted(k[2] for k in kube.objects if k[0] == "RayJob") == ["job-legacy-name"]  # not a second cluster
    assert status(kube)["rayJobName"] == "job-legacy-name"
