"""``spec.resources.dataWorkers`` (issue 14, item 2's cluster side) and Ray Train's report poll on the cluster
(item 4): the rendered RayJob's CPU-only ``data`` group, table-driven, the training group's custom Ray resource and
the trainer's ScalingConfig asking for it only then, and one-line refusals of bad values by pydantic and the CRD.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from finetune_operator import diagnosis
from finetune_operator.api.contract import ENV_REPORT_POLL, REPORT_POLL_SECONDS, TRAIN_RESOURCE
from finetune_operator.api.crd import build_crd
from finetune_operator.api.v1alpha1 import ResourcesSpec
from finetune_operator.api.validate import validate_document
from finetune_operator.settings import OperatorSettings
from finetune_trainer import driver
from tests.support.pod_security import template_violations
from tests.support.schemas import REPO, crd_schema, strict_errors
from tests.unit.test_rayjob import RAYJOB_SCHEMA, SETTINGS, body, children_of, pod_templates

DATA = {"replicas": 3, "cpusPerWorker": 8, "memoryPerWorker": "16Gi"}
OVERRIDES = {
    "imagePullSecrets": [{"name": "regcred"}],
    "labels": {"team": "vision"},
    "annotations": {"example.com/owner": "vision"},
    "volumes": [{"name": "ca", "secret": {"secretName": "ca"}}],
    "volumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/ca", "readOnly": True}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Exists"}],
}
GPU = {
    "workers": 2,
    "gpusPerWorker": 4,
    "nodeSelector": {"gpu": "a100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
}

# id → (spec sections, data group expected: (replicas, container resources) or None, TRAIN_RESOURCE per training pod)
CASES: dict[str, tuple[dict[str, Any], tuple[int, dict[str, str]] | None, int | None]] = {
    "absent": ({}, None, None),
    "zero-replicas": ({"resources": {"dataWorkers": {"replicas": 0}}}, None, None),
    "defaults": ({"resources": {"dataWorkers": {}}}, (1, {"cpu": "4", "memory": "8Gi"}), 1),
    "cpu-job": ({"resources": {"dataWorkers": DATA}}, (3, {"cpu": "8", "memory": "16Gi"}), 1),
    "fractional-cpu": (
        {"resources": {"dataWorkers": {"replicas": 2, "cpusPerWorker": 1.5, "memoryPerWorker": "3Gi"}}},
        (2, {"cpu": "1500m", "memory": "3Gi"}),
        1,
    ),
    "gpu-job": (
        {"resources": {**GPU, "dataWorkers": DATA}, "hyperparameters": {"batchSize": 64}},
        (3, {"cpu": "8", "memory": "16Gi"}),
        4,
    ),
    "pod-overrides": (
        {"resources": {**GPU, "dataWorkers": DATA}, "runtime": {"pod": OVERRIDES, "priorityClassName": "batch"}},
        (3, {"cpu": "8", "memory": "16Gi"}),
        4,
    ),
    "pvc-and-env": (
        {
            "resources": {"dataWorkers": DATA},
            "dataset": {"format": "imagefolder", "trainUri": "pvc://data/train"},
            "runtime": {"env": [{"name": "A", "value": "1"}], "envFrom": [{"secretRef": {"name": "s3"}}]},
        },
        (3, {"cpu": "8", "memory": "16Gi"}),
        1,
    ),
}


def _rayjob(case: str, settings: OperatorSettings = SETTINGS) -> dict[str, Any]:
    return children_of(body(**copy.deepcopy(CASES[case][0])), settings).rayjob


def _groups(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


def _train_resource(group: dict[str, Any]) -> int | None:
    """The TRAIN_RESOURCE a group's pods offer, read as KubeRay reads rayStartParams.resources (quotes trimmed)."""
    text = group["rayStartParams"].get("resources")
    return None if text is None else json.loads(text.strip("'\"` ")).get(TRAIN_RESOURCE)


# ------------------------------------------------------------------------------------- the data group
@pytest.mark.parametrize("case", CASES)
def test_data_group_is_rendered_cpu_only_with_the_given_size(case: str) -> None:
    _, expected, _ = CASES[case]
    groups = _groups(_rayjob(case))
    if expected is None:
        assert list(groups) == ["workers"]
        return
    assert list(groups) == ["workers", "data"]
    data = groups["data"]
    replicas, resources = expected
    assert data["replicas"] == data["minReplicas"] == data["maxReplicas"] == replicas
    assert data["rayStartParams"] == {}  # Ray's CPUs are the pod's (KubeRay reads the limit); no GPU, no TRAIN_RESOURCE
    (container,) = data["template"]["spec"]["containers"]
    assert container["resources"] == {"limits": resources, "requests": resources}  # Guaranteed, no accelerator


