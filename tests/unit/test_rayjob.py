"""The pure RayJob builder: golden files per example, KubeRay v1.7.0 schema (+ no prunable field), every pod of
every job under the "restricted" Pod Security profile, RBAC, names. (tests/unit/test_isolation.py: the rest of
the isolation: submitter pod, ServiceAccount tokens, Ray token auth, the NetworkPolicy.)

Regenerate the golden files after an intended change with ``UPDATE_GOLDEN=1 pytest tests/unit/test_rayjob.py``
and review the diff: it is what every cluster running the operator will see.
"""

from __future__ import annotations

import copy
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import naming
from finetune_operator.admission import MAX_SPEC_BYTES, AdmissionError, admit
from finetune_operator.api.contract import CONFIG_PATH, ENTRYPOINT, PVC_MOUNT_ROOT, TrainerConfig
from finetune_operator.api.crd import build_crd
from finetune_operator.api.v1alpha1 import FineTuneJob
from finetune_operator.api.validate import load_job
from finetune_operator.rayjob import Children, build_children
from finetune_operator.render import render_objects, to_yaml
from finetune_operator.settings import OperatorSettings
from tests.support.pod_security import template_violations
from tests.support.schemas import KUBERAY_SCHEMAS, REPO, crd_schema, strict_errors

ALL_EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))
# The demo's jobs write to ./runs and chain through it: `finetune run` only, refused by the operator.
LOCAL_ONLY = {"digits-source", "digits-transfer"}
EXAMPLES = [p for p in ALL_EXAMPLES if p.stem not in LOCAL_ONLY]
GOLDEN = Path(__file__).parent / "golden"
SETTINGS = OperatorSettings()
# The same schema as tests.support.schemas.kuberay_schema(), parsed with libyaml: 0.4 s instead of 4 s.
RAYJOB_SCHEMA = crd_schema(yaml.load((KUBERAY_SCHEMAS / "ray.io_rayjobs.yaml").read_text(), Loader=yaml.CSafeLoader), "v1")


def example_job(path: Path) -> FineTuneJob:
    job = load_job(path.read_text(), str(path))
    job.metadata.namespace = job.metadata.namespace or "default"
    # A fixed uid per name so the golden files show the owner references the operator sets.
    job.metadata.uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"finetune.dev/{job.metadata.name}"))
    return job


def body(name: str = "job", namespace: str = "team", uid: str = "u-1", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"name": "resnet18"},
        "dataset": {"format": "digits"},
        "output": {"uri": "s3://bucket/runs"},
    }
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value}
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": 1},
        "spec": base,
    }


def children_of(job: FineTuneJob | dict[str, Any], settings: OperatorSettings = SETTINGS) -> Children:
    """What the operator builds for ``job``: admitted first, as it always is."""
    return build_children(admit(job, settings), settings)


