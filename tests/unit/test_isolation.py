"""How a job's Ray cluster is kept to itself (``finetune_operator.security``): KubeRay's submitter pod, who mounts
a ServiceAccount token, Ray token authentication and what admission refuses for it, the per-job NetworkPolicy,
and the settings that steer them. (Every pod passing the "restricted" profile: tests/unit/test_rayjob.py.)
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from finetune_operator.admission import AdmissionError, admit
from finetune_operator.rayjob import Children, build_children, job_labels
from finetune_operator.security import SUBMITTER_RESOURCES, container_security_context
from finetune_operator.settings import OperatorSettings
from tests.support import k8s_tools
from tests.support.pod_security import template_violations
from tests.support.schemas import REPO

EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
SETTINGS = OperatorSettings()
AUTH_OFF = OperatorSettings(ray_auth_mode="disabled")


def manifest(name: str = "iso", uid: str | None = "uid-9", **runtime: Any) -> dict[str, Any]:
    """The shipped CPU example as the API server hands it over, with ``spec.runtime`` fields added."""
    body: dict[str, Any] = copy.deepcopy(EXAMPLE)
    body["metadata"] = {"name": name, "namespace": "team", **({"uid": uid} if uid else {})}
    body["spec"]["runtime"] = {**body["spec"].get("runtime", {}), **runtime}
    return body


def children(body: dict[str, Any] | None = None, settings: OperatorSettings = SETTINGS) -> Children:
    return build_children(admit(body or manifest(), settings), settings)


def templates(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    (worker,) = cluster["workerGroupSpecs"]
    return {
        "head": cluster["headGroupSpec"]["template"],
        "worker": worker["template"],
        "submitter": rayjob["spec"]["submitterPodTemplate"],
    }


# ------------------------------------------------------------------------------------------ submitter
def test_submitter_is_kuberays_default_submitter_made_restricted() -> None:
    rayjob = children(manifest(image="registry.local/trainer:7")).rayjob
    pods = templates(rayjob)
    submitter = pods["submitter"]
    assert submitter["metadata"]["labels"] == job_labels(admit(manifest(), SETTINGS).job)
    spec = submitter["spec"]
    # A Job's pods must not restart in place; KubeRay only sets Never in the template it makes itself.
    assert spec["restartPolicy"] == "Never"
    assert spec["serviceAccountName"] == pods["head"]["spec"]["serviceAccountName"]  # its imagePullSecrets
    (container,) = spec["containers"]
    assert container == {
        "name": "ray-job-submitter",
        "image": "registry.local/trainer:7",
        "resources": SUBMITTER_RESOURCES,
        "securityContext": container_security_context(),
    }
    # No command, args or env: KubeRay writes `ray job submit ...`, the dashboard address, the submission id and
    # the auth token into them (rayjob_controller.go configureSubmitterContainer).
    assert spec["securityContext"] == pods["head"]["spec"]["securityContext"]
    assert rayjob["spec"]["submissionMode"] == "K8sJobMode"


@pytest.mark.parametrize(("role", "mounted"), [("head", False), ("worker", True), ("submitter", False)])
def test_only_workers_mount_a_service_account_token(role: str, mounted: bool) -> None:
    """Rank 0 of Ray Train (a worker) patches the job's status; the driver on the head and the submitter never
    call the API server, so a process there that gets compromised finds no token."""
    assert templates(children().rayjob)[role]["spec"]["automountServiceAccountToken"] is mounted


@pytest.mark.parametrize(("uid", "gid"), [(1000, 100), (1000680000, 0)])
def test_pods_run_as_the_configured_user_and_group(uid: int, gid: int) -> None:
    settings = OperatorSettings(trainer_uid=uid, trainer_gid=gid)
    for role, template in templates(children(settings=settings).rayjob).items():
        context = template["spec"]["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (uid, gid, gid), role
        assert context["fsGroupChangePolicy"] == "OnRootMismatch"
        assert template_violations(template) == [], role


# ------------------------------------------------------------------------------------------ Ray auth
@pytest.mark.parametrize(("settings", "mode"), [(SETTINGS, "token"), (AUTH_OFF, "disabled")])
def test_ray_token_auth_is_on_unless_turned_off(settings: OperatorSettings, mode: str) -> None:
    cluster = children(settings=settings).rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": mode}
    # KubeRay injects the token; nothing of ours may name it (a user entry would win over KubeRay's).
    for template in templates(children(settings=settings).rayjob).values():
        names = {e["name"] for c in template["spec"]["containers"] for e in c.get("env", [])}
        assert not {n for n in names if n.startswith("RAY_AUTH")}


AUTH_REFUSALS = [
    pytest.param(
        {"rayVersion": "2.51.9"},
        "spec.runtime.rayVersion: '2.51.9' has no Ray token authentication, which this operator requires "
        "(FINETUNE_OPERATOR_RAY_AUTH_MODE=token); use Ray 2.52.0 or later",
        id="old-ray",
    ),
    pytest.param({"rayVersion": "1.100.0"}, "spec.runtime.rayVersion: '1.100.0' has no Ray token authentication", id="old-major"),
    pytest.param(
        {"env": [{"name": "A", "value": "1"}, {"name": "RAY_AUTH_MODE", "value": "disabled"}]},
        "spec.runtime.env[1].name: 'RAY_AUTH_MODE' is set by KubeRay for Ray token authentication "
        "(FINETUNE_OPERATOR_RAY_AUTH_MODE=token); remove it",
        id="env-switches-auth-off",
    ),
]


@pytest.mark.parametrize(("runtime", "line"), AUTH_REFUSALS)
def test_admission_refuses_what_would_leave_ray_without_auth(runtime: dict[str, Any], line: str) -> None:
    with pytest.raises(AdmissionError) as info:
        admit(manifest(**runtime), SETTINGS)
    assert [entry for entry in info.value.lines if entry.startswith(line)] != [], info.value.lines
    assert all("\n" not in entry for entry in info.value.lines)
    admit(manifest(**runtime), AUTH_OFF)  # the same job is fine once the platform has turned auth off


@pytest.mark.parametrize("version", ["2.52.0", "2.60.0", "2.100.0", "3.0.0"])
def test_rays_with_token_auth_are_admitted(version: str) -> None:
    """Compared as numbers: "2.100.0" sorts before "2.52.0" as text."""
    cluster = children(manifest(rayVersion=version)).rayjob["spec"]["rayClusterSpec"]
    assert (cluster["rayVersion"], cluster["authOptions"]) == (version, {"mode": "token"})


# ------------------------------------------------------------------------------------- NetworkPolicy
def policy_of(body: dict[str, Any] | None = None, settings: OperatorSettings = SETTINGS) -> dict[str, Any]:
    policy = children(body, settings).network_policy
    assert policy is not None
    return policy


KUBERAY_ANYWHERE = {
    "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}}],
    "ports": [{"protocol": "TCP", "port": 8265}],
}


def test_network_policy_admits_the_jobs_own_pods_and_kuberay_only() -> None:
    policy = policy_of()
    labels = {"finetune.dev/job": "iso", "finetune.dev/job-uid": "uid-9", "app.kubernetes.io/managed-by": "finetune-operator"}
    assert policy["metadata"]["name"] == "iso-ray-ingress"
    assert policy["spec"] == {
        "podSelector": {"matchLabels": labels},
        # Ingress only: egress stays open for object stores, registries and DNS.
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": labels}}]}, KUBERAY_ANYWHERE],
    }
    assert k8s_tools.validate(policy)


@pytest.mark.parametrize("uid", ["uid-9", None])
def test_network_policy_selects_every_pod_of_the_job_and_no_other_jobs(uid: str | None) -> None:
    """Head, workers and submitter carry the labels the policy selects (and admits); a namesake's pods do not."""
    built = children(manifest(uid=uid))
    assert built.network_policy is not None
    selector = built.network_policy["spec"]["podSelector"]["matchLabels"]
    assert ("finetune.dev/job-uid" in selector) is (uid is not None)
    for role, template in templates(built.rayjob).items():
        assert template["metadata"]["labels"].items() >= selector.items(), role
    other = templates(children(manifest(name="other")).rayjob)["head"]["metadata"]["labels"]
    assert not other.items() >= selector.items()
    if uid is not None:  # the same name, a later job: told apart by uid
        namesake = templates(children(manifest(uid="uid-10")).rayjob)["head"]["metadata"]["labels"]
        assert not namesake.items() >= selector.items()