@pytest.mark.parametrize("case", CASES)
def test_only_training_pods_offer_the_training_resource_and_only_with_data_workers(case: str) -> None:
    _, _, per_pod = CASES[case]
    groups = _groups(_rayjob(case))
    assert _train_resource(groups["workers"]) == per_pod
    assert "data" not in groups or _train_resource(groups["data"]) is None
    assert "resources" not in _rayjob(case)["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]


@pytest.mark.parametrize("case", CASES)
def test_rayjob_with_data_workers_validates_against_kuberay_schema(case: str) -> None:
    assert strict_errors(_rayjob(case), RAYJOB_SCHEMA) == []


@pytest.mark.parametrize("case", CASES)
def test_every_pod_with_data_workers_meets_the_restricted_profile(case: str) -> None:
    templates = pod_templates(_rayjob(case))
    for role, template in templates.items():
        assert template_violations(template) == [], role
        ray = template["spec"]["containers"][0]
        init = {"name": "wait-gcs-ready", "image": ray["image"], "securityContext": copy.deepcopy(ray["securityContext"])}
        assert template_violations({"spec": {**template["spec"], "initContainers": [init]}}) == [], role


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] is not None])
def test_data_pod_is_a_worker_pod_without_accelerator_scheduling_or_token(case: str) -> None:
    """Same image, env, volumes, labels, securityContext and pod overrides; not the GPU nodeSelector and tolerations
    (a data pod belongs on a CPU node), no accelerator, and no ServiceAccount token (rank 0 is on a training pod)."""
    groups = _groups(_rayjob(case))
    worker, data = (copy.deepcopy(groups[name]["template"]) for name in ("workers", "data"))
    assert data["spec"]["automountServiceAccountToken"] is False and worker["spec"]["automountServiceAccountToken"] is True
    for pod in (worker, data):
        pod["spec"].pop("automountServiceAccountToken")
        pod["spec"]["containers"][0].pop("resources")
    resources = CASES[case][0]["resources"]
    overrides = CASES[case][0].get("runtime", {}).get("pod", {})
    assert worker["spec"].pop("nodeSelector", {}) == {**overrides.get("nodeSelector", {}), **resources.get("nodeSelector", {})}
    assert data["spec"].pop("nodeSelector", {}) == overrides.get("nodeSelector", {})
    own = [{"key": "nvidia.com/gpu", "operator": "Exists"}] if "tolerations" in resources else []
    assert worker["spec"].pop("tolerations", []) == [*overrides.get("tolerations", []), *own]
    assert data["spec"].pop("tolerations", []) == overrides.get("tolerations", [])
    assert data == worker