def containers(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    return [c for pod in pods for c in pod["containers"]]


def worker_pod(rayjob: dict[str, Any]) -> dict[str, Any]:
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert len(groups) == 1
    pod: dict[str, Any] = groups[0]["template"]["spec"]
    return pod


# ------------------------------------------------------------------------------------------- golden
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    rendered = to_yaml(children_of(example_job(path), SETTINGS).all())
    golden = GOLDEN / f"{path.stem}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(rendered)
    assert golden.exists(), f"no golden file {golden}; run UPDATE_GOLDEN=1 pytest {__file__}"
    assert rendered == golden.read_text(), f"{golden.name} drifted; review, then UPDATE_GOLDEN=1 pytest {__file__}"


def test_every_golden_file_has_an_example() -> None:
    assert {p.stem for p in GOLDEN.glob("*.yaml")} == {p.stem for p in EXAMPLES}


@pytest.mark.parametrize("stem", sorted(LOCAL_ONLY))
def test_local_only_examples_are_refused_with_the_reason(stem: str) -> None:
    with pytest.raises(AdmissionError) as err:
        children_of(example_job(REPO / "manifests" / "examples" / f"{stem}.yaml"), SETTINGS)
    assert any(line.startswith("spec.output.uri: 'runs' is not shared by the Ray pods") for line in err.value.lines)


@pytest.mark.parametrize(
    ("spec", "field", "fragment"),
    [
        ({"output": {"uri": "runs"}}, "spec.output.uri", "pvc://CLAIM/PATH"),
        ({"output": {"uri": "/mnt/out"}}, "spec.output.uri", "not shared by the Ray pods"),
        ({"output": {"uri": "file:///mnt/out"}}, "spec.output.uri", "s3://BUCKET/PATH"),
        ({"model": {"name": "resnet18", "weightsUri": "runs/a/model.pt"}}, "spec.model.weightsUri", "relative path"),
        ({"dataset": {"format": "imagefolder", "trainUri": "data/train"}}, "spec.dataset.trainUri", "relative path"),
    ],
)
def test_cluster_only_rules(spec: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(AdmissionError) as err:
        children_of(body(**spec), SETTINGS)
    assert any(line.startswith(f"{field}: ") and fragment in line for line in err.value.lines), err.value.lines


def test_absolute_input_paths_are_allowed_on_a_cluster() -> None:
    spec = body(dataset={"format": "imagefolder", "trainUri": "/data/train"}, model={"name": "resnet18", "weightsUri": "/w.pt"})
    assert children_of(spec, SETTINGS).rayjob["kind"] == "RayJob"


# ------------------------------------------------------------------------------------------- schema
EDGE_CASES: dict[str, dict[str, Any]] = {
    "pvc-output": body(output={"uri": "pvc://models/finetune"}),
    "pvc-everywhere": body(
        model={"name": "resnet18", "weightsUri": "pvc://weights/resnet18.pt"},
        dataset={
            "format": "imagefolder",
            "trainUri": "pvc://data/train",
            "validationUri": "pvc://data/val",
            "cacheDir": "pvc://scratch/c",
        },
        output={"uri": "pvc://models/out"},
    ),
    "queue": body(runtime={"queueName": "gpu-queue", "priorityClassName": "batch"}),
    "service-account": body(runtime={"serviceAccountName": "ml-runner"}),
    "gpu-tolerations": body(
        resources={
            "workers": 4,
            "gpusPerWorker": 2,
            "cpusPerWorker": 1.5,
            "memoryPerWorker": "30Gi",
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}],
        },
        hyperparameters={"batchSize": 64},
    ),
    "amd": body(resources={"gpusPerWorker": 1, "accelerator": "amd.com/gpu"}),
    # Every spec.runtime.pod override (tests/unit/test_pod_overrides.py), on top of the workers' own scheduling.
    "pod-overrides": body(
        runtime={
            "pod": {
                "imagePullSecrets": [{"name": "regcred"}],
                "labels": {"team": "vision"},
                "annotations": {"example.com/owner": "vision"},
                "volumes": [
                    {"name": "ca", "secret": {"secretName": "ca", "defaultMode": 420}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                    {"name": "proj", "projected": {"sources": [{"configMap": {"name": "c"}}]}},
                    {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"]}}}},
                ],
                "volumeMounts": [
                    {"name": "ca", "mountPath": "/etc/ssl/ca", "readOnly": True},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                "securityContext": {
                    "readOnlyRootFilesystem": True,
                    "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/ray.json"},
                    "appArmorProfile": {"type": "RuntimeDefault"},
                },
            }
        },
        resources={"nodeSelector": {"gpu": "a100"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
    ),
    "suspended-with-deadline": body(
        runPolicy={"suspend": True, "activeDeadlineSeconds": 600, "backoffLimit": 3, "ttlSecondsAfterFinished": 0}
    ),
    "env": body(
        runtime={
            "env": [{"name": "A", "value": "1"}],
            "envFrom": [{"secretRef": {"name": "s3"}}, {"configMapRef": {"name": "cfg"}, "prefix": "X_"}],
            "image": "registry.local/trainer:dev",
            "rayVersion": "2.52.0",
        }
    ),
    "long-name": body(name="a" * 253),
    "dotted-name": body(name="9.lives.of-a.cat"),
}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_validate_against_kuberay_schema(path: Path) -> None:
    rayjob = children_of(example_job(path), SETTINGS).rayjob
    assert strict_errors(rayjob, RAYJOB_SCHEMA) == []


@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
def test_edge_cases_validate_against_kuberay_schema(case: str) -> None:
    rayjob = children_of(EDGE_CASES[case], SETTINGS).rayjob
    assert strict_errors(rayjob, RAYJOB_SCHEMA) == []


def pod_templates(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod template of a RayJob by role: head, each worker group, and KubeRay's submitter."""
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    groups = {f"worker:{g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]}
    return {"head": cluster["headGroupSpec"]["template"], **groups, "submitter": spec["submitterPodTemplate"]}


ALL_JOBS: list[Any] = [
    *(pytest.param(path, id=f"example:{path.stem}") for path in EXAMPLES),
    *(pytest.param(case, id=f"edge:{case}") for case in EDGE_CASES),
]


@pytest.mark.parametrize("job", ALL_JOBS)
def test_every_pod_meets_the_restricted_profile(job: Path | str) -> None:
    """What a namespace enforcing Pod Security "restricted" admits: else the RayJob hangs in Provisioning."""
    rayjob = children_of(example_job(job) if isinstance(job, Path) else EDGE_CASES[job], SETTINGS).rayjob
    templates = pod_templates(rayjob)
    assert list(templates) == ["head", "worker:workers", "submitter"]
    for role, template in templates.items():
        assert template_violations(template) == [], role
        # KubeRay adds a wait-gcs-ready init container with a copy of the Ray container's securityContext
        # (common/pod.go): the pod must still pass with it.
        ray = template["spec"]["containers"][0]
        init = {"name": "wait-gcs-ready", "image": ray["image"], "securityContext": copy.deepcopy(ray["securityContext"])}
        assert template_violations({"spec": {**template["spec"], "initContainers": [init]}}) == [], role


def test_schema_check_catches_a_misspelt_field() -> None:
    rayjob = copy.deepcopy(children_of(body(), SETTINGS).rayjob)
    rayjob["spec"]["shutdownAfterJobFinish"] = rayjob["spec"].pop("shutdownAfterJobFinishes")
    assert strict_errors(rayjob, RAYJOB_SCHEMA) == [
        "spec.shutdownAfterJobFinish: field not declared in the schema (would be pruned)"
    ]


# --------------------------------------------------------------------------------------- the RayJob
def test_rayjob_spec_from_run_policy() -> None:
    spec = children_of(EDGE_CASES["suspended-with-deadline"], SETTINGS).rayjob["spec"]
    assert spec["entrypoint"] == ENTRYPOINT == f"python -m finetune_trainer --config {CONFIG_PATH}"
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert (spec["suspend"], spec["activeDeadlineSeconds"], spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (
        True,
        600,
        3,
        0,
    )


def test_ttl_defaults_to_the_operator_setting_only_when_unset() -> None:
    settings = OperatorSettings(default_ttl_seconds=60)
    assert children_of(body(), settings).rayjob["spec"]["ttlSecondsAfterFinished"] == 60
    assert "activeDeadlineSeconds" not in children_of(body(), settings).rayjob["spec"]
    given = body(runPolicy={"ttlSecondsAfterFinished": 3600})
    assert children_of(given, settings).rayjob["spec"]["ttlSecondsAfterFinished"] == 3600
    # A runPolicy without a TTL keeps the platform's default: the CRD must not default it (it used to, to 3600).
    other_policy = body(runPolicy={"backoffLimit": 2})
    assert children_of(other_policy, settings).rayjob["spec"]["ttlSecondsAfterFinished"] == 60
    run_policy = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["runPolicy"]
    assert "default" not in run_policy["properties"]["ttlSecondsAfterFinished"]


@pytest.mark.parametrize(("deadline", "expected"), [(1800, 1800), (60, 60), (0, None)])
def test_a_cluster_that_never_starts_fails_after_the_pre_running_deadline(deadline: int, expected: int | None) -> None:
    spec = children_of(body(), OperatorSettings(pre_running_deadline_seconds=deadline)).rayjob["spec"]
    assert spec.get("preRunningDeadlineSeconds") == expected


def test_head_runs_no_training_and_workers_are_sized_exactly() -> None:
    rayjob = children_of(EDGE_CASES["gpu-tolerations"], OperatorSettings(head_cpu="500m", head_memory="3Gi")).rayjob
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "500m", "memory": "3Gi"}
    assert "nodeSelector" not in head["template"]["spec"] and "tolerations" not in head["template"]["spec"]
    group = cluster["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    assert group["rayStartParams"] == {"num-gpus": "2"}
    pod = worker_pod(rayjob)
    resources = pod["containers"][0]["resources"]
    assert resources["limits"] == resources["requests"] == {"cpu": "1500m", "memory": "30Gi", "nvidia.com/gpu": 2}
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}]
    assert cluster["rayVersion"] == SETTINGS.ray_version and cluster["enableInTreeAutoscaling"] is False


def test_cpu_job_requests_no_accelerator() -> None:
    rayjob = children_of(body(), SETTINGS).rayjob
    assert worker_pod(rayjob)["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"] == {}


def test_other_accelerators_use_their_resource_name() -> None:
    limits = worker_pod(children_of(EDGE_CASES["amd"], SETTINGS).rayjob)["containers"][0]["resources"]["limits"]
    assert limits["amd.com/gpu"] == 1 and "nvidia.com/gpu" not in limits


def test_image_env_and_secrets_reach_every_ray_container() -> None:
    rayjob = children_of(EDGE_CASES["env"], SETTINGS).rayjob
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == "2.52.0"
    for container in containers(rayjob):
        assert container["image"] == "registry.local/trainer:dev"
        env = {e["name"]: e for e in container["env"]}
        assert env["A"] == {"name": "A", "value": "1"}
        assert env["FINETUNE_JOB_NAME"]["value"] == "job"
        assert env["FINETUNE_JOB_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert env["FINETUNE_STATUS_THROTTLE_SECONDS"]["value"] == "10"
        assert container["envFrom"] == [{"secretRef": {"name": "s3"}}, {"configMapRef": {"name": "cfg"}, "prefix": "X_"}]


def test_default_image_and_throttle_come_from_settings() -> None:
    settings = OperatorSettings(trainer_image="example.com/t:1", status_throttle_seconds=2.5)
    for container in containers(children_of(body(), settings).rayjob):
        assert container["image"] == "example.com/t:1"
        assert {"name": "FINETUNE_STATUS_THROTTLE_SECONDS", "value": "2.5"} in container["env"]


def test_config_map_holds_the_trainer_config_mounted_everywhere() -> None:
    children = children_of(body(name="cfg-job"), SETTINGS)
    data = children.config_map["data"]["trainer.json"]
    assert children.config_map["immutable"] is True  # fixed at creation, like the RayJob it configures
    config = TrainerConfig.model_validate_json(data)
    assert (config.job_name, config.namespace, config.job_uid) == ("cfg-job", "team", "u-1")
    assert config.sinks == ["console", "kubernetes"]
    assert config.output_root == "s3://bucket/runs/team"  # <output.uri>/<namespace>: tenants never share a run
    assert config.run_dir == "s3://bucket/runs/team/cfg-job"
    for pod in _pods(children.rayjob):
        volume = next(v for v in pod["volumes"] if v["name"] == "trainer-config")
        assert volume["configMap"]["name"] == children.config_map["metadata"]["name"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "trainer-config")
        assert mount == {"name": "trainer-config", "mountPath": "/etc/finetune", "readOnly": True}


def _pods(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]


def test_pvc_uris_are_mounted_read_only_unless_written() -> None:
    children = children_of(EDGE_CASES["pvc-everywhere"], SETTINGS)
    for pod in _pods(children.rayjob):
        claims = {
            v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims == {"data": True, "models": False, "scratch": False, "weights": True}
        mounts = {m["mountPath"]: m.get("readOnly") for m in pod["containers"][0]["volumeMounts"]}
        assert mounts[f"{PVC_MOUNT_ROOT}/models"] is False and mounts[f"{PVC_MOUNT_ROOT}/data"] is True
    config = json.loads(children.config_map["data"]["trainer.json"])
    assert config["outputRoot"] == f"{PVC_MOUNT_ROOT}/models/out/team"


def test_kueue_label_only_with_a_queue() -> None:
    assert children_of(EDGE_CASES["queue"], SETTINGS).rayjob["metadata"]["labels"][naming.LABEL_KUEUE_QUEUE] == "gpu-queue"
    assert naming.LABEL_KUEUE_QUEUE not in children_of(body(), SETTINGS).rayjob["metadata"]["labels"]
    pod = worker_pod(children_of(EDGE_CASES["queue"], SETTINGS).rayjob)
    assert pod["priorityClassName"] == "batch"


# ------------------------------------------------------------------------------- ownership and RBAC
def test_every_child_is_labelled_and_owned() -> None:
    children = children_of(body(name="owned", uid="uid-42"), SETTINGS).all()
    assert [c["kind"] for c in children] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy", "RayJob"]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "team"
        assert (
            meta["labels"].items()
            >= {
                "finetune.dev/job": "owned",
                "finetune.dev/job-uid": "uid-42",
                "app.kubernetes.io/managed-by": "finetune-operator",
            }.items()
        )
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "name": "owned",
                "uid": "uid-42",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def test_role_is_exactly_get_and_patch_on_this_jobs_status() -> None:
    children = children_of(body(name="narrow"), SETTINGS)
    assert children.role["rules"] == [
        {
            "apiGroups": ["finetune.dev"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["narrow"],
            "verbs": ["patch"],
        }
    ]
    assert children.role_binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": children.role["metadata"]["name"],
    }
    assert children.role_binding["subjects"] == [{"kind": "ServiceAccount", "name": "narrow-trainer", "namespace": "team"}]
    assert children.service_account is not None and children.service_account["metadata"]["name"] == "narrow-trainer"
    for template in pod_templates(children.rayjob).values():
        assert template["spec"]["serviceAccountName"] == "narrow-trainer"


@pytest.mark.parametrize("name", ["narrow", "a" * 253])
def test_the_operators_own_accounts_end_as_admission_reserves(name: str) -> None:
    """Admission refuses a serviceAccountName of this form (another job's own account: its token patches that job's
    status); the operator's own names, long ones cut and hashed included, must keep having it."""
    from finetune_operator.api.runtime import JOB_ACCOUNT_SUFFIX

    assert naming.service_account_name(name).endswith(JOB_ACCOUNT_SUFFIX)


def test_given_service_account_is_bound_not_created() -> None:
    children = children_of(EDGE_CASES["service-account"], SETTINGS)
    assert children.service_account is None
    assert [c["kind"] for c in children.all()] == ["Role", "RoleBinding", "ConfigMap", "NetworkPolicy", "RayJob"]
    assert children.role_binding["subjects"] == [{"kind": "ServiceAccount", "name": "ml-runner", "namespace": "team"}]
    for template in pod_templates(children.rayjob).values():
        assert template["spec"]["serviceAccountName"] == "ml-runner"


# --------------------------------------------------------------------------------------------- names
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@pytest.mark.parametrize(
    "name", ["a", "digits-cpu", "9.lives.of-a.cat", "a" * 253, "x" * 36 + "-y" * 100, "a-" * 126 + "b", "0" * 63]
)
def test_rayjob_name_is_a_short_stable_dns1035_label(name: str) -> None:
    result = naming.rayjob_name(name)
    assert len(result) <= 47 and DNS1035.match(result), result
    assert result == naming.rayjob_name(name)  # deterministic: what makes create idempotent


def test_rayjob_names_stay_distinct_when_cut() -> None:
    a, b = naming.rayjob_name("a" * 253), naming.rayjob_name("a" * 252)
    assert a != b and len(a) == len(b) == 47
    assert naming.rayjob_name("digits-cpu").startswith("ftj-digits-cpu-")


@pytest.mark.parametrize(
    ("stem", "count"),
    [
        ("resnet50-imagenet-lr-sweep-experiment-", 100_000),  # differ only past the cut: the hash alone separates them
        ("x" * 240 + "-", 1_000),  # child names cut at 253 characters too
    ],
)
def test_a_big_sweep_of_names_that_differ_past_the_cut_never_collides(stem: str, count: int) -> None:
    """Issue: ``...-experiment-00407`` and ``...-00432`` once mapped to one RayJob (5 hex characters)."""
    names = [f"{stem}{i:05d}" for i in range(count)]
    assert len({naming.rayjob_name(n) for n in names}) == count
    if len(stem) > 200:
        assert len({naming.config_map_name(n) for n in names}) == count
    assert naming.rayjob_name(f"{stem}00407") != naming.rayjob_name(f"{stem}00432")


def test_long_job_name_gives_valid_child_names_and_labels() -> None:
    children = children_of(EDGE_CASES["long-name"], SETTINGS)
    for child in children.all():
        name = child["metadata"]["name"]
        assert len(name) <= 253 and DNS1123.match(name), name
        value = child["metadata"]["labels"]["finetune.dev/job"]
        assert len(value) <= 63
    assert children.role["rules"][0]["resourceNames"] == ["a" * 253]  # RBAC names the job in full
    assert len(naming.pvc_volume_name("c" * 253)) <= 63


# --------------------------------------------------------------------------------------- validation
def test_invalid_spec_raises_with_validate_lines() -> None:
    bad = body(model={"name": "resnet5"})
    with pytest.raises(AdmissionError) as info:
        admit(bad, SETTINGS)
    assert info.value.lines[0].startswith("spec.model.name: 'resnet5' is not a torchvision classification model")


def test_operator_limits_are_validation_errors() -> None:
    settings = OperatorSettings(max_workers=2, max_gpus_per_worker=1)
    with pytest.raises(AdmissionError) as info:
        admit(body(resources={"workers": 4, "gpusPerWorker": 2}), settings)
    errors = info.value.lines
    assert [e.split(":")[0] for e in errors] == ["spec.resources.workers", "spec.resources.gpusPerWorker"]
    assert "FINETUNE_OPERATOR_MAX_WORKERS" in errors[0]


def test_render_matches_the_builder_without_owner_references() -> None:
    path = REPO / "manifests" / "examples" / "digits-cpu.yaml"
    objects = render_objects(path.read_text(), str(path), SETTINGS, namespace="ns1")
    assert [o["metadata"]["namespace"] for o in objects] == ["ns1"] * 6
    assert all("ownerReferences" not in o["metadata"] for o in objects)
    job = load_job(path.read_text(), str(path))
    job.metadata.namespace = "ns1"
    assert objects == children_of(job, SETTINGS).all()
    rendered = yaml.safe_load_all(to_yaml(objects))
    assert [o["kind"] for o in rendered] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy", "RayJob"]


def test_build_children_takes_only_an_admitted_job() -> None:
    """The builder has no validation of its own: the type says the job went through ``admit``."""
    with pytest.raises(AttributeError):
        build_children(body(), SETTINGS)  # type: ignore[arg-type]


def test_admission_reports_every_mistake_at_once() -> None:
    settings = OperatorSettings(max_workers=1)
    bad = body(output={"uri": "runs"}, resources={"workers": 2}, model={"name": "resnet18", "weightsUri": "w.pt"})
    with pytest.raises(AdmissionError) as info:
        admit(bad, settings)
    assert [line.split(":")[0] for line in info.value.lines] == [
        "spec.output.uri",
        "spec.model.weightsUri",
        "spec.resources.workers",
    ]


# ------------------------------------------------------------------------------------------- sizes
def _env_heavy(entries: int, length: int) -> dict[str, Any]:
    return body(runtime={"env": [{"name": f"V{i}", "value": "x" * length} for i in range(entries)]})


def test_a_spec_too_big_to_store_is_refused_at_admission() -> None:
    """128 entries of 32 KiB pass the field limits, but would render a RayJob far beyond etcd's 1.5 MiB."""
    with pytest.raises(AdmissionError) as info:
        admit(_env_heavy(128, 32_768), SETTINGS)
    assert len(info.value.lines) == 1
    assert re.match(r"spec: 409\d KiB of JSON exceeds the 128 KiB a FineTuneJob may hold .*runtime.envFrom$", info.value.lines[0])


def test_a_spec_at_the_bound_renders_within_every_limit() -> None:
    job = _env_heavy(62, 2_000)
    spec_bytes = len(json.dumps(job["spec"], separators=(",", ":")))
    assert 120 * 1024 < spec_bytes <= MAX_SPEC_BYTES  # just under the bound
    children = children_of(job)
    assert len(json.dumps(children.rayjob).encode()) < 1_500_000  # etcd's request limit
    assert len(json.dumps(children.config_map).encode()) < 1_048_576  # a ConfigMap's limit
    assert spec_bytes < 256 * 1024  # Kopf's last-handled-configuration annotation


def test_two_claims_that_differ_only_by_a_dot_get_two_volumes() -> None:
    """'runs.v2' and 'runs-v2' made one volume name for two claims: the API server refuses such a pod, and the job
    would wait in Provisioning for Ray pods that are never created."""
    job = body(output={"uri": "pvc://runs.v2/out"}, dataset={"format": "imagefolder", "trainUri": "pvc://runs-v2/train"})
    rayjob = children_of(job).rayjob
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert sorted(claims.values()) == ["runs-v2", "runs.v2"], pod["volumes"]
        assert all(len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) for name in claims)
        mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert set(claims) <= mounts
    assert naming.pvc_volume_name("runs-v2") == "pvc-runs-v2"  # names without a dot are as they were
