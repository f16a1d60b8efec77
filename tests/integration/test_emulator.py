"""Tests of the Kubernetes API emulator (tests/support/kube_emulator.py) and the Kopf runner.

Everything goes over real HTTP (``requests`` and the official ``kubernetes`` client), the way Kopf
and the operator reach the API server; the last tests run a toy Kopf operator against it.
"""

from __future__ import annotations

import json
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import kopf
import kubernetes
import pytest
import requests

from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import ApiError, KubeEmulator

pytestmark = pytest.mark.timeout(60)

FTJ = "/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs"
RAYJOBS = "/apis/ray.io/v1/namespaces/default/rayjobs"
CM = "/api/v1/namespaces/default/configmaps"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


@pytest.fixture
def http(emu: KubeEmulator) -> Iterator[Api]:
    with Api(emu.url) as api:
        yield api


class Api:
    """``requests`` against the emulator, with API paths only."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = requests.Session()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.session.close()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return self.session.request(method, self.base + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)


def ftj(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec or {"model": "resnet18"},
    }


def configmap(name: str, labels: dict[str, str] | None = None, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels or {}}, "data": data}


class Watch:
    """An open watch stream read line by line; the server ends it after ``timeoutSeconds`` at the latest."""

    def __init__(self, http: Api, path: str, **params: str) -> None:
        self.response = http.get(path, params={"watch": "true", "timeoutSeconds": "10", **params}, stream=True)
        assert self.response.status_code == 200, self.response.text
        self._lines = self.response.iter_lines()

    def take(self, count: int) -> list[dict[str, Any]]:
        return [json.loads(next(self._lines)) for _ in range(count)]

    def close(self) -> None:
        self.response.close()


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"]["name"]) for e in events]


# --------------------------------------------------------------------------------------------------
# Discovery


def test_discovery_serves_core_group_and_namespaces(http: Api) -> None:
    core = http.get("/api/v1").json()
    assert core["groupVersion"] == "v1"
    assert {"configmaps", "namespaces", "events", "serviceaccounts"} <= {r["name"] for r in core["resources"]}
    groups = {g["name"] for g in http.get("/apis").json()["groups"]}
    assert {"finetune.dev", "ray.io", "rbac.authorization.k8s.io", "apiextensions.k8s.io", "coordination.k8s.io"} <= groups
    ftj_resources = {r["name"]: r for r in http.get("/apis/finetune.dev/v1alpha1").json()["resources"]}
    assert ftj_resources["finetunejobs"]["namespaced"] is True
    assert {"watch", "list", "patch"} <= set(ftj_resources["finetunejobs"]["verbs"])
    assert "finetunejobs/status" in ftj_resources

    namespaces = http.get("/api/v1/namespaces")  # HTTP 500 in plain kmock 0.8
    assert namespaces.status_code == 200
    assert "default" in {ns["metadata"]["name"] for ns in namespaces.json()["items"]}
    assert http.get("/api/v1/namespaces/default").json()["status"]["phase"] == "Active"
    crds = http.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions").json()["items"]
    assert {"finetunejobs.finetune.dev", "rayjobs.ray.io"} <= {c["metadata"]["name"] for c in crds}


# --------------------------------------------------------------------------------------------------
# Metadata, resourceVersion, generation


def test_metadata_and_resource_versions(http: Api) -> None:
    created = http.post(FTJ, json=ftj("a"))
    assert created.status_code == 201
    meta = created.json()["metadata"]
    assert meta["namespace"] == "default"
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1
    rv1 = int(meta["resourceVersion"])

    # One counter for the whole server, strings on the wire, bumped by every write.
    cm_rv = int(http.post(CM, json=configmap("c")).json()["metadata"]["resourceVersion"])
    patched = http.patch(f"{FTJ}/a", json={"metadata": {"labels": {"x": "y"}}}, headers=MERGE).json()
    assert rv1 < cm_rv < int(patched["metadata"]["resourceVersion"])
    assert patched["metadata"]["uid"] == meta["uid"]

    listing = http.get(FTJ).json()
    assert listing["kind"] == "FineTuneJobList"
    assert int(listing["metadata"]["resourceVersion"]) >= int(patched["metadata"]["resourceVersion"])

    # Writes that change nothing do not bump the resourceVersion (Kopf relies on that to settle).
    again = http.patch(f"{FTJ}/a", json={"metadata": {"labels": {"x": "y"}}}, headers=MERGE).json()
    assert again["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]

    generated = http.post(CM, json={"metadata": {"generateName": "gen-"}, "data": {}}).json()
    assert generated["metadata"]["name"].startswith("gen-") and len(generated["metadata"]["name"]) == 9
    assert "generation" not in generated["metadata"]  # ConfigMaps have none, as in Kubernetes


def test_generation_bumps_only_on_spec_changes(http: Api) -> None:
    http.post(FTJ, json=ftj("g", epochs=1))

    def generation() -> int:
        return int(http.get(f"{FTJ}/g").json()["metadata"]["generation"])

    http.patch(f"{FTJ}/g", json={"metadata": {"annotations": {"a": "b"}, "finalizers": ["x/y"]}}, headers=MERGE)
    http.patch(f"{FTJ}/g/status", json={"status": {"phase": "Running"}}, headers=MERGE)
    assert generation() == 1
    http.patch(f"{FTJ}/g", json={"spec": {"epochs": 2}}, headers=MERGE)
    assert generation() == 2
    obj = http.get(f"{FTJ}/g").json()
    obj["spec"]["epochs"] = 3
    assert http.put(f"{FTJ}/g", json=obj).json()["metadata"]["generation"] == 3
    # A client cannot set the generation (or other server-owned metadata) itself.
    http.patch(f"{FTJ}/g", json={"metadata": {"generation": 99, "uid": "forged"}}, headers=MERGE)
    assert generation() == 3
    assert http.get(f"{FTJ}/g").json()["metadata"]["uid"] != "forged"


# --------------------------------------------------------------------------------------------------
# The status subresource


def test_status_subresource_is_separate_from_the_main_resource(http: Api) -> None:
    created = http.post(FTJ, json={**ftj("s"), "status": {"phase": "Forged"}}).json()
    assert "status" not in created  # ignored on create, as for any resource with a status subresource

    main = http.patch(f"{FTJ}/s", json={"spec": {"model": "vit"}, "status": {"phase": "Ignored"}}, headers=MERGE).json()
    assert main["spec"]["model"] == "vit" and "status" not in main

    status = http.patch(f"{FTJ}/s/status", json={"spec": {"model": "ignored"}, "status": {"phase": "Running"}}, headers=MERGE)
    assert status.status_code == 200
    assert status.json()["status"] == {"phase": "Running"}
    assert status.json()["spec"]["model"] == "vit"

    # PUT on the main resource keeps the status; PUT on /status changes only the status.
    obj = http.get(f"{FTJ}/s").json()
    replaced = http.put(f"{FTJ}/s", json={**obj, "spec": {"model": "convnext"}, "status": {"phase": "Lost"}}).json()
    assert replaced["spec"] == {"model": "convnext"} and replaced["status"] == {"phase": "Running"}
    replaced = http.put(f"{FTJ}/s/status", json={**replaced, "spec": {"model": "no"}, "status": {"phase": "Done"}}).json()
    assert replaced["spec"] == {"model": "convnext"} and replaced["status"] == {"phase": "Done"}

    # ConfigMaps have no status subresource: /status is not found.
    http.post(CM, json=configmap("c"))
    assert http.patch(f"{CM}/c/status", json={"status": {}}, headers=MERGE).status_code == 404


# --------------------------------------------------------------------------------------------------
# Errors and optimistic concurrency


def test_errors_are_kubernetes_status_objects(http: Api) -> None:
    assert http.post(FTJ, json=ftj("dup")).status_code == 201
    duplicate = http.post(FTJ, json=ftj("dup"))
    assert duplicate.status_code == 409
    assert duplicate.json() | {"details": None} == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'finetunejobs.finetune.dev "dup" already exists',
        "reason": "AlreadyExists",
        "code": 409,
        "details": None,
    }
    assert duplicate.json()["details"] == {"name": "dup", "group": "finetune.dev", "kind": "finetunejobs"}

    missing = http.get(f"{FTJ}/nope")
    assert (missing.status_code, missing.json()["kind"], missing.json()["reason"]) == (404, "Status", "NotFound")
    assert http.patch(f"{FTJ}/nope", json={}, headers=MERGE).status_code == 404
    assert http.delete(f"{FTJ}/nope").status_code == 404
    assert http.get("/apis/finetune.dev/v1alpha1/namespaces/default/unknowns").status_code == 404
    assert http.post(f"{CM}", json=configmap("Bad_Name")).status_code == 422
    assert http.post("/api/v1/namespaces/absent/configmaps", json=configmap("c")).status_code == 404


def test_stale_resource_version_is_a_conflict(http: Api) -> None:
    stale = http.post(FTJ, json=ftj("c")).json()
    fresh = http.patch(f"{FTJ}/c", json={"spec": {"model": "vit"}}, headers=MERGE).json()

    conflict = http.put(f"{FTJ}/c", json={**stale, "spec": {"model": "lost update"}})
    assert (conflict.status_code, conflict.json()["reason"]) == (409, "Conflict")
    stale_patch = {"metadata": {"resourceVersion": stale["metadata"]["resourceVersion"]}, "spec": {"model": "x"}}
    assert http.patch(f"{FTJ}/c", json=stale_patch, headers=MERGE).status_code == 409
    assert http.get(f"{FTJ}/c").json()["spec"]["model"] == "vit"

    assert http.put(f"{FTJ}/c", json={**fresh, "spec": {"model": "ok"}}).status_code == 200
    fresh_patch = {
        "metadata": {"resourceVersion": http.get(f"{FTJ}/c").json()["metadata"]["resourceVersion"]},
        "spec": {"model": "ok2"},
    }
    assert http.patch(f"{FTJ}/c", json=fresh_patch, headers=MERGE).status_code == 200


def test_json_patch_with_a_failed_test_is_422(http: Api) -> None:
    rv = http.post(FTJ, json=ftj("j")).json()["metadata"]["resourceVersion"]
    add_finalizer = [{"op": "add", "path": "/metadata/finalizers", "value": ["finetune.dev/finalizer"]}]

    failed = http.patch(
        f"{FTJ}/j", json=[{"op": "test", "path": "/metadata/resourceVersion", "value": "999"}, *add_finalizer], headers=JSON_PATCH
    )
    assert (failed.status_code, failed.json()["reason"]) == (422, "Invalid")
    assert "finalizers" not in http.get(f"{FTJ}/j").json()["metadata"]

    ok = http.patch(
        f"{FTJ}/j", json=[{"op": "test", "path": "/metadata/resourceVersion", "value": rv}, *add_finalizer], headers=JSON_PATCH
    )
    assert ok.status_code == 200
    assert ok.json()["metadata"]["finalizers"] == ["finetune.dev/finalizer"]

    # JSON patches on /status are tested against the whole object but change only the status.
    rv = ok.json()["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/status", "value": {"phase": "A"}},
    ]
    assert http.patch(f"{FTJ}/j/status", json=ops, headers=JSON_PATCH).json()["status"] == {"phase": "A"}
    assert http.patch(f"{FTJ}/j/status", json=ops, headers=JSON_PATCH).status_code == 422

    # Custom resources refuse strategic merge patches, as the real API server does.
    strategic = http.patch(f"{FTJ}/j", json={"spec": {}}, headers={"Content-Type": "application/strategic-merge-patch+json"})
    assert strategic.status_code == 415


# --------------------------------------------------------------------------------------------------
# Selectors, pagination


def test_list_filters_by_label_and_field_selectors(http: Api) -> None:
    http.post(CM, json=configmap("a1", {"app": "a", "tier": "web"}))
    http.post(CM, json=configmap("a2", {"app": "a", "tier": "db"}))
    http.post(CM, json=configmap("b1", {"app": "b"}))
    http.post(CM, json=configmap("none"))

    def names(**params: str) -> list[str]:
        response = http.get(CM, params=params)
        assert response.status_code == 200, response.text
        return [item["metadata"]["name"] for item in response.json()["items"]]

    assert names() == ["a1", "a2", "b1", "none"]
    assert names(labelSelector="app=a") == ["a1", "a2"]
    assert names(labelSelector="app==a,tier=db") == ["a2"]
    assert names(labelSelector="app!=a") == ["b1", "none"]
    assert names(labelSelector="tier") == ["a1", "a2"]
    assert names(labelSelector="!tier") == ["b1", "none"]
    assert names(labelSelector="app in (a, b),tier notin (web)") == ["a2", "b1"]
    assert names(fieldSelector="metadata.name=b1") == ["b1"]
    assert names(fieldSelector="metadata.name!=b1", labelSelector="app") == ["a1", "a2"]
    assert http.get(CM, params={"labelSelector": "app=(broken"}).status_code == 400

    first = http.get(CM, params={"limit": "3"}).json()
    assert [i["metadata"]["name"] for i in first["items"]] == ["a1", "a2", "b1"]
    rest = http.get(CM, params={"limit": "3", "continue": first["metadata"]["continue"]}).json()
    assert [i["metadata"]["name"] for i in rest["items"]] == ["none"]
    assert not rest["metadata"].get("continue")


def test_watch_filters_by_labels_and_translates_selection_changes(http: Api) -> None:
    http.post(CM, json=configmap("in", {"app": "a"}))
    http.post(CM, json=configmap("out", {"app": "b"}))
    watch = Watch(http, CM, labelSelector="app=a")
    try:
        assert summary(watch.take(1)) == [("ADDED", "in")]  # no resourceVersion: the current state first
        http.patch(f"{CM}/out", json={"data": {"k": "v"}}, headers=MERGE)  # not selected: not seen
        http.patch(f"{CM}/in", json={"data": {"k": "v"}}, headers=MERGE)
        http.patch(f"{CM}/out", json={"metadata": {"labels": {"app": "a"}}}, headers=MERGE)  # enters the selection
        http.patch(f"{CM}/in", json={"metadata": {"labels": {"app": "b"}}}, headers=MERGE)  # leaves it
        http.post(CM, json=configmap("new", {"app": "a"}))
        http.delete(f"{CM}/new")
        events = watch.take(5)
        assert summary(events) == [("MODIFIED", "in"), ("ADDED", "out"), ("DELETED", "in"), ("ADDED", "new"), ("DELETED", "new")]
        versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
        assert versions == sorted(versions)
    finally:
        watch.close()


def test_watch_from_a_resource_version_misses_nothing(http: Api) -> None:
    http.post(CM, json=configmap("before"))
    listing = http.get(CM).json()
    # Changes between the list and the watch: a watch from the list's version must deliver them.
    http.post(CM, json=configmap("between"))
    http.patch(f"{CM}/before", json={"data": {"k": "v"}}, headers=MERGE)
    watch = Watch(http, CM, resourceVersion=listing["metadata"]["resourceVersion"])
    try:
        assert summary(watch.take(2)) == [("ADDED", "between"), ("MODIFIED", "before")]
        http.delete(f"{CM}/between")
        assert summary(watch.take(1)) == [("DELETED", "between")]
    finally:
        watch.close()

    # Concurrent writers while watches start from successive list versions: every change arrives once.
    writes = 30

    def writer() -> None:
        with Api(http.base) as own:  # its own connection, concurrent with the watch's
            for i in range(writes):
                own.post(CM, json=configmap(f"w{i}"))

    listing = http.get(CM).json()
    thread = threading.Thread(target=writer)
    thread.start()
    watch = Watch(http, CM, resourceVersion=listing["metadata"]["resourceVersion"])
    try:
        names = [name for _, name in summary(watch.take(writes))]
        assert names == [f"w{i}" for i in range(writes)]
    finally:
        watch.close()
        thread.join()


def test_watch_from_a_compacted_version_is_410() -> None:
    with KubeEmulator(history_limit=2) as emu, Api(emu.url) as http:
        rv = http.post(CM, json=configmap("a")).json()["metadata"]["resourceVersion"]
        for name in "bcd":
            http.post(CM, json=configmap(name))
        watch = Watch(http, CM, resourceVersion=rv)
        try:
            [event] = watch.take(1)
            assert event["type"] == "ERROR" and event["object"]["code"] == 410
        finally:
            watch.close()


def test_watch_with_timeout_seconds_ends(http: Api) -> None:
    response = http.get(CM, params={"watch": "true", "timeoutSeconds": "1"}, stream=True)
    assert list(response.iter_lines()) == []


# --------------------------------------------------------------------------------------------------
# Deletion: finalizers, owner references, namespaces


def test_finalizers_hold_deletion_until_removed(http: Api) -> None:
    http.post(FTJ, json={**ftj("f"), "metadata": {"name": "f", "finalizers": ["finetune.dev/finalizer"]}})
    rv = http.get(FTJ).json()["metadata"]["resourceVersion"]
    watch = Watch(http, FTJ, resourceVersion=rv)
    try:
        deleting = http.delete(f"{FTJ}/f")
        assert deleting.status_code == 200
        assert deleting.json()["metadata"]["deletionTimestamp"]
        assert http.get(f"{FTJ}/f").json()["metadata"]["deletionTimestamp"]  # still there
        assert summary(watch.take(1)) == [("MODIFIED", "f")]
        # No new finalizers on an object being deleted; spec and status can still change.
        assert (
            http.patch(
                f"{FTJ}/f", json={"metadata": {"finalizers": ["finetune.dev/finalizer", "other"]}}, headers=MERGE
            ).status_code
            == 422
        )
        assert http.patch(f"{FTJ}/f/status", json={"status": {"phase": "Deleting"}}, headers=MERGE).status_code == 200

        released = http.patch(f"{FTJ}/f", json={"metadata": {"finalizers": None}}, headers=MERGE)
        assert released.status_code == 200
        assert http.get(f"{FTJ}/f").status_code == 404
        assert summary(watch.take(2)) == [("MODIFIED", "f"), ("DELETED", "f")]
    finally:
        watch.close()


def test_owner_references_cascade_on_real_deletion(emu: KubeEmulator, http: Api) -> None:
    parent = http.post(FTJ, json=ftj("parent")).json()
    other = http.post(FTJ, json=ftj("other")).json()

    def owned_by(*owners: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "apiVersion": o["apiVersion"],
                "kind": o["kind"],
                "name": o["metadata"]["name"],
                "uid": o["metadata"]["uid"],
                "controller": i == 0,
            }
            for i, o in enumerate(owners)
        ]

    rayjob = http.post(
        RAYJOBS,
        json={"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "rj", "ownerReferences": owned_by(parent)}},
    ).json()
    http.post(CM, json={**configmap("grandchild"), "metadata": {"name": "grandchild", "ownerReferences": owned_by(rayjob)}})
    http.post(
        CM, json={**configmap("held"), "metadata": {"name": "held", "ownerReferences": owned_by(parent), "finalizers": ["x/y"]}}
    )
    http.post(CM, json={**configmap("shared"), "metadata": {"name": "shared", "ownerReferences": owned_by(parent, other)}})
    http.post(CM, json=configmap("unrelated"))

    assert http.delete(f"{FTJ}/parent").status_code == 200
    assert http.get(f"{RAYJOBS}/rj").status_code == 404
    assert http.get(f"{CM}/grandchild").status_code == 404  # recursively
    assert http.get(f"{CM}/held").json()["metadata"]["deletionTimestamp"]  # its finalizers still hold it
    assert http.get(f"{CM}/shared").status_code == 200  # another owner still exists
    assert http.get(f"{CM}/unrelated").status_code == 200

    emu.remove_finalizers("configmaps", "default", "held")
    assert emu.find("configmaps", "default", "held") is None
    emu.delete("finetunejobs", "default", "other")
    assert emu.find("configmaps", "default", "shared") is None

    # The Orphan propagation policy keeps the dependents and drops their reference to the owner.
    owner = emu.create(ftj("orphaner"))
    emu.create({**configmap("orphan"), "metadata": {"name": "orphan", "ownerReferences": owned_by(owner)}})
    assert http.delete(f"{FTJ}/orphaner", params={"propagationPolicy": "Orphan"}).status_code == 200
    assert "ownerReferences" not in emu.get("configmaps", "default", "orphan")["metadata"]


def test_namespaces_gate_and_cascade(emu: KubeEmulator, http: Api) -> None:
    assert (
        http.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}}).status_code
        == 201
    )
    assert http.post("/api/v1/namespaces/team/configmaps", json=configmap("c")).status_code == 201
    emu.create({**ftj("f"), "metadata": {"name": "f", "namespace": "team", "finalizers": ["x/y"]}})

    assert http.delete("/api/v1/namespaces/team").status_code == 200
    assert http.get("/api/v1/namespaces/team").json()["status"]["phase"] == "Terminating"
    assert http.get("/api/v1/namespaces/team/configmaps/c").status_code == 404
    assert http.post("/api/v1/namespaces/team/configmaps", json=configmap("late")).status_code == 403
    emu.remove_finalizers("finetunejobs", "team", "f")  # the last object goes, then the namespace
    assert http.get("/api/v1/namespaces/team").status_code == 404

    assert emu.add_namespace("extra", labels={"a": "b"})["metadata"]["labels"]["a"] == "b"
    assert [ns["metadata"]["name"] for ns in emu.list("namespaces", label_selector="a=b")] == ["extra"]


# --------------------------------------------------------------------------------------------------
# Clients and helpers


def test_official_kubernetes_client_works(emu: KubeEmulator, tmp_path: pathlib.Path) -> None:
    with emu.kubernetes_client() as api:
        # Any: the typed client wants its models, but plain dicts are what it sends anyway.
        core: Any = kubernetes.client.CoreV1Api(api)
        custom: Any = kubernetes.client.CustomObjectsApi(api)

        created = core.create_namespaced_config_map("default", configmap("k", {"app": "k"}, a="1"))
        assert created.metadata.resource_version and created.metadata.uid
        with pytest.raises(kubernetes.client.ApiException) as exc_info:
            core.create_namespaced_config_map("default", configmap("k"))
        assert exc_info.value.status == 409
        assert json.loads(exc_info.value.body or "{}")["reason"] == "AlreadyExists"

        patched = core.patch_namespaced_config_map("k", "default", {"data": {"b": "2"}})  # strategic merge for core types
        assert patched.data == {"a": "1", "b": "2"}
        assert [cm.metadata.name for cm in core.list_namespaced_config_map("default", label_selector="app=k").items] == ["k"]

        custom.create_namespaced_custom_object("finetune.dev", "v1alpha1", "default", "finetunejobs", ftj("via-client"))
        custom.patch_namespaced_custom_object_status(
            "finetune.dev", "v1alpha1", "default", "finetunejobs", "via-client", {"status": {"phase": "P"}}
        )
        obj = custom.get_namespaced_custom_object("finetune.dev", "v1alpha1", "default", "finetunejobs", "via-client")
        assert obj["status"] == {"phase": "P"}

        # The client's watch helper: resumes from a resourceVersion and ends at timeout_seconds.
        rv = core.list_namespaced_config_map("default").metadata.resource_version
        core.delete_namespaced_config_map("k", "default")
        watch: Any = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        for event in watch.stream(core.list_namespaced_config_map, "default", resource_version=rv, timeout_seconds=5):
            assert (event["type"], event["object"].metadata.name) == ("DELETED", "k")
            watch.stop()

    # A kubeconfig file works for config loaders (and kubectl).
    path = emu.write_kubeconfig(tmp_path / "kubeconfig")
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(path), client_configuration=configuration)  # type: ignore[no-untyped-call]
    with kubernetes.client.ApiClient(configuration) as api:
        loaded_core: Any = kubernetes.client.CoreV1Api(api)
        assert "default" in {ns.metadata.name for ns in loaded_core.list_namespace().items}

    with emu.as_default_kubernetes_config(), kubernetes.client.ApiClient() as api:
        default_core: Any = kubernetes.client.CoreV1Api(api)
        assert default_core.read_namespace("default").metadata.name == "default"


def test_sync_helpers_and_request_counts(emu: KubeEmulator, http: Api) -> None:
    emu.create(ftj("h"))
    assert emu.get("finetune.dev/v1alpha1/finetunejobs", "default", "h")["spec"] == {"model": "resnet18"}
    assert emu.get("FineTuneJob", "default", "h") == emu.get("ftj", "default", "h")
    assert emu.patch_status("finetunejobs", "default", "h", {"phase": "X"})["status"] == {"phase": "X"}
    assert (
        emu.patch("finetunejobs", "default", "h", [{"op": "replace", "path": "/spec/model", "value": "vit"}])["metadata"][
            "generation"
        ]
        == 2
    )
    with pytest.raises(ApiError) as exc_info:
        emu.create(ftj("h"))
    assert exc_info.value.code == 409
    seeded = emu.create({**ftj("seeded"), "status": {"phase": "Seeded"}}, keep_status=True)
    assert seeded["status"] == {"phase": "Seeded"}
    emu.get("finetunejobs", "default", "h")["spec"]["model"] = "mutated"  # copies: the store is unaffected
    assert emu.get("finetunejobs", "default", "h")["spec"]["model"] == "vit"

    emu.reset_request_counts()
    http.get(FTJ)
    http.get(f"{FTJ}/h")
    http.patch(f"{FTJ}/h/status", json={"status": {"phase": "Y"}}, headers=MERGE)
    http.post(CM, json=configmap("counted"))
    http.get("/apis")
    assert emu.request_counts() == {"list": 1, "get": 1, "patch": 1, "create": 1, "discovery": 1}
    assert emu.request_counts("finetunejobs") == {"list": 1, "get": 1}
    assert emu.request_counts("finetunejobs", subresource="status") == {"patch": 1}

    # kmock's own features stay: reactions override the emulation (fault injection), objects keep history.
    emu.kmock[f"get {FTJ}/h"] << 503
    assert http.get(f"{FTJ}/h").status_code == 503
    history = emu.kmock.objects["finetune.dev/v1alpha1/finetunejobs", "default", "h"].history
    assert [version["spec"]["model"] for version in history if version is not None] == ["resnet18", "resnet18", "vit", "vit"]


# --------------------------------------------------------------------------------------------------
# Kopf against the emulator


def toy_operator(emu: KubeEmulator) -> kopf.OperatorRegistry:
    """A minimal operator in the shape of ours: a child object owned by the job, status, a finalizer."""
    registry = kopf.OperatorRegistry()

    @kopf.on.create("finetune.dev", "v1alpha1", "finetunejobs", registry=registry)
    def create_child(*, body: kopf.Body, name: str, namespace: str | None, patch: kopf.Patch, **_: Any) -> None:
        child = configmap(f"{name}-config", model=body["spec"]["model"])
        kopf.adopt(child, owner=body)
        with emu.kubernetes_client() as api:  # the official client, as the operator's create-or-get does
            core: Any = kubernetes.client.CoreV1Api(api)
            core.create_namespaced_config_map(namespace, child)
        kopf.info(body, reason="ChildCreated", message=f"{name}-config")
        patch.status["phase"] = "Created"

    @kopf.on.delete("finetune.dev", "v1alpha1", "finetunejobs", registry=registry)
    def cleanup(*, patch: kopf.Patch, **_: Any) -> None:
        patch.status["phase"] = "Deleted"  # the handler only needs to exist: it makes Kopf add a finalizer

    return registry


def test_kopf_operator_creates_owned_child_and_cascades_deletion(emu: KubeEmulator) -> None:
    with KopfRunner(emu, registry=toy_operator(emu)) as runner:
        emu.create(ftj("job", model="resnet18"))

        child = runner.wait_for(lambda: emu.find("configmaps", "default", "job-config"), message="child ConfigMap")
        job = emu.get("finetunejobs", "default", "job")
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "FineTuneJob",
            "job",
            job["metadata"]["uid"],
            True,
        )
        assert child["data"] == {"model": "resnet18"}

        job = emu.wait_for_object("finetunejobs", "default", "job", lambda j: j.get("status", {}).get("phase") == "Created")
        assert job["metadata"]["finalizers"] == ["finetune.dev/finalizer"]
        assert "finetune.dev/last-handled-configuration" in job["metadata"]["annotations"]
        assert job["metadata"]["generation"] == 1  # Kopf's annotations, finalizer & status bump no generation
        events = runner.wait_for(lambda: emu.list("events", "default", field_selector="reason=ChildCreated"))
        assert events[0]["involvedObject"]["uid"] == job["metadata"]["uid"]

        emu.delete("finetunejobs", "default", "job")  # Kopf's delete handler runs, then releases the finalizer
        runner.wait_for(lambda: emu.find("finetunejobs", "default", "job") is None, message="job deleted")
        assert emu.find("configmaps", "default", "job-config") is None  # collected with its owner
        runner.check()


def test_kopf_namespaced_operator_follows_new_namespaces(emu: KubeEmulator) -> None:
    registry = kopf.OperatorRegistry()

    @kopf.on.create("finetune.dev", "v1alpha1", "finetunejobs", registry=registry)
    def mark(*, patch: kopf.Patch, **_: Any) -> None:
        patch.status["phase"] = "Seen"

    def job_in(namespace: str) -> dict[str, Any]:
        return {**ftj(f"in-{namespace}"), "metadata": {"name": f"in-{namespace}", "namespace": namespace}}

    emu.add_namespace("team-a")
    with KopfRunner(emu, registry=registry, namespaces=["team-*"]):
        emu.create(job_in("default"))  # not served by this operator
        emu.create(job_in("team-a"))
        emu.add_namespace("team-b")  # Kopf learns of it from its watch on /api/v1/namespaces
        emu.create(job_in("team-b"))
        for namespace in ("team-a", "team-b"):
            emu.wait_for_object("finetunejobs", namespace, f"in-{namespace}", lambda j: j.get("status", {}).get("phase"))
        assert "status" not in emu.get("finetunejobs", "default", "in-default")
        assert emu.watch_count("finetunejobs") == 2


def test_kopf_runner_reports_a_failed_operator(emu: KubeEmulator) -> None:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def broken(**_: Any) -> None:
        raise kopf.PermanentError("broken on purpose")

    runner = KopfRunner(emu, registry=registry)
    with pytest.raises(RuntimeError, match="the Kopf operator failed"):
        runner.start()
    assert not runner.running
