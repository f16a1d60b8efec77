"""The Helm chart: lints strictly, renders schema-valid objects for every documented variant (``ci/*-values.yaml``),
and renders what the operator needs and nothing more: the exact RBAC table, a pod meeting the "restricted" Pod
Security profile, settings that the operator's own parser accepts, and the generated CRD byte for byte.

helm-unittest style: each test renders (once per variant, cached in a module fixture) and asserts on objects.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from finetune_operator import __version__
from finetune_operator.api import versions
from finetune_operator.api.crd import build_crd
from finetune_operator.settings import OperatorSettings
from tests.support import k8s_tools
from tests.support.k8s_tools import KOPF_CLUSTER_RULES, OPERATOR_RULES, of_kind, one, permission_table
from tests.support.pod_security import restricted_violations
from tests.support.schemas import REPO

CHART = REPO / "charts" / "finetune-operator"
RELEASE, NAMESPACE = "ft", "finetune-system"
FULLNAME = f"{RELEASE}-finetune-operator"
VARIANT_FILES = {path.name.removesuffix("-values.yaml"): path for path in sorted((CHART / "ci").glob("*-values.yaml"))}
VARIANTS = sorted(VARIANT_FILES)
DEFAULTS: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())

# What each variant renders, kind by kind: the documented switches and nothing else.
BASE_KINDS = {
    "CustomResourceDefinition": 1,
    "ServiceAccount": 1,
    "ClusterRole": 1,
    "ClusterRoleBinding": 1,
    "Deployment": 1,
    "Service": 1,
}
NAMESPACED_KINDS = {k: v for k, v in BASE_KINDS.items() if not k.startswith("Cluster")} | {"Role": 2, "RoleBinding": 2}
# The admission webhook (tests/unit/test_webhook_install.py): its configuration and Service, then either the
# operator's RBAC on that configuration (its own certificate) or cert-manager's objects.
WEBHOOK_KINDS = {"ValidatingWebhookConfiguration": 1, "Service": 1}
OWN_CERTIFICATE = WEBHOOK_KINDS | {"ClusterRole": 1, "ClusterRoleBinding": 1}
CERT_MANAGER = WEBHOOK_KINDS | {"Certificate": 1}
# Two replicas under leader election (the default): the Lease's Role and RoleBinding, and a PodDisruptionBudget.
HA = {"Role": 1, "RoleBinding": 1, "PodDisruptionBudget": 1}
# /metrics behind token reviews (metrics.auth, the default): the reviews' ClusterRole and binding, and metrics-reader.
METRICS_AUTH = {"ClusterRole": 2, "ClusterRoleBinding": 1}
# The ServiceMonitor's own token (metrics.serviceMonitor.tokenSecret.create): its ServiceAccount, Secret and binding.
METRICS_SCRAPER = {"ServiceAccount": 1, "Secret": 1, "ClusterRoleBinding": 1}


def _plus(*parts: dict[str, int]) -> dict[str, int]:
    return dict(sum((Counter(part) for part in parts), Counter()))


EXPECTED_KINDS = {
    "default": _plus(BASE_KINDS, OWN_CERTIFICATE, HA, METRICS_AUTH),
    "namespaced": _plus(NAMESPACED_KINDS, OWN_CERTIFICATE, HA, METRICS_AUTH),
    "servicemonitor": _plus(BASE_KINDS, OWN_CERTIFICATE, {"ServiceMonitor": 1}, HA, METRICS_AUTH),
    "servicemonitor-token": _plus(BASE_KINDS, OWN_CERTIFICATE, {"ServiceMonitor": 1}, HA, METRICS_AUTH, METRICS_SCRAPER),
    "networkpolicy": _plus(BASE_KINDS, OWN_CERTIFICATE, {"NetworkPolicy": 1}, HA, METRICS_AUTH),
    "networkpolicy-pinned": _plus(BASE_KINDS, OWN_CERTIFICATE, {"NetworkPolicy": 1}, HA, METRICS_AUTH),
    "nocrds": _plus({k: v for k, v in BASE_KINDS.items() if k != "CustomResourceDefinition"}, OWN_CERTIFICATE, HA, METRICS_AUTH),
    "custom-image": _plus(BASE_KINDS, OWN_CERTIFICATE, HA, METRICS_AUTH),
    "webhook-certmanager": _plus(BASE_KINDS, CERT_MANAGER, {"Issuer": 1}, HA, METRICS_AUTH),
    "webhook-certmanager-namespaced": _plus(NAMESPACED_KINDS, CERT_MANAGER, HA, METRICS_AUTH),
    "webhook-off": _plus(BASE_KINDS, HA, METRICS_AUTH),
    "single-replica": _plus(BASE_KINDS, OWN_CERTIFICATE, METRICS_AUTH),
    "metrics-plain": _plus(BASE_KINDS, OWN_CERTIFICATE, HA),
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's values merge: maps merge key by key, everything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def values_of(variant: str) -> dict[str, Any]:
    return _merge(DEFAULTS, yaml.safe_load(VARIANT_FILES[variant].read_text()) or {})


@cache
def _script(name: str) -> ModuleType:
    """A module of scripts/ (not a package), imported from its file."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict[str, Any]]]:
    """Every variant rendered once for the whole module; helm runs in parallel (each call is a separate process)."""

    def render(path: Path) -> list[dict[str, Any]]:
        return k8s_tools.helm_template(CHART, release=RELEASE, namespace=NAMESPACE, values_files=[path])

    with ThreadPoolExecutor() as pool:
        return dict(zip(VARIANT_FILES, pool.map(render, VARIANT_FILES.values()), strict=True))


