"""The kustomize manifests: base and every overlay render with `kubectl kustomize`, validate against Kubernetes
1.35, carry the generated CRD, meet the "restricted" Pod Security profile, grant exactly the operator's RBAC in
the scope they watch, and agree with the Helm chart's default rendering (the two install paths cannot drift)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from finetune_operator.api import versions
from finetune_operator.api.crd import build_crd
from finetune_operator.settings import OperatorSettings
from tests.support import k8s_tools
from tests.support.k8s_tools import KOPF_CLUSTER_RULES, OPERATOR_RULES, of_kind, one, permission_table
from tests.support.pod_security import restricted_violations
from tests.support.schemas import REPO

MANIFESTS = REPO / "manifests"
CHART = REPO / "charts" / "finetune-operator"
OPERATOR_NAMESPACE = "finetune-system"
# Every install target: base and each overlay folder (namespaced/watch and namespaced/team-* are its parts).
TARGETS = {"base": MANIFESTS / "base", **{p.name: p for p in sorted((MANIFESTS / "overlays").iterdir()) if p.is_dir()}}
NAMES = sorted(TARGETS)

# What differs per target, as the operator would read it.
EXPECTED: dict[str, dict[str, Any]] = {
    "base": {"image": versions.DEFAULT_OPERATOR_IMAGE, "namespaces": (), "log_level": "INFO", "pull": "IfNotPresent"},
    "dev": {"image": f"{versions.OPERATOR_IMAGE_REPOSITORY}:dev", "namespaces": (), "log_level": "DEBUG", "pull": "Always"},
    # The base, with the webhook's certificate from cert-manager (tests/unit/test_webhook_install.py).
    "cert-manager": {"image": versions.DEFAULT_OPERATOR_IMAGE, "namespaces": (), "log_level": "INFO", "pull": "IfNotPresent"},
    "namespaced": {
        "image": versions.DEFAULT_OPERATOR_IMAGE,
        "namespaces": ("team-a", "team-b"),
        "log_level": "INFO",
        "pull": "IfNotPresent",
    },
}


@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict[str, Any]]]:
    """Each target rendered once for the module; kubectl runs in parallel (one process per target)."""
    with ThreadPoolExecutor() as pool:
        return dict(zip(TARGETS, pool.map(k8s_tools.kustomize, TARGETS.values()), strict=True))


# Chart-only: the tenants' ClusterRoles and the `helm test` hook (tests/unit/test_platform_chart.py).
PLATFORM_COMPONENTS = ("tenant-rbac", "helm-test")


def _component(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")  # type: ignore[no-any-return]


def operator_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Everything but the admission webhook's objects (tests/unit/test_webhook_install.py checks those), the Lease's
    RBAC (test_leader_election_matches_the_chart) and PLATFORM_COMPONENTS."""
    aside = ("webhook", "leader-election", "metrics-auth", *PLATFORM_COMPONENTS)
    return [obj for obj in objects if _component(obj) not in aside]


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def test_every_target_has_expectations() -> None:
    assert set(NAMES) == set(EXPECTED), "add the new overlay to EXPECTED"