def test_network_policy_peers_come_from_settings() -> None:
    settings = OperatorSettings(
        kuberay_namespace="kuberay-system",
        kuberay_pod_labels=("app.kubernetes.io/name=kuberay-operator", "app.kubernetes.io/instance=kuberay"),
        metrics_scraper_namespace="monitoring",
        metrics_scraper_pod_labels=("app.kubernetes.io/name=prometheus",),
    )
    policy = policy_of(settings=settings)
    assert policy["spec"]["ingress"][1:] == [
        {
            "from": [
                {
                    # The API server sets this label to the namespace's name: a tenant cannot put it on theirs.
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                    "podSelector": {
                        "matchLabels": {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay"}
                    },
                }
            ],
            "ports": [{"protocol": "TCP", "port": 8265}],
        },
        {
            "from": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                }
            ],
            "ports": [{"protocol": "TCP", "port": 8080}],
        },
    ]
    assert k8s_tools.validate(policy)


def test_a_scraper_namespace_alone_admits_its_every_pod() -> None:
    rule = policy_of(settings=OperatorSettings(metrics_scraper_namespace="monitoring"))["spec"]["ingress"][2]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}, "podSelector": {}}
    ]


def test_network_policy_can_be_turned_off() -> None:
    built = children(settings=OperatorSettings(job_network_policy=False))
    assert built.network_policy is None
    assert "NetworkPolicy" not in [child["kind"] for child in built.all()]


