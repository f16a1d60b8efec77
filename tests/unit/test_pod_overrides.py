"""Pod overrides (``spec.runtime.pod`` and the platform's ``FINETUNE_OPERATOR_POD_DEFAULTS``): every override reaches
head, workers and KubeRay's submitter, KubeRay-schema valid and still "restricted"; the merge rule between the
platform's defaults and the job's; and each refusal is one line naming the field, the value and what is accepted."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from finetune_operator import naming
from finetune_operator.admission import AdmissionError, admit
from finetune_operator.api.pods import PodOverrides
from finetune_operator.rayjob import build_children
from finetune_operator.settings import OperatorSettings
from tests.support.pod_security import template_violations
from tests.support.schemas import strict_errors
from tests.unit.test_rayjob import RAYJOB_SCHEMA, body, pod_templates

ROLES = ["head", "worker:workers", "submitter"]
EVERY_OVERRIDE: dict[str, Any] = {
    "imagePullSecrets": [{"name": "regcred"}],
    "labels": {"team": "vision", "example.com/cost-center": "42"},
    "annotations": {"example.com/owner": "vision-team"},
    "volumes": [{"name": "corp-ca", "configMap": {"name": "corp-ca"}}, {"name": "tmp", "emptyDir": {}}],
    "volumeMounts": [{"name": "corp-ca", "mountPath": "/etc/ssl/corp", "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ml"]}]}]
            }
        }
    },
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    "securityContext": {"readOnlyRootFilesystem": True, "seccompProfile": {"type": "Localhost", "localhostProfile": "ray.json"}},
}


def rayjob_of(pod: dict[str, Any] | None = None, settings: OperatorSettings | None = None, **spec: Any) -> dict[str, Any]:
    settings = settings or OperatorSettings()
    runtime = {**spec.pop("runtime", {}), **({"pod": pod} if pod is not None else {})}
    return build_children(admit(body(runtime=runtime, **spec), settings), settings).rayjob


def platform(**pod: Any) -> OperatorSettings:
    return OperatorSettings().replace(pod_defaults=PodOverrides.model_validate(pod))


def refusal(pod: dict[str, Any], settings: OperatorSettings | None = None) -> str:
    with pytest.raises(AdmissionError) as info:
        admit(body(runtime={"pod": pod}), settings or OperatorSettings())
    assert len(info.value.lines) == 1, info.value.lines
    (line,) = info.value.lines
    assert "\n" not in line
    return line


# ------------------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("source", ["job", "platform"])
def test_every_override_renders_into_head_workers_and_submitter(source: str) -> None:
    if source == "job":
        rayjob = rayjob_of(copy.deepcopy(EVERY_OVERRIDE), resources={"workers": 2})
    else:
        rayjob = rayjob_of(settings=platform(**EVERY_OVERRIDE), resources={"workers": 2})
    templates = pod_templates(rayjob)
    assert list(templates) == ROLES
    for role, template in templates.items():
        meta, pod = template["metadata"], template["spec"]
        assert {"team": "vision", "example.com/cost-center": "42"}.items() <= meta["labels"].items(), role
        assert meta["labels"][naming.LABEL_JOB] == "job" and meta["labels"][naming.LABEL_JOB_UID] == "u-1", role
        assert meta["annotations"] == {"example.com/owner": "vision-team"}, role
        assert pod["imagePullSecrets"] == [{"name": "regcred"}], role
        assert {v["name"] for v in pod["volumes"]} >= {"corp-ca", "tmp"}, role
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["corp-ca"] == {"name": "corp-ca", "mountPath": "/etc/ssl/corp", "readOnly": True}, role
        assert pod["affinity"] == EVERY_OVERRIDE["affinity"], role
        assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}, role
        assert pod["tolerations"] == EVERY_OVERRIDE["tolerations"], role
        assert pod["securityContext"]["seccompProfile"] == {"type": "Localhost", "localhostProfile": "ray.json"}, role
        container = pod["containers"][0]["securityContext"]
        assert container == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}
        # The restricted profile the operator sets stays whole.
        assert pod["securityContext"]["runAsNonRoot"] is True and template_violations(template) == [], role
    assert strict_errors(rayjob, RAYJOB_SCHEMA) == []


def test_without_overrides_nothing_is_added() -> None:
    for role, template in pod_templates(rayjob_of()).items():
        assert "annotations" not in template["metadata"], role
        assert not {"imagePullSecrets", "affinity", "nodeSelector", "tolerations"} & set(template["spec"]), role


def test_worker_scheduling_of_the_job_adds_to_the_pod_overrides() -> None:
    rayjob = rayjob_of(
        {"nodeSelector": {"kubernetes.io/os": "linux", "pool": "any"}, "tolerations": EVERY_OVERRIDE["tolerations"]},
        resources={"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
    )
    templates = pod_templates(rayjob)
    worker, head = templates["worker:workers"]["spec"], templates["head"]["spec"]
    assert worker["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "gpu"}
    assert worker["tolerations"] == [*EVERY_OVERRIDE["tolerations"], {"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert head["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "any"}


# --------------------------------------------------------------------------------------- merge rule
def _nodes(pool: str) -> dict[str, Any]:
    term = {"matchExpressions": [{"key": "pool", "operator": "In", "values": [pool]}]}
    return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}


PLATFORM_NODES, JOB_NODES = _nodes("batch"), _nodes("gpu")
SPREAD = {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": {"topologyKey": "zone"}}]}


def test_platform_defaults_merge_with_the_job() -> None:
    settings = platform(
        imagePullSecrets=[{"name": "regcred"}],
        labels={"team": "platform", "tier": "batch"},
        annotations={"example.com/owner": "platform"},
        volumes=[{"name": "corp-ca", "configMap": {"name": "corp-ca"}}],
        volumeMounts=[{"name": "corp-ca", "mountPath": "/etc/ssl/corp"}],
        affinity={"nodeAffinity": PLATFORM_NODES, "podAntiAffinity": SPREAD},
        tolerations=[{"key": "dedicated", "operator": "Exists"}],
        securityContext={"readOnlyRootFilesystem": True},
    )
    job = {
        "imagePullSecrets": [{"name": "team-cred"}, {"name": "regcred"}],
        "labels": {"team": "vision"},
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        # A job may mount the platform's volume elsewhere, and its own.
        "volumeMounts": [{"name": "corp-ca", "mountPath": "/certs"}, {"name": "scratch", "mountPath": "/tmp"}],
        "affinity": {"nodeAffinity": JOB_NODES},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}, {"key": "spot", "operator": "Exists"}],
    }
    for role, template in pod_templates(rayjob_of(job, settings=settings, runtime={"priorityClassName": "high"})).items():
        pod = template["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "team-cred"}], role  # union
        assert template["metadata"]["labels"]["team"] == "vision" and template["metadata"]["labels"]["tier"] == "batch"
        assert template["metadata"]["annotations"] == {"example.com/owner": "platform"}
        assert [v["name"] for v in pod["volumes"]][-2:] == ["corp-ca", "scratch"], role
        assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]][-3:] == ["/etc/ssl/corp", "/certs", "/tmp"]
        assert pod["affinity"] == {"nodeAffinity": JOB_NODES, "podAntiAffinity": SPREAD}, role  # per kind, job wins
        assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}, {"key": "spot", "operator": "Exists"}]
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True, role
        assert pod["priorityClassName"] == "high", role


@pytest.mark.parametrize(("job", "expected"), [({}, "batch-low"), ({"priorityClassName": "urgent"}, "urgent")])
def test_priority_class_default_reaches_every_pod_unless_the_job_names_one(job: dict[str, Any], expected: str) -> None:
    settings = OperatorSettings().replace(default_priority_class_name="batch-low")
    rayjob = rayjob_of(settings=settings, runtime=job)
    assert [t["spec"]["priorityClassName"] for t in pod_templates(rayjob).values()] == [expected] * 3


# ------------------------------------------------------------------------------------------ refusals
P = "spec.runtime.pod"
TMP = {"name": "a", "emptyDir": {}}
REFUSED: list[Any] = [
    # loosening the securityContext
    ({"securityContext": {"allowPrivilegeEscalation": True}}, f"{P}.securityContext.allowPrivilegeEscalation", "only false"),
    ({"securityContext": {"runAsNonRoot": False}}, f"{P}.securityContext.runAsNonRoot", "only true"),
    ({"securityContext": {"privileged": True}}, f"{P}.securityContext.privileged", "loosen the restricted"),
    ({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}, f"{P}.securityContext.seccompProfile.type", "Unconfined"),
    # volumes
    ({"volumes": [{"name": "node", "hostPath": {"path": "/"}}]}, f"{P}.volumes[0].hostPath", "restricted Pod Security"),
    ({"volumes": [{"name": "dshm", "emptyDir": {}}]}, f"{P}.volumes[0].name", "operator's own volume"),
    ({"volumes": [{"name": "pvc-data", "emptyDir": {}}]}, f"{P}.volumes[0].name", "operator's own volume"),
    ({"volumes": [{**TMP, "secret": {"secretName": "s"}}]}, f"{P}.volumes[0]", "exactly one"),
    (
        {"volumes": [TMP], "volumeMounts": [{"name": "a", "mountPath": "/etc/finetune"}]},
        f"{P}.volumeMounts[0].mountPath",
        "operator",
    ),
    ({"volumeMounts": [{"name": "ghost", "mountPath": "/x"}]}, f"{P}.volumeMounts[0].name", "names no volume"),
    # the operator's labels and reserved annotations
    ({"labels": {"finetune.dev/job": "other"}}, f"{P}.labels['finetune.dev/job']: 'other'", "operator's"),
    ({"labels": {"app.kubernetes.io/managed-by": "me"}}, f"{P}.labels", "operator's"),
    ({"labels": {"ray.io/node-type": "head"}}, f"{P}.labels", "KubeRay"),
    ({"annotations": {"ray.io/overwrite-container-cmd": "true"}}, f"{P}.annotations", "reserved"),
]


@pytest.mark.parametrize(("pod", "field", "fragment"), REFUSED)
def test_refused_with_one_line(pod: dict[str, Any], field: str, fragment: str) -> None:
    line = refusal(pod)
    assert line.startswith(field), line
    assert fragment in line, line


PLATFORM = platform(
    volumes=[{"name": "corp-ca", "configMap": {"name": "corp-ca"}}],
    volumeMounts=[{"name": "corp-ca", "mountPath": "/etc/ssl/corp"}],
    securityContext={"readOnlyRootFilesystem": True, "seccompProfile": {"type": "Localhost", "localhostProfile": "a.json"}},
)


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (
            {"volumes": [{"name": "corp-ca", "secret": {"secretName": "mine"}}]},
            "spec.runtime.pod.volumes[0].name: 'corp-ca' is a volume of the platform's pod defaults",
        ),
        (
            {"volumes": [{"name": "x", "emptyDir": {}}], "volumeMounts": [{"name": "x", "mountPath": "/etc/ssl/corp/"}]},
            "spec.runtime.pod.volumeMounts[0].mountPath: '/etc/ssl/corp/' is mounted by the platform's pod defaults",
        ),
        (
            {"securityContext": {"readOnlyRootFilesystem": False}},
            "spec.runtime.pod.securityContext.readOnlyRootFilesystem: false would loosen the platform's pod defaults",
        ),
        (
            {"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}},
            "spec.runtime.pod.securityContext.seccompProfile: {'type': 'RuntimeDefault'} differs from the platform's",
        ),
    ],
)
def test_a_job_cannot_shadow_or_loosen_the_platform_defaults(pod: dict[str, Any], expected: str) -> None:
    assert refusal(pod, PLATFORM).startswith(expected)


def test_allowed_volume_sources_are_the_restricted_profiles() -> None:
    from finetune_operator.api.pods import ALLOWED_VOLUME_SOURCES
    from tests.support.pod_security import RESTRICTED_VOLUME_TYPES

    assert set(ALLOWED_VOLUME_SOURCES) == RESTRICTED_VOLUME_TYPES


def test_the_operators_labels_win_over_the_platforms_and_the_jobs() -> None:
    """Labels that could collide are refused; those that get through never replace the operator's (job, uid, owner)."""
    for template in pod_templates(rayjob_of({"labels": {"team": "a"}}, settings=platform(labels={"team": "b"}))).values():
        labels = template["metadata"]["labels"]
        assert labels["team"] == "a"
        assert labels[naming.LABEL_MANAGED_BY] == naming.MANAGED_BY and labels[naming.LABEL_JOB] == "job"
