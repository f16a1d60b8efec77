"""The chart's platform integrations (issue 13): the tenants' aggregated ClusterRoles, the `helm test` hook, and the
Grafana dashboard, whose PromQL may name only series the operator exports. Rendered with the real helm binary."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest

from finetune_operator import metrics
from tests.support import k8s_tools
from tests.support.k8s_tools import one, permission_table
from tests.support.pod_security import restricted_violations
from tests.support.schemas import REPO

CHART = REPO / "charts" / "finetune-operator"
RELEASE, NAMESPACE = "finetune", "finetune-system"
DASHBOARD = CHART / "dashboards" / "finetune-jobs.json"
HOOK_DELETE = "before-hook-creation,hook-succeeded"


@cache
def render(*set_values: str) -> tuple[dict[str, Any], ...]:
    return tuple(k8s_tools.helm_template(CHART, release=RELEASE, namespace=NAMESPACE, set_values=set_values))


def component(objects: tuple[dict[str, Any], ...], name: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == name]


# ------------------------------------------------------------------------------------------- tenant roles
EDIT = {
    ("finetune.dev", "finetunejobs"): frozenset(
        {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
    ),
    ("finetune.dev", "finetunejobs/status"): frozenset({"get"}),
}
VIEW = {
    ("finetune.dev", "finetunejobs"): frozenset({"get", "list", "watch"}),
    ("finetune.dev", "finetunejobs/status"): frozenset({"get", "list", "watch"}),
}
AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


@pytest.mark.parametrize("values", [(), ("watchNamespaces={team-a}",)], ids=["cluster-wide", "namespaced"])
def test_tenant_roles_aggregate_into_the_builtin_roles_with_finetunejobs_verbs_only(values: tuple[str, ...]) -> None:
    roles = {r["metadata"]["name"]: r for r in component(render(*values), "tenant-rbac")}
    assert set(roles) == {"finetune-edit", "finetune-view"}
    aggregated = {
        name: {k.removeprefix(AGGREGATE) for k, v in r["metadata"]["labels"].items() if k.startswith(AGGREGATE) and v == "true"}
        for name, r in roles.items()
    }
    assert aggregated == {"finetune-edit": {"admin", "edit"}, "finetune-view": {"view"}}
    assert permission_table(roles["finetune-edit"]) == EDIT
    assert permission_table(roles["finetune-view"]) == VIEW
    for role in roles.values():
        assert role["kind"] == "ClusterRole" and k8s_tools.wildcards(role) == [] and k8s_tools.validate(role)


def test_kustomize_base_ships_the_same_tenant_roles() -> None:
    base = {r["metadata"]["name"]: r for r in k8s_tools.kustomize(REPO / "manifests" / "base") if r["kind"] == "ClusterRole"}
    for chart_role in component(render(), "tenant-rbac"):
        role = base[chart_role["metadata"]["name"]]
        assert permission_table(role) == permission_table(chart_role)
        aggregation = {k: v for k, v in chart_role["metadata"]["labels"].items() if k.startswith(AGGREGATE)}
        assert aggregation.items() <= role["metadata"]["labels"].items()


@pytest.mark.parametrize("switch", ["tenantRoles.enabled=false", "rbac.create=false"])
def test_tenant_roles_can_be_left_out(switch: str) -> None:
    assert component(render(switch), "tenant-rbac") == []


# ---------------------------------------------------------------------------------------------- helm test
def hook(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in component(objects, "helm-test")}


@pytest.mark.parametrize(
    ("values", "dry_run_namespace", "webhook"),
    [
        ((), NAMESPACE, True),
        (("watchNamespaces={team-a,team-b}",), "team-a", True),  # the webhook only covers watched namespaces
        (("webhook.enabled=false",), NAMESPACE, False),
    ],
    ids=["default", "namespaced", "webhook-off"],
)
def test_helm_test_pod_is_restricted_and_runs_the_smoke_check(
    values: tuple[str, ...], dry_run_namespace: str, webhook: bool
) -> None:
    objects = hook(render(*values))
    assert set(objects) == {"Pod", "ServiceAccount", "Role", "RoleBinding"}
    for obj in objects.values():
        annotations = obj["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "test" and annotations["helm.sh/hook-delete-policy"] == HOOK_DELETE, obj["kind"]
        assert k8s_tools.validate(obj), obj["kind"]
    # RBAC before the pod: Helm creates hooks by ascending weight.
    assert int(objects["Role"]["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        objects["Pod"]["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    pod = objects["Pod"]
    assert pod["metadata"]["namespace"] == NAMESPACE
    assert restricted_violations(pod["spec"], pod["metadata"].get("annotations")) == []
    (container,) = pod["spec"]["containers"]
    deployment = one(render(*values), "Deployment")
    assert container["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["command"] == ["python", "-m", "finetune_operator.smoke"]
    assert container["args"] == [f"--namespace={dry_run_namespace}", *(["--webhook"] if webhook else [])]
    assert pod["spec"]["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    assert objects["Role"]["metadata"]["namespace"] == objects["RoleBinding"]["metadata"]["namespace"] == dry_run_namespace
    assert permission_table(objects["Role"]) == {("finetune.dev", "finetunejobs"): frozenset({"list", "create"})}
    assert objects["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": objects["ServiceAccount"]["metadata"]["name"], "namespace": NAMESPACE}
    ]


def test_helm_test_can_be_left_out_and_follows_rbac_create() -> None:
    assert hook(render("helmTest.enabled=false")) == {}
    assert set(hook(render("rbac.create=false"))) == {"Pod", "ServiceAccount"}


# ---------------------------------------------------------------------------------------------- dashboard
def test_dashboard_is_off_by_default() -> None:
    assert component(render(), "dashboard") == []


def test_dashboard_configmap_carries_the_sidecar_label_and_the_json() -> None:
    (configmap,) = component(render("grafanaDashboard.enabled=true", "grafanaDashboard.namespace=monitoring"), "dashboard")
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["finetune-jobs.json"]) == json.loads(DASHBOARD.read_text())
    assert k8s_tools.validate(configmap)


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL expression in the dashboard: panel targets and template variable queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"}
)


def series_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords, labels or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, legend templates)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,[^)]*\)", r"\1", expr)  # Grafana's variable query
    names = re.findall(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {name for name in names if name not in PROMQL_WORDS}


def exported() -> set[str]:
    """Every sample name the operator's registry serves (counters with _total, histograms with their parts)."""
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    for family in metrics.REGISTRY.collect():
        names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def test_series_names_parser() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, handler) (rate(a_bucket{x="y"}[5m]))) * on (namespace) group_left () b == 1'
    assert series_names(expr) == {"a_bucket", "b"}
    assert series_names("label_values(finetune_job_status_phase, namespace)") == {"finetune_job_status_phase"}