SCRAPED = OperatorSettings(metrics_scraper_pod_labels=("app.kubernetes.io/name=prometheus", "team=observability"))


def _admitted_to(peer: dict[str, Any], namespace: str, labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy peer selects a pod of ``namespace`` with ``labels`` (matchLabels only, as we write them)."""
    names = (peer.get("namespaceSelector") or {}).get("matchLabels") or {}
    pods = (peer.get("podSelector") or {}).get("matchLabels") or {}
    return names.get("kubernetes.io/metadata.name", namespace) == namespace and all(labels.get(k) == v for k, v in pods.items())


@pytest.mark.parametrize(
    ("labels", "refused"),
    [
        ({"app.kubernetes.io/component": "kuberay-operator"}, "as KubeRay (FINETUNE_OPERATOR_KUBERAY_POD_LABELS)"),
        ({"app.kubernetes.io/name": "prometheus", "team": "observability"}, "as the metrics scraper"),
        ({"app.kubernetes.io/name": "prometheus"}, None),  # half the scraper's selector: no pod of it matches
        ({"app.kubernetes.io/component": "trainer", "team": "observability"}, None),
    ],
)
def test_a_job_cannot_label_its_pods_as_a_peer_every_jobs_policy_admits(labels: dict[str, str], refused: str | None) -> None:
    """The review's attack: with the default KubeRay namespace ('': any) a job labelled like KubeRay's operator (or the
    scraper) was admitted by every other job's NetworkPolicy to its Ray dashboard (8265) and metrics (8080) ports."""
    hostile = manifest("evil", pod={"labels": labels})
    hostile["metadata"]["namespace"] = "team-b"
    if refused is None:
        victim = children(manifest("victim"), SCRAPED).network_policy
        assert victim is not None
        pods = templates(children(hostile, SCRAPED).rayjob)
        for rule in victim["spec"]["ingress"][1:]:
            for role, template in pods.items():
                assert not _admitted_to(rule["from"][0], "team-b", template["metadata"]["labels"]), (role, rule)
        return
    with pytest.raises(AdmissionError) as info:
        admit(hostile, SCRAPED)
    (line,) = [line for line in info.value.lines if line.startswith("spec.runtime.pod.labels")]
    assert refused in line and line.endswith("use other labels")
    admit(hostile, OperatorSettings(job_network_policy=False, metrics_scraper_pod_labels=SCRAPED.metrics_scraper_pod_labels))
