"""The chart's Prometheus Operator ServiceMonitor (``metrics.serviceMonitor.*``) and the token it scrapes with:
Prometheus's own (``bearerTokenFile``, the default), or one from a Secret (``tokenSecret``: ``authorization``, which a
Prometheus with ``arbitraryFSAccessThroughSMs.deny`` accepts), named or created by the chart with exactly the RBAC it
needs. Every ServiceMonitor is valid against the Prometheus Operator's own CRD (vendored in
tests/data/prometheus-operator-v0.93.0), which kubernetes-validate does not know. Rendered with the real helm binary
(tests/unit/test_chart.py has the variants, ci/servicemonitor-token-values.yaml among them)."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest

from tests.support import k8s_tools
from tests.support.k8s_tools import of_kind, one
from tests.support.schemas import REPO, servicemonitor_schema, strict_errors

CHART = REPO / "charts" / "finetune-operator"
RELEASE, NAMESPACE = "ft", "finetune-system"
FULLNAME = f"{RELEASE}-finetune-operator"
MONITOR = "metrics.serviceMonitor"
TOKEN = f"{MONITOR}.tokenSecret"
ON = f"{MONITOR}.enabled=true"
TOKEN_FILE = {"bearerTokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}


def bearer(name: str, key: str = "token") -> dict[str, Any]:
    return {"authorization": {"type": "Bearer", "credentials": {"name": name, "key": key}}}


@cache
def render(*set_values: str) -> tuple[dict[str, Any], ...]:
    return tuple(k8s_tools.helm_template(CHART, release=RELEASE, namespace=NAMESPACE, set_values=set_values))


def monitor_of(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (monitor,) = of_kind(list(objects), "ServiceMonitor")
    return monitor


def scraper_objects(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "metrics-scraper"]


CASES = {
    "token-file": ((), TOKEN_FILE),
    "plain-http": (("metrics.auth=false",), {}),
    "labels": ((f"{MONITOR}.labels.release=kube-prometheus-stack", f"{MONITOR}.interval=15s"), TOKEN_FILE),
    "named-secret": ((f"{TOKEN}.name=prometheus-token",), bearer("prometheus-token")),
    "named-secret-key": ((f"{TOKEN}.name=prometheus-token", f"{TOKEN}.key=bearer.jwt"), bearer("prometheus-token", "bearer.jwt")),
    "created": ((f"{TOKEN}.create=true",), bearer(f"{FULLNAME}-metrics-token")),
    "created-named": ((f"{TOKEN}.create=true", f"{TOKEN}.name=scrape-token"), bearer("scrape-token")),
    "created-namespaced": ((f"{TOKEN}.create=true", "watchNamespaces={team-a}"), bearer(f"{FULLNAME}-metrics-token")),
    # `helm upgrade --reuse-values` from a release before tokenSecret: Prometheus's token, as before.
    "reused-values": ((f"{TOKEN}=null",), TOKEN_FILE),
}


@pytest.mark.parametrize(("overrides", "credentials"), CASES.values(), ids=CASES)
def test_the_endpoint_sends_the_token_the_values_name(overrides: tuple[str, ...], credentials: dict[str, Any]) -> None:
    """With a tokenSecret, `authorization` alone: a `bearerTokenFile` beside it would still get the ServiceMonitor
    skipped by a Prometheus with arbitraryFSAccessThroughSMs.deny."""
    (endpoint,) = monitor_of(render(ON, *overrides))["spec"]["endpoints"]
    assert {k: v for k, v in endpoint.items() if k in ("authorization", "bearerTokenFile", "basicAuth", "oauth2")} == credentials
    if credentials:
        assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == {"insecureSkipVerify": True}
    else:
        assert "scheme" not in endpoint and "tlsConfig" not in endpoint


@pytest.mark.parametrize("overrides", [overrides for overrides, _ in CASES.values()], ids=CASES)
def test_the_servicemonitor_is_valid_for_the_prometheus_operator(overrides: tuple[str, ...]) -> None:
    assert strict_errors(monitor_of(render(ON, *overrides)), servicemonitor_schema()) == []


@pytest.mark.parametrize(
    "overrides",
    [(), (f"{TOKEN}.name=scrape-token",), ("watchNamespaces={team-a,team-b}",)],
    ids=["default-name", "named", "namespaced"],
)
def test_the_chart_made_token_may_get_metrics_and_nothing_else(overrides: tuple[str, ...]) -> None:
    """A ServiceAccount no pod runs as, its token Secret (filled by Kubernetes: the chart carries no secret), and one
    ClusterRoleBinding to metrics-reader (nonResourceURLs need a cluster binding, in namespaced mode too)."""
    objects = render(ON, f"{TOKEN}.create=true", *overrides)
    scraper = scraper_objects(objects)
    assert sorted(o["kind"] for o in scraper) == ["ClusterRoleBinding", "Secret", "ServiceAccount"]
    account, secret, binding = one(scraper, "ServiceAccount"), one(scraper, "Secret"), one(scraper, "ClusterRoleBinding")
    name = f"{FULLNAME}-metrics-scraper"
    assert account["metadata"] == account["metadata"] | {"name": name, "namespace": NAMESPACE}
    assert account["automountServiceAccountToken"] is False
    (endpoint,) = monitor_of(objects)["spec"]["endpoints"]
    assert secret["metadata"]["name"] == endpoint["authorization"]["credentials"]["name"]
    assert secret["metadata"]["namespace"] == NAMESPACE == monitor_of(objects)["metadata"]["namespace"]
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"] == {"kubernetes.io/service-account.name": name}
    assert "data" not in secret and "stringData" not in secret
    reader = f"{FULLNAME}-metrics-reader"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": reader}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    (role,) = [o for o in of_kind(list(objects), "ClusterRole") if o["metadata"]["name"] == reader]
    assert role["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    # Nothing else in the release is bound to the reader: the Prometheus binding stays the platform team's.
    bound = [o["metadata"]["name"] for o in objects if o["kind"].endswith("Binding") and o["roleRef"]["name"] == reader]
    assert bound == [name]


@pytest.mark.parametrize(
    "overrides",
    [(), (f"{TOKEN}.name=prometheus-token",), (f"{TOKEN}.create=true", f"{MONITOR}.enabled=false"), ("metrics.auth=false",)],
    ids=["token-file", "named-secret", "monitor-off", "plain-http"],
)
def test_no_token_is_made_unless_asked_for(overrides: tuple[str, ...]) -> None:
    objects = render(ON, *overrides)
    assert scraper_objects(objects) == [] and of_kind(list(objects), "Secret") == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # A token is for nothing where /metrics checks none: refused, not silently dropped.
        (
            ("metrics.auth=false", f"{TOKEN}.name=prometheus-token"),
            f"{TOKEN}: prometheus-token is set while metrics.auth is false; accepted: no tokenSecret",
        ),
        (
            ("metrics.auth=false", f"{TOKEN}.create=true"),
            f"{TOKEN}: {FULLNAME}-metrics-token is set while metrics.auth is false; accepted: no tokenSecret",
        ),
        (("rbac.create=false", f"{TOKEN}.create=true"), f"{TOKEN}.create: true while rbac.create is false; accepted: false"),
        ((f"{TOKEN}.create=true", f"{TOKEN}.key=bearer"), f"{TOKEN}.key: bearer with tokenSecret.create; accepted: token"),
        # values.schema.json
        ((f"{TOKEN}.nam=prometheus-token",), "additional properties 'nam' not allowed"),
        ((f"{TOKEN}.name=Prometheus_Token",), "tokenSecret/name"),
        ((f"{TOKEN}.key=",), "tokenSecret/key"),
        ((f"{TOKEN}.key=a/b",), "tokenSecret/key"),
        ((f"{TOKEN}.create=yes",), "tokenSecret/create"),
    ],
)
def test_token_values_that_cannot_work_are_refused(overrides: tuple[str, ...], message: str) -> None:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set", ON]
    for item in overrides:
        args += ["--set", item]
    result = k8s_tools.run("helm", *args, check=False)
    assert result.returncode != 0, f"--set {' '.join(overrides)} was accepted"
    assert message in result.stderr, result.stderr


def _notes(*set_values: str) -> str:
    args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", "--set", ON]
    for item in set_values:
        args += ["--set", item]
    return k8s_tools.run("helm", *args).stdout.partition("\nNOTES:\n")[2]


def test_the_notes_say_what_the_servicemonitor_scrapes_with() -> None:
    """A Prometheus with arbitraryFSAccessThroughSMs.deny skips the default ServiceMonitor and says so only in its
    operator's log: the install's notes name the cause and the value that fixes it."""
    default = _notes()
    assert "Prometheus's own token (bearerTokenFile)" in default
    assert f"--clusterrole={FULLNAME}-metrics-reader" in default
    assert "arbitraryFSAccessThroughSMs.deny" in default and f"set {TOKEN}" in default
    named = _notes(f"{TOKEN}.name=prometheus-token")
    assert "the token in Secret prometheus-token (key token)" in named and "bearerTokenFile" not in named
    assert "Metrics:" not in _notes("metrics.auth=false")
