"""Faults between two of the reconcile rules' API calls (``finetune_operator.reconcile``), against the in-memory API.

Each test puts one fault or one concurrent edit between two calls the rules make (a status write refused with 409,
a RayJob replaced by someone else's, ...) and checks the end state: the job's status, the objects, and the requests
made. tests/unit/test_reconcile.py tables the rules themselves; tests/integration/test_faults.py the HTTP conversation.
"""

from __future__ import annotations

from finetune_operator import naming
from finetune_operator.ownership import ParentJob
from finetune_operator.reconcile import Reconciler
from tests.support.fake_kube import FakeKube
from tests.unit.test_reconcile import RUNNING, created, job, status


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