def test_every_dashboard_expression_names_only_exported_series() -> None:
    found = list(expressions(json.loads(DASHBOARD.read_text())))
    assert len(found) >= 10
    named = set().union(*(series_names(expr) for expr in found))
    assert named and named <= exported(), sorted(named - exported())
    # Every job-level family is on the dashboard.
    assert {name for name in exported() if name.startswith("finetune_job_")} <= named


def test_the_servicemonitor_keeps_the_jobs_own_namespace_label() -> None:
    """Without honorLabels the target's ``namespace`` (the operator's) replaced the job series' own, which became
    ``exported_namespace``: every job showed up in the release namespace, and the dashboard's filter and its
    ``on (namespace, name)`` join broke."""
    objects = render("metrics.serviceMonitor.enabled=true")
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"] and all(e.get("honorLabels") is True for e in monitor["spec"]["endpoints"])


@pytest.mark.parametrize("extra", [(), ("webhook.enabled=false",)])
def test_the_helm_test_pod_is_selected_by_none_of_the_operators_selectors(extra: tuple[str, ...]) -> None:
    """The smoke pod carried the selector labels: the operator's PodDisruptionBudget (blocking evictions while a
    failed test pod is kept), NetworkPolicy and Services selected it."""
    objects = render("networkPolicy.enabled=true", *extra)
    (pod,) = [o for o in objects if o["kind"] == "Pod"]
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "helm-test"
    selectors = (
        [(o["kind"], o["spec"]["selector"]["matchLabels"]) for o in objects if o["kind"] == "PodDisruptionBudget"]
        + [(o["kind"], o["spec"]["podSelector"]["matchLabels"]) for o in objects if o["kind"] == "NetworkPolicy"]
        + [(o["kind"], o["spec"]["selector"]) for o in objects if o["kind"] == "Service"]
    )
    assert len(selectors) >= 3
    for kind, selector in selectors:
        assert not all(labels.get(k) == v for k, v in selector.items()), f"{kind} selects the helm test pod"
