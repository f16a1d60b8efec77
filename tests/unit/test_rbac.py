"""The operator's RBAC table (``tests.support.k8s_tools.OPERATOR_RULES``, which the chart and kustomize tests hold
every rendered Role and ClusterRole to) is exactly what the operator's code calls, derived from the calls.

The reconcile rules run through every flow against the in-memory API, which records each call; each call is
mapped to the verb the API server authorizes. To that come what Kopf does itself (watches, finalizer and
progress annotations, Events) and what admission plugins ask of whoever sets ownerReferences. Nothing else
may be in the table, and nothing the code calls may be missing.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import pytest
import yaml

from finetune_operator.api import versions
from finetune_operator.failures import Refused
from finetune_operator.leadership import LeaderElector, Timing
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import OperatorSettings
from tests.support.fake_kube import FakeKube
from tests.support.k8s_tools import LEADER_ELECTION_RULES, OPERATOR_RULES, Permissions
from tests.support.schemas import REPO

FTJ = (versions.GROUP, versions.PLURAL)
RESOURCES = {
    "FineTuneJob": FTJ,
    "ServiceAccount": ("", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
    "ConfigMap": ("", "configmaps"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "RayJob": (versions.RAYJOB_GROUP, versions.RAYJOB_PLURAL),
    "Workload": (versions.KUEUE_GROUP, versions.WORKLOAD_PLURAL),
    "Pod": ("", "pods"),
    "Event": ("", "events"),
    "Lease": ("coordination.k8s.io", "leases"),
}
CHILDREN = set(RESOURCES) - {"FineTuneJob", "Workload", "Pod", "Event", "Lease"}
# Not calls of our code, each for a reason of its own.
KOPF: Permissions = {
    FTJ: frozenset({"list", "watch", "patch"}),  # watched; finalizer and progress annotations patched
    (versions.RAYJOB_GROUP, versions.RAYJOB_PLURAL): frozenset({"list", "watch"}),  # @kopf.on.event
    # kopf.event (and handlers._event_sink from the resync thread) post through the core API and never update.
    ("", "events"): frozenset({"create"}),
    # blockOwnerDeletion on children: OwnerReferencesPermissionEnforcement asks for update on the owner's finalizers.
    (versions.GROUP, f"{versions.PLURAL}/finalizers"): frozenset({"update"}),
    # RBAC's escalation rule: the operator must hold what it grants each trainer's Role (and patches status itself).
    (versions.GROUP, f"{versions.PLURAL}/status"): frozenset({"patch"}),
}


class RecordingKube(FakeKube):
    """The fake API, also noting the read that the real ``create_or_get`` makes after a conflict."""

    def __init__(self) -> None:
        super().__init__()
        self.reads_back: set[str] = set()

    def create_or_get(self, obj: Mapping[str, Any], *, read_back: bool = True) -> tuple[dict[str, Any] | None, bool]:
        if read_back:
            self.reads_back.add(obj["kind"])
        return super().create_or_get(obj, read_back=read_back)


def every_flow() -> RecordingKube:
    """A job through every rule: created, reconciled after a restart, suspended and resumed, resynced, its RayJob
    watched, resynced while its Ray cluster does not come up, deleted and recreated, and an invalid job refused."""
    kube = RecordingKube()
    rec = Reconciler(kube, OperatorSettings(metrics_port=0), emit=lambda *_: None, clock=lambda: datetime.now(timezone.utc))
    body = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
    body["metadata"] = {"name": "job", "namespace": "team", "uid": "u-1", "generation": 1}

    def stored() -> dict[str, Any]:
        found = kube.get("FineTuneJob", "team", "job")
        assert found is not None
        return found

    rec.reconcile(kube.put(body))
    rec.reconcile(stored())  # a restart: the known RayJob is read, nothing re-created
    rec.suspend_changed(stored(), True)
    rec.suspend_changed(stored(), False)
    rec.resync(stored())
    rayjob = next(obj for obj in kube.objects.values() if obj["kind"] == "RayJob")
    rec.rayjob_changed("MODIFIED", rayjob)
    # KubeRay (not the operator) reports the cluster being created.
    kube.objects[("RayJob", "team", rayjob["metadata"]["name"])]["status"] = {
        "jobDeploymentStatus": "Initializing",
        "rayClusterName": "c",
    }
    rec.resync(stored())  # a stuck cluster: its pods and Events are read
    del kube.objects[("RayJob", "team", rayjob["metadata"]["name"])]
    rec.rayjob_changed("DELETED", rayjob)
    bad = {
        **body,
        "metadata": {**body["metadata"], "name": "bad", "uid": "u-2"},
        "spec": {**body["spec"], "output": {"uri": "x"}},
    }
    with pytest.raises(Refused):
        rec.reconcile(kube.put(bad))
    # A job queued in Kueue, admitted, then suspended and resumed: through its Workload.
    queued = {**body, "metadata": {**body["metadata"], "name": "queued", "uid": "u-3"}}
    queued["spec"] = {**body["spec"], "runtime": {**body["spec"].get("runtime", {}), "queueName": "gpu"}}
    rec.reconcile(kube.put(queued))
    rayjob = next(
        o for o in kube.objects.values() if o["kind"] == "RayJob" and o["metadata"]["labels"].get("kueue.x-k8s.io/queue-name")
    )
    owner = {"kind": "RayJob", "name": rayjob["metadata"]["name"], "uid": rayjob["metadata"]["uid"]}
    labels = {"kueue.x-k8s.io/job-uid": rayjob["metadata"]["uid"]}
    kube.put({"kind": "Workload", "metadata": {"name": "wl", "namespace": "team", "labels": labels, "ownerReferences": [owner]}})
    rec.suspend_changed(kube.get("FineTuneJob", "team", "queued"), True)  # type: ignore[arg-type]
    rec.suspend_changed(kube.get("FineTuneJob", "team", "queued"), False)  # type: ignore[arg-type]
    return kube


def called(kube: RecordingKube) -> Permissions:
    """The calls as RBAC sees them: (apiGroup, resource) → verbs."""
    table: dict[tuple[str, str], set[str]] = {}
    verbs = {"read": "get", "list": "list", "create": "create", "patch": "patch", "update": "update"}
    for verb, kind, _ in kube.calls:
        group, resource = RESOURCES[kind]
        if verb == "patch_status":
            table.setdefault((group, f"{resource}/status"), set()).add("patch")
        else:
            table.setdefault((group, resource), set()).add(verbs[verb])
    for kind in kube.reads_back:
        table.setdefault(RESOURCES[kind], set()).add("get")
    return {key: frozenset(value) for key, value in table.items()}


def test_every_flow_creates_every_child_kind() -> None:
    created = {kind for verb, kind, _ in every_flow().calls if verb == "create"}
    assert created == CHILDREN


def test_leader_election_rbac_is_exactly_its_calls() -> None:
    """Every path of the election: create the Lease, renew it, lose it to another replica, take it back, release it."""
    kube, now = RecordingKube(), [0.0]
    me = LeaderElector(kube, "ops", "lease", "me", timing=Timing(15, 10, 2), clock=lambda: now[0])
    me.step()  # created
    me.step()  # renewed
    lease = kube.get("Lease", "ops", "lease")
    assert lease is not None
    kube.put({**lease, "spec": {**lease["spec"], "holderIdentity": "other"}})
    me.step()  # lost: another holds it
    now[0] += 15
    me.step()  # expired on our clock: taken back
    stop = threading.Event()
    stop.set()
    me.run(stop)  # released
    assert called(kube) == LEADER_ELECTION_RULES


def test_rbac_is_exactly_the_calls_plus_kopf_and_owner_references() -> None:
    expected: dict[tuple[str, str], set[str]] = {key: set(verbs) for key, verbs in called(every_flow()).items()}
    for key, verbs in KOPF.items():
        expected.setdefault(key, set()).update(verbs)
    # Every child carries an ownerReference: OwnerReferencesPermissionEnforcement asks its creator for `delete`.
    for kind in CHILDREN:
        expected[RESOURCES[kind]].add("delete")
    assert {key: frozenset(verbs) for key, verbs in expected.items()} == OPERATOR_RULES


def test_children_are_never_changed_except_the_rayjobs_suspend_flag() -> None:
    table = called(every_flow())
    children = {RESOURCES[kind] for kind in CHILDREN}
    assert {key for key in children if "patch" in table.get(key, frozenset())} == {RESOURCES["RayJob"]}
    # Every child is read back: on a 409, to check whose it is, and at every resync, to recreate what is gone.
    assert {key for key in children if "get" in table.get(key, frozenset())} == children