# The tenants' ClusterRoles and the `helm test` hook, on in every variant: tests/unit/test_platform_chart.py checks them.
PLATFORM_COMPONENTS = ("tenant-rbac", "helm-test")


def _component(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")  # type: ignore[no-any-return]


def without_platform(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [obj for obj in objects if _component(obj) not in PLATFORM_COMPONENTS]


def operator_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Everything but the admission webhook's objects (tests/unit/test_webhook_install.py checks those), the Lease's
    RBAC (test_leader_election_rbac_is_the_lease_alone), /metrics' (test_metrics_rbac_is_the_token_reviews_alone), the
    ServiceMonitor's own token (tests/unit/test_chart_servicemonitor.py) and PLATFORM_COMPONENTS."""
    aside = ("webhook", "leader-election", "metrics-auth", "metrics-scraper", *PLATFORM_COMPONENTS)
    return [obj for obj in objects if obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") not in aside]


def _pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"]
    return pod


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _pod(objects)["containers"]
    return container  # type: ignore[no-any-return]


def test_every_documented_variant_has_expectations() -> None:
    assert set(VARIANTS) == set(EXPECTED_KINDS), "add the new ci/*-values.yaml variant to EXPECTED_KINDS"


# ---------------------------------------------------------------------------------------- lint, render
@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict(variant: str) -> None:
    result = k8s_tools.run("helm", "lint", "--strict", str(CHART), "--values", str(VARIANT_FILES[variant]), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_expected_kinds(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    assert Counter(obj["kind"] for obj in without_platform(renders[variant])) == Counter(EXPECTED_KINDS[variant])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_valid_for_kubernetes_1_35(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    validated = [obj["kind"] for obj in renders[variant] if k8s_tools.validate(obj)]
    # The Prometheus Operator's and cert-manager's CRDs are unknown to kubernetes-validate: only they may be skipped.
    skipped = [obj["kind"] for obj in renders[variant] if obj["kind"] not in validated]
    assert set(skipped) <= {"ServiceMonitor", "Certificate", "Issuer"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_namespaced_objects_are_in_the_release_namespace(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    watched = set(values_of(variant)["watchNamespaces"])
    for obj in without_platform(renders[variant]):
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ValidatingWebhookConfiguration"):
            assert namespace is None, obj["kind"]
        elif obj["kind"] in ("Role", "RoleBinding") and obj["metadata"]["labels"]["app.kubernetes.io/component"] == "rbac":
            assert namespace in watched
        else:
            assert namespace == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']}"


# ------------------------------------------------------------------------------------- pod security
@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_meets_restricted_profile(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    deployment = one(renders[variant], "Deployment")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations")
    assert restricted_violations(_pod(renders[variant]), annotations) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_container_is_hardened_beyond_the_profile(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    pod, container = _pod(renders[variant]), _container(renders[variant])
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}, "drop ALL and add nothing"
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] != 0 and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert not any(pod.get(field) for field in ("hostNetwork", "hostPID", "hostIPC"))


# --------------------------------------------------------------------------------------- deployment
@pytest.mark.parametrize("variant", VARIANTS)
def test_deployment_shape(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    values = values_of(variant)
    deployment = one(renders[variant], "Deployment")
    pod, container = _pod(renders[variant]), _container(renders[variant])
    if values["leaderElection"]["enabled"]:
        assert deployment["spec"]["replicas"] == values["replicas"] == 2
        assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
        term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        pdb = one(renders[variant], "PodDisruptionBudget")
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": deployment["spec"]["selector"]}
    else:  # without leader election two pods side by side would both reconcile every job
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        assert "affinity" not in pod and not of_kind(renders[variant], "PodDisruptionBudget")
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    webhook = {"webhook": values["webhook"]["port"]} if values["webhook"]["enabled"] else {}
    assert ports == {"metrics": values["metrics"]["port"], "healthz": 8081} | webhook  # 8081: the image's --liveness URL
    assert container["resources"] == values["resources"]
    assert pod["serviceAccountName"] == FULLNAME
    assert pod.get("imagePullSecrets", []) == values["imagePullSecrets"]
    tag = values["image"]["tag"] or __version__
    assert container["image"] == f"{values['image']['repository']}:{tag}"
    namespaces = values["watchNamespaces"]
    assert container["args"] == ([f"--namespace={ns}" for ns in namespaces] if namespaces else ["--all-namespaces"])


def test_artifact_protection_flag_and_public_key() -> None:
    """Issue 15: one values flag and the public key (in values, or a ConfigMap) make the operator require protected models."""
    key = "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik="
    inline = ["artifactProtection.required=true", f"artifactProtection.verifyKeys={key}"]
    objects = k8s_tools.helm_template(CHART, release=RELEASE, namespace=NAMESPACE, set_values=inline)
    settings = OperatorSettings.from_env(k8s_tools.container_env(_container(objects)))
    assert (settings.require_protected_artifacts, settings.verify_keys) == (True, key)
    from_map = ["artifactProtection.required=true", "artifactProtection.verifyKeysConfigMap.name=model-signers"]
    env = _container(k8s_tools.helm_template(CHART, release=RELEASE, namespace=NAMESPACE, set_values=from_map))["env"]
    entry = next(e for e in env if e["name"] == "FINETUNE_OPERATOR_VERIFY_KEYS")
    assert entry == {
        "name": "FINETUNE_OPERATOR_VERIFY_KEYS",
        "valueFrom": {"configMapKeyRef": {"name": "model-signers", "key": "verify-keys"}},
    }


def test_image_digest_pins_the_image() -> None:
    digest = "sha256:" + "ab" * 32
    objects = k8s_tools.helm_template(CHART, release=RELEASE, namespace=NAMESPACE, set_values=[f"image.digest={digest}"])
    assert _container(objects)["image"] == f"{versions.OPERATOR_IMAGE_REPOSITORY}@{digest}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_env_mirrors_values(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    values = values_of(variant)
    settings = values["settings"]
    env = k8s_tools.container_env(_container(renders[variant]))
    assert env == {
        "FINETUNE_OPERATOR_NAMESPACES": ",".join(values["watchNamespaces"]),
        "FINETUNE_OPERATOR_TRAINER_IMAGE": settings["trainerImage"] or versions.DEFAULT_TRAINER_IMAGE,
        "FINETUNE_OPERATOR_RAY_VERSION": settings["rayVersion"],
        "FINETUNE_OPERATOR_MAX_WORKERS": str(settings["maxWorkers"]),
        "FINETUNE_OPERATOR_MAX_DATA_WORKERS": str(settings["maxDataWorkers"]),
        "FINETUNE_OPERATOR_MAX_GPUS_PER_WORKER": str(settings["maxGpusPerWorker"]),
        "FINETUNE_OPERATOR_DEFAULT_TTL_SECONDS": str(settings["defaultTtlSeconds"]),
        "FINETUNE_OPERATOR_PRE_RUNNING_DEADLINE_SECONDS": str(settings["preRunningDeadlineSeconds"]),
        "FINETUNE_OPERATOR_STATUS_THROTTLE_SECONDS": str(settings["statusThrottleSeconds"]),
        "FINETUNE_OPERATOR_HEAD_CPU": str(settings["headCpu"]),
        "FINETUNE_OPERATOR_HEAD_MEMORY": settings["headMemory"],
        "FINETUNE_OPERATOR_METRICS_PORT": str(values["metrics"]["port"]),
        "FINETUNE_OPERATOR_METRICS_AUTH": str(values["metrics"]["auth"]).lower(),
        "FINETUNE_OPERATOR_LOG_LEVEL": settings["logLevel"],
        # trainerPods, empty fields left out (priorityClassName has a variable of its own).
        "FINETUNE_OPERATOR_POD_DEFAULTS": json.dumps(
            {k: v for k, v in values["trainerPods"].items() if v and k != "priorityClassName"},
            separators=(",", ":"),
            sort_keys=True,
        ),
        "FINETUNE_OPERATOR_DEFAULT_PRIORITY_CLASS_NAME": values["trainerPods"]["priorityClassName"],
        "FINETUNE_OPERATOR_TRAINER_UID": str(settings["trainerUid"]),
        "FINETUNE_OPERATOR_TRAINER_GID": str(settings["trainerGid"]),
        "FINETUNE_OPERATOR_RAY_AUTH_MODE": settings["rayAuthMode"],
        "FINETUNE_OPERATOR_JOB_NETWORK_POLICY": str(settings["jobNetworkPolicy"]).lower(),
        "FINETUNE_OPERATOR_KUBERAY_NAMESPACE": settings["kuberayNamespace"],
        "FINETUNE_OPERATOR_KUBERAY_POD_LABELS": ",".join(settings["kuberayPodLabels"]),
        "FINETUNE_OPERATOR_METRICS_SCRAPER_NAMESPACE": settings["metricsScraperNamespace"],
        "FINETUNE_OPERATOR_METRICS_SCRAPER_POD_LABELS": ",".join(settings["metricsScraperPodLabels"]),
        "FINETUNE_OPERATOR_WEBHOOK_PORT": str(values["webhook"]["port"] if values["webhook"]["enabled"] else 0),
        "FINETUNE_OPERATOR_WEBHOOK_HOST": f"{FULLNAME}-webhook.{NAMESPACE}.svc",
        "FINETUNE_OPERATOR_WEBHOOK_CONFIGURATION": FULLNAME,
        "FINETUNE_OPERATOR_WEBHOOK_CERT_DIR": (
            "/etc/finetune-operator/webhook"
            if values["webhook"]["enabled"] and values["webhook"]["certManager"]["enabled"]
            else ""
        ),
        "FINETUNE_OPERATOR_LEADER_ELECTION": str(values["leaderElection"]["enabled"]).lower(),
        "FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE": NAMESPACE,
        "FINETUNE_OPERATOR_LEADER_ELECTION_LEASE": FULLNAME,
        "FINETUNE_OPERATOR_LEADER_ELECTION_IDENTITY": "",
        "FINETUNE_OPERATOR_LEASE_DURATION_SECONDS": str(values["leaderElection"]["leaseDurationSeconds"]),
        "FINETUNE_OPERATOR_RENEW_DEADLINE_SECONDS": str(values["leaderElection"]["renewDeadlineSeconds"]),
        "FINETUNE_OPERATOR_RETRY_PERIOD_SECONDS": str(values["leaderElection"]["retryPeriodSeconds"]),
        "FINETUNE_OPERATOR_REQUIRE_PROTECTED_ARTIFACTS": str(values["artifactProtection"]["required"]).lower(),
        "FINETUNE_OPERATOR_VERIFY_KEYS": values["artifactProtection"]["verifyKeys"],
    }
    # The operator's own parser accepts every rendered value and reads back what values.yaml says.
    parsed = OperatorSettings.from_env(env)
    assert parsed.namespaces == tuple(values["watchNamespaces"])
    assert parsed.max_workers == settings["maxWorkers"]
    assert parsed.max_data_workers == settings["maxDataWorkers"]
    assert parsed.status_throttle_seconds == float(settings["statusThrottleSeconds"])
    assert parsed.log_level == settings["logLevel"]


def test_every_operator_setting_is_in_the_chart(renders: dict[str, list[dict[str, Any]]]) -> None:
    env = k8s_tools.container_env(_container(renders["default"]))
    assert set(env) == set(OperatorSettings().to_env()), "mirror each OperatorSettings field in values.yaml"
    # The webhook's names follow the release; manifests/base's are the operator's defaults (test_kustomize).
    named: dict[str, Any] = {"webhook_host": f"{FULLNAME}-webhook.{NAMESPACE}.svc", "webhook_configuration": FULLNAME}
    # What a one-process run leaves off, the chart turns on: leader election, with the release's Lease.
    named |= {"leader_election": True, "leader_election_namespace": NAMESPACE, "leader_election_lease": FULLNAME}
    assert OperatorSettings.from_env(env) == OperatorSettings().replace(**named), (
        "values.yaml defaults differ from the operator's"
    )


def test_chart_versions_agree_with_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    assert DEFAULTS["image"]["repository"] == versions.OPERATOR_IMAGE_REPOSITORY
    assert DEFAULTS["settings"]["rayVersion"] == versions.RAY_VERSION
    assert "dependencies" not in chart, "a dependency breaks offline `helm lint`/`template`; see Chart.yaml"


def test_default_images(renders: dict[str, list[dict[str, Any]]]) -> None:
    container = _container(renders["default"])
    assert container["image"] == versions.DEFAULT_OPERATOR_IMAGE
    assert k8s_tools.container_env(container)["FINETUNE_OPERATOR_TRAINER_IMAGE"] == versions.DEFAULT_TRAINER_IMAGE


def test_trainer_pods_reach_all_three_pod_templates(renders: dict[str, list[dict[str, Any]]]) -> None:
    """The private-registry example makes trainer images pullable: its imagePullSecrets, and every other trainerPods
    override, reach head, workers and KubeRay's submitter, which stay KubeRay-schema valid and "restricted"."""
    from finetune_operator.admission import admit
    from finetune_operator.rayjob import build_children
    from tests.support.pod_security import template_violations
    from tests.support.schemas import strict_errors
    from tests.unit.test_rayjob import RAYJOB_SCHEMA, body, pod_templates

    pods = values_of("custom-image")["trainerPods"]
    settings = OperatorSettings.from_env(k8s_tools.container_env(_container(renders["custom-image"])))
    rayjob = build_children(admit(body(), settings), settings).rayjob
    templates = pod_templates(rayjob)
    assert list(templates) == ["head", "worker:workers", "submitter"]
    for role, template in templates.items():
        pod = template["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}] == pods["imagePullSecrets"], role
        assert pods["labels"].items() <= template["metadata"]["labels"].items(), role
        assert template["metadata"]["annotations"] == pods["annotations"], role
        assert [v for v in pod["volumes"] if v["name"] in {"corp-ca", "tmp"}] == pods["volumes"], role
        assert pod["containers"][0]["volumeMounts"][-2:] == pods["volumeMounts"], role
        assert (pod["affinity"], pod["nodeSelector"], pod["tolerations"]) == (
            pods["affinity"],
            pods["nodeSelector"],
            pods["tolerations"],
        ), role
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True, role
        assert pod["priorityClassName"] == pods["priorityClassName"], role
        assert template_violations(template) == [], role
    assert strict_errors(rayjob, RAYJOB_SCHEMA) == []


# --------------------------------------------------------------------------------------------- RBAC
def _roles(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] in ("Role", "ClusterRole")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_rbac_has_no_wildcards(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    for role in _roles(renders[variant]):
        assert k8s_tools.wildcards(role) == [], role["metadata"]["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_rbac_is_exactly_what_the_operator_uses(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    objects = operator_objects(renders[variant])
    namespaces = values_of(variant)["watchNamespaces"]
    subject = [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    if namespaces:
        assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
        assert sorted(r["metadata"]["namespace"] for r in of_kind(objects, "Role")) == sorted(namespaces)
        assert sorted(b["metadata"]["namespace"] for b in of_kind(objects, "RoleBinding")) == sorted(namespaces)
        for role in of_kind(objects, "Role"):
            assert permission_table(role) == OPERATOR_RULES
        for binding in of_kind(objects, "RoleBinding"):
            assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}
            assert binding["subjects"] == subject
    else:
        assert permission_table(one(objects, "ClusterRole")) == OPERATOR_RULES | KOPF_CLUSTER_RULES
        binding = one(objects, "ClusterRoleBinding")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": FULLNAME}
        assert binding["subjects"] == subject


@pytest.mark.parametrize("variant", VARIANTS)
def test_leader_election_rbac_is_the_lease_alone(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    objects = [
        o for o in renders[variant] if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "leader-election"
    ]
    if not values_of(variant)["leaderElection"]["enabled"]:
        assert objects == []
        return
    role, binding = one(objects, "Role"), one(objects, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert permission_table(role) == k8s_tools.LEADER_ELECTION_RULES
    assert {tuple(rule.get("resourceNames", ())) for rule in role["rules"] if "create" not in rule["verbs"]} == {(FULLNAME,)}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]


@pytest.mark.parametrize("variant", VARIANTS)
def test_metrics_rbac_is_the_token_reviews_alone(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    """/metrics asks the API server about each scraper's token (k8s_tools.METRICS_AUTH_RULES, derived from the calls in
    tests/integration/test_metrics_auth.py), and offers a ClusterRole to bind a Prometheus to; a ServiceMonitor then
    scrapes over HTTPS with its token. metrics.auth false: none of it, and plain HTTP."""
    objects = [o for o in renders[variant] if _component(o) == "metrics-auth"]
    monitors = [o for o in renders[variant] if o["kind"] == "ServiceMonitor"]
    if not values_of(variant)["metrics"]["auth"]:
        assert objects == []
        assert all("scheme" not in endpoint for m in monitors for endpoint in m["spec"]["endpoints"])
        return
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterRole"}
    assert permission_table(roles[f"{FULLNAME}-metrics-auth"]) == k8s_tools.METRICS_AUTH_RULES
    assert roles[f"{FULLNAME}-metrics-reader"]["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": f"{FULLNAME}-metrics-auth",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    token = values_of(variant)["metrics"]["serviceMonitor"]["tokenSecret"]
    secret = token["name"] or (f"{FULLNAME}-metrics-token" if token["create"] else "")
    credentials = (
        {"authorization": {"type": "Bearer", "credentials": {"name": secret, "key": token["key"]}}}
        if secret
        else {"bearerTokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}
    )
    for monitor in monitors:
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == {"insecureSkipVerify": True}
        assert {k: v for k, v in endpoint.items() if k in ("authorization", "bearerTokenFile")} == credentials


def test_replicas_without_leader_election_fail_to_render() -> None:
    result = k8s_tools.run("helm", "template", RELEASE, str(CHART), "--set", "leaderElection.enabled=false", check=False)
    assert result.returncode != 0 and "replicas above 1 need leaderElection.enabled" in result.stderr


def test_operator_holds_what_it_grants_to_trainers() -> None:
    """RBAC's escalation rule: a per-job Role may only grant what the operator itself holds."""
    from finetune_operator.rayjob import TRAINER_VERBS

    assert set(TRAINER_VERBS) <= OPERATOR_RULES[(versions.GROUP, f"{versions.PLURAL}/status")]


def test_rbac_create_false_renders_no_rbac() -> None:
    objects = k8s_tools.helm_template(CHART, release=RELEASE, namespace=NAMESPACE, set_values=["rbac.create=false"])
    assert of_kind(objects, "ValidatingWebhookConfiguration"), "the webhook is still installed"
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} & {obj["kind"] for obj in objects}


# ------------------------------------------------------------------------------------- selectors
@pytest.mark.parametrize("variant", VARIANTS)
def test_selectors_match_the_operator_pod(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    objects = operator_objects(renders[variant])
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": values_of(variant)["metrics"]["port"], "targetPort": "metrics", "protocol": "TCP"}
    ]
    for monitor in of_kind(objects, "ServiceMonitor"):
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    for policy in of_kind(objects, "NetworkPolicy"):
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
        ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert ingress_ports == {"metrics", "healthz"} | ({"webhook"} if values_of(variant)["webhook"]["enabled"] else set())


@pytest.mark.parametrize("variant", [v for v in VARIANTS if values_of(v)["networkPolicy"]["enabled"]])
def test_network_policy_egress_goes_only_where_the_values_say(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    """Egress: the API server's ports and DNS, each to the given peers (any address when none are given)."""
    values = values_of(variant)["networkPolicy"]
    api, dns = one(operator_objects(renders[variant]), "NetworkPolicy")["spec"]["egress"]
    assert {p["port"] for p in api["ports"]} == set(values["apiServerPorts"])
    assert api.get("to") == ([{"ipBlock": {"cidr": cidr}} for cidr in values["apiServerCIDRs"]] or None)
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns.get("to") == (values["dnsTo"] or None)


# ---------------------------------------------------------------------------------- values schema
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("imagee.tag=1.0", "additional properties 'imagee' not allowed"),
        ("image.tagg=1.0", "additional properties 'tagg' not allowed"),
        ("settings.maxWorker=8", "additional properties 'maxWorker' not allowed"),
        ("metrics.serviceMonitor.enable=true", "additional properties 'enable' not allowed"),
        ("settings.logLevel=VERBOSE", "logLevel"),
        ("settings.maxWorkers=0", "maxWorkers"),
        ("settings.headMemory=lots", "headMemory"),
        ("watchNamespaces={Team_A}", "watchNamespaces"),
        ("crds.enabled=yes", "enabled"),
        ("settings.rayAuthMode=off", "rayAuthMode"),
        ("settings.trainerUid=0", "trainerUid"),
        ("settings.jobNetworkPolicy=maybe", "jobNetworkPolicy"),
        ("networkPolicy.apiServerCIDRs={10.96.0.1}", "apiServerCIDRs/0"),
        ("networkPolicy.apiServerCIDRs={10.96.0.0/33}", "apiServerCIDRs/0"),
        ("networkPolicy.apiServerCIDRs={kubernetes.default}", "apiServerCIDRs/0"),
        ("networkPolicy.dnsTo[0].podSelector.matchLabel.k8s-app=kube-dns", "matchLabel"),
        ("networkPolicy.metricsFrom[0].ipBlock.cidr=10.0.0.1", "metricsFrom/0/ipBlock/cidr"),
        ("settings.kuberayPodLabels={app}", "kuberayPodLabels"),
        ("settings.kuberayNamespace=Kube_Ray", "kuberayNamespace"),
        ("webhook.failurePolicy=Never", "failurePolicy"),
        ("webhook.timeoutSeconds=60", "timeoutSeconds"),
        ("webhook.port=443", "port"),
        ("webhook.certManager.issuerRef.kind=Secret", "kind"),
        ("webhook.certManager.issuerRef.name=ca", "kind"),
    ],
)
def test_values_schema_rejects(override: str, message: str) -> None:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set", override]
    result = k8s_tools.run("helm", *args, check=False)
    assert result.returncode != 0, f"--set {override} was accepted"
    assert message in result.stderr, result.stderr


# --------------------------------------------------------------------------------------------- CRD
def test_chart_crd_spec_is_the_generated_one(renders: dict[str, list[dict[str, Any]]]) -> None:
    crd = one(renders["default"], "CustomResourceDefinition")
    generated = build_crd()
    assert crd["spec"] == generated["spec"]
    assert crd["metadata"]["name"] == generated["metadata"]["name"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_chart_crd_template_copies_manifest_byte_for_byte() -> None:
    sync = _script("sync_crd")
    template = (CHART / "templates" / "crd.yaml").read_text()
    manifest = (REPO / "manifests" / "base" / "crd.yaml").read_text()
    assert template.removesuffix(sync.CHART_FOOTER).endswith(sync.spec_block(manifest))
    assert sync.main(["--check"]) == 0, "run python scripts/sync_crd.py"


# ------------------------------------------------------------------------------------------ README
def test_every_value_is_documented() -> None:
    readme = _script("chart_readme")
    assert readme.undocumented((CHART / "values.yaml").read_text()) == []


def test_readme_is_generated_from_values() -> None:
    assert _script("chart_readme").main(["--check"]) == 0, "run python scripts/chart_readme.py"


def test_readme_parser_reads_helm_docs_comments() -> None:
    readme = _script("chart_readme")
    text = "# -- first\n# continued\na:\n  # -- nested\n  b: 1\n  c: 2\n\n# plain comment\nd: []\n"
    parsed = [(e.path, e.description) for e in readme.parse_values(text)]
    assert parsed == [("a", "first continued"), ("a.b", "nested"), ("a.c", None), ("d", None)]


def test_metrics_stay_authenticated_when_an_upgrade_reuses_values_without_the_switch() -> None:
    """`helm upgrade --reuse-values` from a release before metrics.auth carries no such value: the token reviews must
    stay on (the env and their RBAC), not turn off because the value is missing."""
    objects = k8s_tools.helm_template(CHART, release=RELEASE, namespace=NAMESPACE, set_values=["metrics.auth=null"])
    assert k8s_tools.container_env(_container(objects))["FINETUNE_OPERATOR_METRICS_AUTH"] == "true"
    assert {o["metadata"]["name"] for o in objects if _component(o) == "metrics-auth" and o["kind"] == "ClusterRole"} == {
        f"{FULLNAME}-metrics-auth",
        f"{FULLNAME}-metrics-reader",
    }
