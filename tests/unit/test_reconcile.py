"""The reconcile rules (``finetune_operator.reconcile.Reconciler``) against an in-memory API: no Kopf, no emulator.

Each test states one rule and checks the end state: objects, status, Events and the API calls made.
The same flows run against the HTTP emulator and Kopf in tests/integration/test_operator.py.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from finetune_operator import naming
from finetune_operator.admission import admit
from finetune_operator.failures import ApiFailure, Refused, Retry
from finetune_operator.reconcile import ParentJob, Reconciler, controller_of
from finetune_operator.settings import OperatorSettings
from tests.support.fake_kube import FakeKube

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
SETTINGS = OperatorSettings(metrics_port=0)
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


class Events(list[tuple[str, str, str]]):
    def __call__(self, obj: Any, type_: str, reason: str, message: str) -> None:
        self.append((type_, reason, message))

    @property
    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self]


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def rec(kube: FakeKube, events: Events) -> Reconciler:
    return Reconciler(kube, SETTINGS, emit=events, clock=lambda: NOW)


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


def test_a_rayjob_event_before_the_create_handler_finished_writes_nothing(kube: FakeKube, rec: Reconciler) -> None:
    body = created(kube, job())
    Reconciler(kube, SETTINGS, clock=lambda: NOW).ensure_children(admit(body, SETTINGS))
    rec.rayjob_changed("ADDED", rayjob_of(kube))
    assert status(kube) == {}


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