def test_pod_overrides_reach_the_data_pods() -> None:
    data = _groups(_rayjob("pod-overrides"))["data"]["template"]
    assert data["metadata"]["labels"]["team"] == "vision"
    assert data["metadata"]["annotations"] == {"example.com/owner": "vision"}
    spec = data["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}] and spec["priorityClassName"] == "batch"
    assert {"name": "ca", "mountPath": "/etc/ssl/ca", "readOnly": True} in spec["containers"][0]["volumeMounts"]


@pytest.mark.parametrize("case", ["cpu-job", "pod-overrides"])
def test_network_policy_and_stuck_diagnosis_count_the_data_pods(case: str) -> None:
    children = children_of(body(**copy.deepcopy(CASES[case][0])), SETTINGS)
    assert children.network_policy is not None
    selector = children.network_policy["spec"]["podSelector"]["matchLabels"]
    data = _groups(children.rayjob)["data"]["template"]
    assert selector.items() <= data["metadata"]["labels"].items()
    peers = [p["podSelector"] for rule in children.network_policy["spec"]["ingress"] for p in rule.get("from", [])]
    assert {"matchLabels": selector} in peers  # data pods are let in by the job's own-pods rule
    workers = CASES[case][0]["resources"].get("workers", 1)
    assert diagnosis._wanted_workers(children.rayjob) == workers + DATA["replicas"]


# --------------------------------------------------------------------------------- Ray Train's report poll
@pytest.mark.parametrize("case", ["absent", "cpu-job"])
def test_report_poll_is_lowered_in_every_ray_pod(case: str) -> None:
    """The driver is the entrypoint on the head (its env: the head container's), and Ray Train hands the driver's value
    to its controller: an epoch shorter than 2 s is no longer stretched to 2 s on the cluster either."""
    templates = pod_templates(_rayjob(case))
    for role, template in templates.items():
        if role == "submitter":  # `ray job submit` only: the driver does not run there
            continue
        env = template["spec"]["containers"][0]["env"]
        assert [e for e in env if e["name"] == ENV_REPORT_POLL] == [{"name": ENV_REPORT_POLL, "value": REPORT_POLL_SECONDS}], role
    assert float(REPORT_POLL_SECONDS) < 2.0


def test_report_poll_set_by_the_job_is_kept() -> None:
    job = body(runtime={"env": [{"name": ENV_REPORT_POLL, "value": "1"}]})
    head = children_of(job, SETTINGS).rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert [e for e in head["containers"][0]["env"] if e["name"] == ENV_REPORT_POLL] == [{"name": ENV_REPORT_POLL, "value": "1"}]


# ------------------------------------------------------------------------------- the trainer's ScalingConfig
@pytest.mark.parametrize(
    ("resources", "local", "per_worker"),
    [
        ({"workers": 2}, False, {"CPU": 2.0}),
        ({"workers": 2, "dataWorkers": {"replicas": 0}}, False, {"CPU": 2.0}),
        ({"workers": 2, "dataWorkers": DATA}, False, {"CPU": 2.0, TRAIN_RESOURCE: 1.0}),
        (
            {"workers": 2, "gpusPerWorker": 4, "cpusPerWorker": 8, "dataWorkers": DATA},
            False,
            {"CPU": 2.0, "GPU": 1.0, TRAIN_RESOURCE: 1.0},
        ),
        # `finetune run`: an embedded Ray has no data pods and no TRAIN_RESOURCE; asking would wait for ever.
        ({"workers": 2, "dataWorkers": DATA}, True, {"CPU": 2.0}),
    ],
)
def test_training_workers_ask_for_the_training_resource_only_with_data_workers(
    resources: dict[str, Any], local: bool, per_worker: dict[str, float]
) -> None:
    res = ResourcesSpec.model_validate(resources)
    assert driver.scaling_config(res, local=local).resources_per_worker == per_worker


@pytest.mark.parametrize("case", ["cpu-job", "gpu-job"])
def test_training_pods_offer_exactly_what_their_workers_ask(case: str) -> None:
    """Every Ray Train worker of a pod fits it: the pod's TRAIN_RESOURCE is its workers times the ask."""
    res = ResourcesSpec.model_validate(CASES[case][0]["resources"])
    ask = driver.scaling_config(res).resources_per_worker or {}
    offered = _train_resource(_groups(_rayjob(case))["workers"])
    assert offered == res.train_workers // res.workers * ask[TRAIN_RESOURCE]


# ------------------------------------------------------------------------------------------- validation
P = "spec.resources.dataWorkers"
BAD: list[tuple[str, dict[str, Any], str, list[str]]] = [
    ("replicas-too-many", {"replicas": 300}, f"{P}.replicas", ["300", "256"]),
    ("replicas-negative", {"replicas": -1}, f"{P}.replicas", ["-1", "0"]),
    ("replicas-text", {"replicas": "many"}, f"{P}.replicas", ["'many'", "integer"]),
    ("cpus-zero", {"cpusPerWorker": 0}, f"{P}.cpusPerWorker", ["0", "greater than 0"]),
    ("cpus-too-many", {"cpusPerWorker": 1000}, f"{P}.cpusPerWorker", ["1000", "512"]),
    ("memory-not-a-quantity", {"memoryPerWorker": "lots"}, f"{P}.memoryPerWorker", ["'lots'", "4Gi"]),
    ("unknown-field", {"gpusPerWorker": 1}, f"{P}.gpusPerWorker", ["replicas", "cpusPerWorker", "memoryPerWorker"]),
]


def _doc(data_workers: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "manifests/examples/digits-cpu.yaml").read_text())
    doc["spec"].setdefault("resources", {})["dataWorkers"] = data_workers
    return doc


@pytest.mark.parametrize(("value", "field", "fragments"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_data_workers_get_one_line_naming_field_value_and_accepted(
    value: dict[str, Any], field: str, fragments: list[str]
) -> None:
    result = validate_document(_doc(value), "job.yaml")
    matching = [e for e in result.errors if e.startswith(f"{field}: ")]
    assert matching, result.errors
    assert all(f in matching[0] for f in fragments), matching[0]
    assert "\n" not in matching[0] and "Traceback" not in matching[0]


@pytest.mark.parametrize(("value", "field"), [(b[1], b[2]) for b in BAD], ids=[b[0] for b in BAD])
def test_crd_refuses_bad_data_workers_at_kubectl_apply(value: dict[str, Any], field: str) -> None:
    errors = strict_errors(_doc(value), crd_schema(build_crd(), "v1alpha1"))
    assert any(e.startswith(f"{field}:") for e in errors), errors


def test_good_data_workers_pass_both() -> None:
    doc = _doc(DATA)
    assert validate_document(doc, "job.yaml").ok
    assert strict_errors(doc, crd_schema(build_crd(), "v1alpha1")) == []