@pytest.mark.parametrize("target", NAMES)
def test_every_object_is_valid_for_kubernetes_1_35(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    for obj in renders[target]:
        # cert-manager's kinds are CRDs kubernetes-validate does not know; only its overlay has them.
        assert k8s_tools.validate(obj) or (target == "cert-manager" and obj["kind"] in ("Certificate", "Issuer")), obj["kind"]


@pytest.mark.parametrize("target", NAMES)
def test_crd_is_the_generated_one(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    # kustomize re-serialises YAML (line wrapping), so compare objects; test_crd checks the committed text.
    assert one(renders[target], "CustomResourceDefinition")["spec"] == build_crd()["spec"]


@pytest.mark.parametrize("target", NAMES)
def test_pod_meets_restricted_profile(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    pod = one(renders[target], "Deployment")["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    namespace = one(renders[target], "Namespace")
    assert namespace["metadata"]["name"] == OPERATOR_NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("target", NAMES)
def test_operator_objects_live_in_the_operator_namespace(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    for kind in ("Deployment", "ServiceAccount", "Service"):
        assert one(operator_objects(renders[target]), kind)["metadata"]["namespace"] == OPERATOR_NAMESPACE, kind


@pytest.mark.parametrize("target", NAMES)
def test_rbac_matches_the_watch_scope(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    """Kopf's flags, FINETUNE_OPERATOR_NAMESPACES and the RBAC objects all describe the same scope."""
    objects = operator_objects(renders[target])
    container = _container(objects)
    namespaces = EXPECTED[target]["namespaces"]
    assert OperatorSettings.from_env(k8s_tools.container_env(container)).namespaces == namespaces
    subject = [{"kind": "ServiceAccount", "name": "finetune-operator", "namespace": OPERATOR_NAMESPACE}]
    for role in [*of_kind(objects, "Role"), *of_kind(objects, "ClusterRole")]:
        assert k8s_tools.wildcards(role) == []
    if namespaces:
        assert container["args"] == [f"--namespace={ns}" for ns in namespaces]
        assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
        assert sorted(r["metadata"]["namespace"] for r in of_kind(objects, "Role")) == sorted(namespaces)
        assert sorted(b["metadata"]["namespace"] for b in of_kind(objects, "RoleBinding")) == sorted(namespaces)
        assert all(permission_table(role) == OPERATOR_RULES for role in of_kind(objects, "Role"))
        assert all(binding["subjects"] == subject for binding in of_kind(objects, "RoleBinding"))
    else:
        assert container["args"] == ["--all-namespaces"]
        assert not of_kind(objects, "Role") and not of_kind(objects, "RoleBinding")
        assert permission_table(one(objects, "ClusterRole")) == OPERATOR_RULES | KOPF_CLUSTER_RULES
        assert one(objects, "ClusterRoleBinding")["subjects"] == subject


@pytest.mark.parametrize("target", NAMES)
def test_target_specifics(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    container = _container(renders[target])
    env = k8s_tools.container_env(container)
    assert set(env) == set(OperatorSettings().to_env()), "mirror each OperatorSettings field in manager.yaml"
    settings = OperatorSettings.from_env(env)
    assert container["image"] == EXPECTED[target]["image"]
    assert container["imagePullPolicy"] == EXPECTED[target]["pull"]
    assert settings.log_level == EXPECTED[target]["log_level"]
    assert settings.ray_version == versions.RAY_VERSION


def test_base_settings_are_the_operator_defaults(renders: dict[str, list[dict[str, Any]]]) -> None:
    env = k8s_tools.container_env(_container(renders["base"]))
    # What a one-process run leaves off, the manifests turn on: leader election, in the operator's namespace.
    elected = {"leader_election": True, "leader_election_namespace": OPERATOR_NAMESPACE}
    assert OperatorSettings.from_env(env) == OperatorSettings().replace(**elected)


def test_base_matches_the_chart_defaults(renders: dict[str, list[dict[str, Any]]]) -> None:
    """The same Deployment and RBAC whichever way a platform team installs (release finetune-operator: the base's names)."""
    chart = operator_objects(k8s_tools.helm_template(CHART, release="finetune-operator", namespace=OPERATOR_NAMESPACE))
    base = operator_objects(renders["base"])
    chart_pod = one(chart, "Deployment")["spec"]["template"]["spec"]
    base_pod = one(base, "Deployment")["spec"]["template"]["spec"]
    for field in ("securityContext", "volumes", "automountServiceAccountToken", "enableServiceLinks"):
        assert base_pod[field] == chart_pod[field], field
    (chart_container,) = chart_pod["containers"]
    base_container = _container(base)
    for field in ("image", "args", "ports", "livenessProbe", "readinessProbe", "resources", "securityContext", "volumeMounts"):
        assert base_container[field] == chart_container[field], field
    assert k8s_tools.container_env(base_container) == k8s_tools.container_env(chart_container)
    for field in ("strategy", "replicas"):
        assert one(base, "Deployment")["spec"][field] == one(chart, "Deployment")["spec"][field], field
    assert base_pod["affinity"] == chart_pod["affinity"]
    assert one(base, "PodDisruptionBudget")["spec"] == one(chart, "PodDisruptionBudget")["spec"]
    assert permission_table(one(base, "ClusterRole")) == permission_table(one(chart, "ClusterRole"))
    assert one(base, "Service")["spec"]["ports"] == one(chart, "Service")["spec"]["ports"]


@pytest.mark.parametrize("target", NAMES)
def test_leader_election_matches_the_chart(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    rendered = k8s_tools.helm_template(CHART, release="finetune-operator", namespace=OPERATOR_NAMESPACE)
    chart = [o for o in rendered if _component(o) not in PLATFORM_COMPONENTS]
    elected = [
        o for o in renders[target] if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "leader-election"
    ]
    role, chart_role = one(elected, "Role"), one(chart, "Role")
    assert role["metadata"]["namespace"] == one(elected, "RoleBinding")["metadata"]["namespace"] == OPERATOR_NAMESPACE
    assert role["rules"] == chart_role["rules"] and permission_table(role) == k8s_tools.LEADER_ELECTION_RULES
    assert one(elected, "RoleBinding")["subjects"] == one(chart, "RoleBinding")["subjects"]


@pytest.mark.parametrize("target", NAMES)
def test_metrics_rbac_matches_the_chart(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    """The /metrics token reviews' ClusterRole and binding, and metrics-reader: as the chart's defaults render them."""
    rendered = k8s_tools.helm_template(CHART, release="finetune-operator", namespace=OPERATOR_NAMESPACE)

    def essentials(objects: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
        return sorted(
            (o["kind"], o["metadata"]["name"], o.get("rules") or (o.get("roleRef"), o.get("subjects")))
            for o in objects
            if _component(o) == "metrics-auth"
        )

    ours = essentials(renders[target])
    assert ours == essentials(rendered) and len(ours) == 3
    role = next(
        o for o in renders[target] if o["metadata"]["name"] == "finetune-operator-metrics-auth" and o["kind"] == "ClusterRole"
    )
    assert permission_table(role) == k8s_tools.METRICS_AUTH_RULES


def test_namespaced_overlay_role_matches_the_chart_role() -> None:
    chart = k8s_tools.helm_template(
        CHART, release="finetune", namespace=OPERATOR_NAMESPACE, set_values=["watchNamespaces={team-a}"]
    )
    overlay = k8s_tools.kustomize(TARGETS["namespaced"] / "team-a")
    assert permission_table(one(overlay, "Role")) == permission_table(one(operator_objects(chart), "Role"))


def test_every_target_is_documented() -> None:
    docs = (REPO / "docs" / "platform.md").read_text()
    for path in TARGETS.values():
        assert str(path.relative_to(REPO)) in docs, f"docs/platform.md does not mention {path.relative_to(REPO)}"
