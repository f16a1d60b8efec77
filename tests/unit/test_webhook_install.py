"""The admission webhook as the chart and kustomize install it: a configuration that the API server can use and that
cannot wedge the cluster (no DELETE, a short timeout, metadata-only updates never sent), wired to the operator's
Service, port, settings and certificate; RBAC exactly for what the webhook path calls; each certificate story
(the operator's own, cert-manager's) complete; on and off, cluster-wide and namespaced.

Every chart variant (charts/finetune-operator/ci) and kustomize target is rendered once; schema validity for
Kubernetes 1.35 is checked with the rest of the objects by test_chart.py and test_kustomize.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import celpy
import pytest

from finetune_operator import naming
from finetune_operator.settings import OperatorSettings
from tests.support import k8s_tools
from tests.support.k8s_tools import of_kind, one, permission_table
from tests.unit.test_chart import CHART, FULLNAME, NAMESPACE, RELEASE, VARIANT_FILES, VARIANTS, values_of
from tests.unit.test_kustomize import TARGETS

CERT_DIR = "/etc/finetune-operator/webhook"
WEBHOOK_RBAC = {("admissionregistration.k8s.io", "validatingwebhookconfigurations"): frozenset({"get", "patch"})}


@pytest.fixture(scope="module")
def charts() -> dict[str, list[dict[str, Any]]]:
    def render(variant: str) -> list[dict[str, Any]]:
        return k8s_tools.helm_template(CHART, release=RELEASE, namespace=NAMESPACE, values_files=[VARIANT_FILES[variant]])

    with ThreadPoolExecutor() as pool:
        return dict(zip(VARIANTS, pool.map(render, VARIANTS), strict=True))


@pytest.fixture(scope="module")
def kustomized() -> dict[str, list[dict[str, Any]]]:
    with ThreadPoolExecutor() as pool:
        return dict(zip(TARGETS, pool.map(k8s_tools.kustomize, TARGETS.values()), strict=True))


def _webhook(objects: list[dict[str, Any]]) -> Mapping[str, Any]:
    (webhook,) = one(objects, "ValidatingWebhookConfiguration")["webhooks"]
    return webhook  # type: ignore[no-any-return]


def _container(objects: list[dict[str, Any]]) -> Mapping[str, Any]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def _settings(objects: list[dict[str, Any]]) -> OperatorSettings:
    return OperatorSettings.from_env(k8s_tools.container_env(_container(objects)))


def _webhook_service(objects: list[dict[str, Any]]) -> Mapping[str, Any]:
    (service,) = [s for s in of_kind(objects, "Service") if s["metadata"]["labels"]["app.kubernetes.io/component"] == "webhook"]
    return service


def check_installed(objects: list[dict[str, Any]], namespaces: tuple[str, ...], failure_policy: str, timeout: int) -> None:
    """The configuration, the Service, the pod and the operator's settings agree, and nothing can wedge the cluster."""
    configuration, webhook, settings = one(objects, "ValidatingWebhookConfiguration"), _webhook(objects), _settings(objects)
    assert webhook["name"] == naming.WEBHOOK_NAME
    assert webhook["admissionReviewVersions"] == ["v1"] and webhook["sideEffects"] == "None"
    assert (webhook["failurePolicy"], webhook["timeoutSeconds"], webhook["matchPolicy"]) == (
        failure_policy,
        timeout,
        "Equivalent",
    )
    assert webhook["rules"] == [
        {
            "apiGroups": ["finetune.dev"],
            "apiVersions": ["v1alpha1"],
            "resources": ["finetunejobs"],
            "operations": ["CREATE", "UPDATE"],
            "scope": "Namespaced",
        }
    ], "never DELETE (nor *): deleting a job must not depend on the operator"
    if namespaces:
        selector = {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": list(namespaces)}]}
        assert webhook["namespaceSelector"] == selector
    else:
        assert "namespaceSelector" not in webhook
    assert settings.webhook_configuration == configuration["metadata"]["name"]
    # The API server calls SERVICE.NAMESPACE.svc:443/PATH: the Service, its target port and the certificate's name.
    service, pod = _webhook_service(objects), one(objects, "Deployment")["spec"]["template"]
    client = webhook["clientConfig"]["service"]
    assert client == {
        "name": service["metadata"]["name"],
        "namespace": service["metadata"]["namespace"],
        "path": "/validate-finetunejobs",
        "port": 443,
    }
    assert client["path"] == f"/{naming.WEBHOOK_PATH}"
    assert settings.webhook_host == f"{client['name']}.{client['namespace']}.svc"
    assert service["spec"]["ports"] == [{"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in _container(objects)["ports"]}
    assert ports["webhook"] == settings.webhook_port != 0


def check_certificate_story(objects: list[dict[str, Any]], issuer: Mapping[str, str] | None) -> None:
    """cert-manager's (``issuer``: the issuerRef) or the operator's own; each complete, neither half-installed."""
    configuration, settings = one(objects, "ValidatingWebhookConfiguration"), _settings(objects)
    annotations = configuration["metadata"].get("annotations", {})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    webhook_roles = [
        r for r in of_kind(objects, "ClusterRole") if r["metadata"]["labels"]["app.kubernetes.io/component"] == "webhook"
    ]
    if issuer is None:
        assert settings.webhook_cert_dir == "" and not of_kind(objects, "Certificate") and not of_kind(objects, "Issuer")
        assert "caBundle" not in _webhook(objects)["clientConfig"] and not annotations, "the operator writes caBundle"
        assert all("secret" not in volume for volume in pod["volumes"])
        # Exactly what the webhook path calls: get and patch on this one configuration, bound to the operator.
        (role,) = webhook_roles
        assert permission_table(role) == WEBHOOK_RBAC
        assert [rule["resourceNames"] for rule in role["rules"]] == [[settings.webhook_configuration]]
        binding = one(
            [b for b in of_kind(objects, "ClusterRoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]],
            "ClusterRoleBinding",
        )
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": pod["serviceAccountName"],
                "namespace": one(objects, "Deployment")["metadata"]["namespace"],
            }
        ]
        return
    certificate = one(objects, "Certificate")
    namespace = certificate["metadata"]["namespace"]
    assert namespace == one(objects, "Deployment")["metadata"]["namespace"], "beside the operator, whose Secret it writes"
    assert annotations == {"cert-manager.io/inject-ca-from": f"{namespace}/{certificate['metadata']['name']}"}
    assert certificate["spec"]["dnsNames"] == [settings.webhook_host]
    assert certificate["spec"]["issuerRef"] == issuer
    if issuer["kind"] == "Issuer":
        assert one(objects, "Issuer")["metadata"]["name"] == issuer["name"]
        assert one(objects, "Issuer")["spec"] == {"selfSigned": {}}
    else:
        assert not of_kind(objects, "Issuer")
    assert settings.webhook_cert_dir == CERT_DIR
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    assert {"name": volume["name"], "mountPath": CERT_DIR, "readOnly": True} in _container(objects)["volumeMounts"]
    assert webhook_roles == [], "cert-manager writes caBundle: the operator needs no permission on webhook configurations"


# ---------------------------------------------------------------------------------------------- chart
@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_installs_the_webhook_as_configured(charts: dict[str, list[dict[str, Any]]], variant: str) -> None:
    objects, values = charts[variant], values_of(variant)["webhook"]
    if not values["enabled"]:
        assert not of_kind(objects, "ValidatingWebhookConfiguration") and not of_kind(objects, "Certificate")
        assert [s["metadata"]["name"] for s in of_kind(objects, "Service")] == [f"{FULLNAME}-metrics"]
        assert _settings(objects).webhook_port == 0 and "webhook" not in {p["name"] for p in _container(objects)["ports"]}
        return
    namespaces = tuple(values_of(variant)["watchNamespaces"])
    check_installed(objects, namespaces, values["failurePolicy"], values["timeoutSeconds"])
    manager = values["certManager"]
    issuer = (
        (manager["issuerRef"] or {"kind": "Issuer", "name": f"{FULLNAME}-webhook-selfsigned"}) if manager["enabled"] else None
    )
    check_certificate_story(objects, issuer)


def test_chart_variants_cover_every_combination() -> None:
    """On and off; the operator's certificate and cert-manager's; cluster-wide and namespaced."""
    seen = set()
    for variant in VARIANTS:
        values = values_of(variant)
        webhook = values["webhook"]
        seen.add((webhook["enabled"], webhook["enabled"] and webhook["certManager"]["enabled"], bool(values["watchNamespaces"])))
    assert {(True, False, False), (True, False, True), (True, True, False), (True, True, True), (False, False, False)} <= seen


def test_defaults_are_the_operators_own_certificate_and_ignore() -> None:
    defaults = values_of("default")["webhook"]
    assert (defaults["enabled"], defaults["certManager"]["enabled"], defaults["failurePolicy"]) == (True, False, "Ignore")
    assert defaults["timeoutSeconds"] <= 5


def test_a_long_release_name_still_gives_a_valid_service_name() -> None:
    release = "r" * 50
    objects = k8s_tools.helm_template(CHART, release=release, namespace=NAMESPACE)
    service = _webhook_service(objects)
    assert len(service["metadata"]["name"]) <= 63 and k8s_tools.validate(service)
    assert _settings(objects).webhook_host == f"{service['metadata']['name']}.{NAMESPACE}.svc"


# ------------------------------------------------------------------------------------------ kustomize
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_kustomize_installs_the_webhook(kustomized: dict[str, list[dict[str, Any]]], target: str) -> None:
    objects = kustomized[target]
    namespaces = ("team-a", "team-b") if target == "namespaced" else ()
    check_installed(objects, namespaces, "Ignore", 5)
    issuer = {"kind": "Issuer", "name": "finetune-operator-webhook-selfsigned"} if target == "cert-manager" else None
    check_certificate_story(objects, issuer)


def test_kustomize_base_is_the_charts_default_webhook(kustomized: dict[str, list[dict[str, Any]]]) -> None:
    """Release finetune-operator renders the base's names: the same configuration, Service and RBAC either way."""
    chart = k8s_tools.helm_template(CHART, release="finetune-operator", namespace="finetune-system")
    base = kustomized["base"]
    assert _webhook(base) == _webhook(chart)
    assert _webhook_service(base)["spec"] == _webhook_service(chart)["spec"]
    for kind in ("ClusterRole", "ClusterRoleBinding"):
        (ours,) = [o for o in of_kind(base, kind) if o["metadata"]["name"] == "finetune-operator-webhook"]
        (theirs,) = [o for o in of_kind(chart, kind) if o["metadata"]["name"] == "finetune-operator-webhook"]
        assert ours.get("rules") == theirs.get("rules") and ours.get("subjects") == theirs.get("subjects"), kind


def test_kustomize_cert_manager_overlay_matches_the_charts(kustomized: dict[str, list[dict[str, Any]]]) -> None:
    chart = k8s_tools.helm_template(
        CHART, release="finetune-operator", namespace="finetune-system", set_values=["webhook.certManager.enabled=true"]
    )
    overlay = kustomized["cert-manager"]
    assert one(overlay, "Certificate")["spec"] == one(chart, "Certificate")["spec"]
    assert (
        one(overlay, "ValidatingWebhookConfiguration")["metadata"]["annotations"]
        == (one(chart, "ValidatingWebhookConfiguration")["metadata"]["annotations"])
    )
    assert k8s_tools.container_env(_container(overlay)) == k8s_tools.container_env(_container(chart))


# --------------------------------------------------------------------------------- match condition
@pytest.mark.parametrize(
    ("operation", "old_spec", "new_spec", "sent"),
    [
        pytest.param("CREATE", None, {"model": {"name": "resnet18"}}, True, id="create"),
        pytest.param("UPDATE", {"model": {"name": "resnet18"}}, {"model": {"name": "resnet50"}}, True, id="spec-changed"),
        pytest.param(
            "UPDATE", {"runPolicy": {"suspend": False}}, {"runPolicy": {"suspend": True}}, True, id="suspend-is-judged-too"
        ),
        pytest.param("UPDATE", {"model": {"name": "resnet18"}}, {"model": {"name": "resnet18"}}, False, id="metadata-only"),
    ],
)
def test_only_creates_and_spec_changes_are_sent(operation: str, old_spec: Any, new_spec: Any, sent: bool) -> None:
    """The configuration's matchCondition, evaluated by a CEL interpreter as the API server would."""
    (condition,) = _webhook(k8s_tools.kustomize(TARGETS["base"]))["matchConditions"]
    env = celpy.Environment()
    program = env.program(env.compile(condition["expression"]))
    labels = {"a": "b"} if operation == "UPDATE" else {}
    new = {"metadata": {"name": "j", "labels": labels}, "spec": new_spec}
    old = None if old_spec is None else {"metadata": {"name": "j"}, "spec": old_spec}
    activation = {"request": celpy.json_to_cel({"operation": operation}), "object": celpy.json_to_cel(new)}
    activation["oldObject"] = celpy.json_to_cel(old)
    assert bool(program.evaluate(activation)) is sent
