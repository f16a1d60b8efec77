"""Faults between two of the reconcile rules' API calls (``finetune_operator.reconcile``), against the in-memory API.

Each test puts one fault or one concurrent edit between two calls the rules make (a status write refused with 409,
a RayJob replaced by someone else's, ...) and checks the end state: the job's status, the objects, and the requests
made. tests/unit/test_reconcile.py tables the rules themselves; tests/integration/test_faults.py the HTTP conversation.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from finetune_operator import naming
from finetune_operator.failures import ApiFailure, retry_delay
from finetune_operator.ownership import ParentJob
from finetune_operator.reconcile import Reconciler
from tests.support.fake_kube import FakeKube
from tests.unit.test_reconcile import NOW, RUNNING, SETTINGS, created, job, status


def test_a_retried_status_write_never_mirrors_a_foreign_rayjob_of_the_same_name(kube: FakeKube, rec: Reconciler) -> None:
    """A mirror's write meets a 409 (the trainer's progress landed first) and the RayJob is re-read by name: meanwhile
    the job's RayJob was deleted and someone else's (no owner) created under that name, which KubeRay fails. The retry
    decided on that one and failed the job for good; the watch and the resync never follow a RayJob the job does not
    control."""
    rec.reconcile(created(kube, job()))
    name = naming.rayjob_name("job")
    stale = ParentJob.of(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    ours = kube.patch_status("RayJob", "team", name, RUNNING)  # its event: the job is to be Running
    kube.patch_status("FineTuneJob", "team", "job", {"progress": {"epoch": 1}})  # the trainer's write: the next one 409s
    kube.objects.pop(("RayJob", "team", name))
    kube.put({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name, "namespace": "team"}, "spec": {}})
    kube.patch_status("RayJob", "team", name, {"jobDeploymentStatus": "Failed", "reason": "AppFailed"})
    rec.mirror(stale, ours)
    assert status(kube)["phase"] != "Failed"
    assert kube.count("patch_status", "FineTuneJob") == 3  # the trainer's, ours refused (409); none decided on theirs


def test_the_resync_starts_a_blocked_job_at_a_growing_pace_not_every_round(kube: FakeKube) -> None:
    """KubeRay is not installed: the job never gets its RayJob. Kopf's handler retries it at growing delays (30 s, 60 s,
    ... 600 s), but the resync round (every minute) started it again each time: six POSTs and six GETs per job and
    minute, for ever, whatever the back-off (1,000 such jobs: 200 requests a second). It keeps to the same delays."""
    clock = [NOW]
    rec = Reconciler(kube, SETTINGS, clock=lambda: clock[0])
    kube.faults[("create", "RayJob")] = ApiFailure(
        "create RayJob team/x", 404, "HTTP 404 Not Found", kind="RayJob", verb="create"
    )
    created(kube, job())
    tried = []
    for minute in range(10):  # ten rounds, a minute apart
        clock[0] = NOW + timedelta(minutes=minute)
        before = kube.count("create", "RayJob")
        rec.resync_all()
        if kube.count("create", "RayJob") > before:
            tried.append(minute)
    assert status(kube)["phase"] == "Pending"
    assert tried == [0, 1, 2, 4, 8]  # retry_delay's 30, 60, 120, 240 s: each round at or after it
    del kube.faults[("create", "RayJob")]  # KubeRay installed: started within the delay it is at (480 s)
    clock[0] = NOW + timedelta(minutes=16)
    rec.resync_all()
    assert status(kube)["phase"] == "Provisioning"


WEBHOOK_DOWN = (
    'HTTP 500 Internal Server Error: Internal error occurred: failed calling webhook "validate.kyverno.svc-fail": failed '
    'to call webhook: Post "https://kyverno-svc.kyverno.svc:443/validate/fail?timeout=10s": context deadline exceeded'
)


def test_an_admission_webhook_that_does_not_answer_is_said(kube: FakeKube, rec: Reconciler) -> None:
    """A policy engine's webhook is down (failurePolicy Fail): the API server answers every create with 500. That was
    taken for the API server's own passing trouble and retried without a word: the job showed no phase at all, for as
    long as the webhook stayed down. It waits in Pending saying which webhook, and retries at the slower pace."""
    kube.faults[("create", "RayJob")] = ApiFailure("create RayJob team/x", 500, WEBHOOK_DOWN, kind="RayJob", verb="create")
    with pytest.raises(ApiFailure) as failure:
        rec.reconcile(created(kube, job()))
    assert retry_delay(0, failure.value) == 30.0  # people fix webhooks slowly, as RBAC
    st = status(kube)
    ready = next(c for c in st["conditions"] if c["type"] == "ClusterReady")
    assert (st["phase"], ready["reason"]) == ("Pending", "WebhookUnavailable")
    assert 'failed calling webhook "validate.kyverno.svc-fail"' in st["message"] and "\n" not in st["message"]
    del kube.faults[("create", "RayJob")]
    rec.reconcile(kube.get("FineTuneJob", "team", "job"))  # type: ignore[arg-type]
    assert status(kube)["phase"] == "Provisioning"


def test_a_rayjob_deleted_while_its_job_starts_being_deleted_is_not_recreated(
    kube: FakeKube, rec: Reconciler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The RayJob's DELETED event reads the job (live), mirrors the RayJob's last status, then reads the job again to
    recreate the RayJob. A `kubectl delete` of the job between the two reads: the second read sees it going, and a
    new RayJob (a new Ray cluster, for a job being deleted) must not be made."""
    rec.reconcile(created(kube, job()))
    name = naming.rayjob_name("job")
    rayjob = kube.objects.pop(("RayJob", "team", name))
    reads = {"FineTuneJob": 0}
    read = kube.read

    def read_then_delete(kind: str, namespace: str, obj_name: str) -> dict[str, object] | None:
        if kind == "FineTuneJob":
            reads[kind] += 1
            if reads[kind] == 2:  # the user deletes the job now (its finalizers hold it a moment)
                kube.objects[("FineTuneJob", namespace, obj_name)]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return read(kind, namespace, obj_name)

    monkeypatch.setattr(kube, "read", read_then_delete)
    rec.rayjob_changed("DELETED", rayjob)
    assert reads["FineTuneJob"] >= 2  # the event's path did read the job twice, the second time as it went
    assert kube.get("RayJob", "team", name) is None
    assert kube.count("create", "RayJob") == 1  # the first, by the create handler; none for the going job
