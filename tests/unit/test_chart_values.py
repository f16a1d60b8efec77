"""The Helm chart under values a platform team really sets (long release names and namespaces, name overrides,
security-context overrides, extra labels, moved ports, a PodDisruptionBudget): each either renders objects the API
server accepts, on a pod that still meets the "restricted" Pod Security profile, or is refused by ``helm template``
with a message naming the value. Rendered with the real helm binary (tests/unit/test_chart.py has the variants)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Any

import pytest

from finetune_operator.api.fields import DNS1123_LABEL, DNS1123_SUBDOMAIN, LABEL_VALUE, QUALIFIED_NAME
from tests.support import k8s_tools
from tests.support.pod_security import restricted_violations
from tests.support.schemas import REPO

CHART = REPO / "charts" / "finetune-operator"
RELEASE, NAMESPACE = "ft", "finetune-system"
# Every optional object on, so that each template's names and labels are checked.
EVERYTHING = (
    "metrics.serviceMonitor.enabled=true",
    "metrics.serviceMonitor.tokenSecret.create=true",
    "networkPolicy.enabled=true",
    "grafanaDashboard.enabled=true",
)
# Kinds whose name must be a DNS-1035 label (at most 63 characters): it becomes a DNS name or a label value.
DNS_LABEL_KINDS = {"Service", "Namespace"}


@cache
def helm(release: str, namespace: str, *set_values: str) -> tuple[int, str, tuple[dict[str, Any], ...]]:
    """``helm template`` with each ``--set`` (``--set-string`` for an item starting with ``@``)."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    for item in set_values:
        args += ["--set-string", item[1:]] if item.startswith("@") else ["--set", item]
    result = k8s_tools.run("helm", *args, check=False)
    objects = tuple(k8s_tools.load_all(result.stdout)) if result.returncode == 0 else ()
    return result.returncode, result.stderr, objects


def name_problems(obj: Mapping[str, Any]) -> list[str]:
    """What the API server would refuse in an object's name and labels."""
    name, kind = obj["metadata"]["name"], obj["kind"]
    problems = []
    if len(name) > 253 or not re.match(DNS1123_SUBDOMAIN, name):
        problems.append(f"{kind} {name}: not a DNS-1123 subdomain")
    if kind in DNS_LABEL_KINDS and (len(name) > 63 or not re.match(DNS1123_LABEL, name)):
        problems.append(f"{kind} {name} ({len(name)} characters): not a DNS-1035 label")
    for key, value in (obj["metadata"].get("labels") or {}).items():
        if not re.match(QUALIFIED_NAME, key) or not re.match(LABEL_VALUE, str(value)):
            problems.append(f"{kind} {name}: label {key}={value!r}")
    return problems


LONG_RELEASE = "r" * 53  # Helm's longest release name
LONG_NAMESPACE = "n" * 63


@pytest.mark.parametrize(
    ("release", "namespace", "extra"),
    [
        (LONG_RELEASE, NAMESPACE, ()),
        ("a" * 40, NAMESPACE, ()),  # <release>-finetune-operator is 58 characters
        (RELEASE, NAMESPACE, ("fullnameOverride=" + "f" * 63,)),
        (RELEASE, NAMESPACE, ("nameOverride=" + "o" * 63,)),
        (LONG_RELEASE, LONG_NAMESPACE, ("webhook.certManager.enabled=true",)),
        (LONG_RELEASE, NAMESPACE, ("watchNamespaces={" + "w" * 63 + "}",)),
    ],
    ids=["long-release", "release-40", "long-fullnameOverride", "long-nameOverride", "long-namespace", "namespaced"],
)
def test_long_names_render_names_the_api_server_accepts(release: str, namespace: str, extra: tuple[str, ...]) -> None:
    returncode, stderr, objects = helm(release, namespace, *EVERYTHING, *extra)
    assert returncode == 0, stderr
    assert [problem for obj in objects for problem in name_problems(obj)] == []


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("fullnameOverride=My_Operator", "fullnameOverride"),
        ("fullnameOverride=ops.finetune", "fullnameOverride"),
        ("nameOverride=Finetune", "nameOverride"),
        ("nameOverride=-finetune", "nameOverride"),
    ],
)
def test_name_overrides_that_make_invalid_names_are_refused(override: str, field: str) -> None:
    returncode, stderr, _ = helm(RELEASE, NAMESPACE, override)
    assert returncode != 0, f"--set {override} was accepted"
    assert field in stderr, stderr


# ------------------------------------------------------------------------------------------ pod security
def pods(objects: tuple[dict[str, Any], ...]) -> dict[str, tuple[Mapping[str, Any], Mapping[str, str] | None]]:
    """The operator's pod and the `helm test` pod: (spec, annotations) by kind."""
    found = {}
    for obj in objects:
        if obj["kind"] == "Deployment":
            template = obj["spec"]["template"]
            found["Deployment"] = (template["spec"], template["metadata"].get("annotations"))
        elif obj["kind"] == "Pod":
            found["Pod"] = (obj["spec"], obj["metadata"].get("annotations"))
    return found


APPARMOR = "podAnnotations.container\\.apparmor\\.security\\.beta\\.kubernetes\\.io/operator"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (("securityContext.privileged=true",), "privileged"),
        (("securityContext.allowPrivilegeEscalation=true",), "allowPrivilegeEscalation"),
        (("securityContext.allowPrivilegeEscalation=null",), "allowPrivilegeEscalation"),
        (("securityContext.runAsNonRoot=false",), "runAsNonRoot"),
        (("podSecurityContext.runAsNonRoot=false",), "runAsNonRoot"),
        (("securityContext.runAsNonRoot=null", "podSecurityContext.runAsNonRoot=null"), "runAsNonRoot"),
        (("securityContext.runAsUser=0",), "runAsUser"),
        (("podSecurityContext.runAsUser=0",), "runAsUser"),
        (("securityContext.capabilities.add={NET_ADMIN}",), "add"),
        (("securityContext.capabilities.drop=null",), "drop"),
        (("securityContext.capabilities.drop={NET_RAW}",), "drop"),
        (("securityContext.seccompProfile.type=Unconfined",), "type"),
        (("podSecurityContext.seccompProfile.type=Unconfined",), "type"),
        (("securityContext.seccompProfile=null", "podSecurityContext.seccompProfile=null"), "seccompProfile"),
        (("securityContext.procMount=Unmasked",), "procMount"),
        (("securityContext.seLinuxOptions.type=spc_t",), "type"),
        (("podSecurityContext.seLinuxOptions.user=root",), "user"),
        (("securityContext.appArmorProfile.type=Unconfined",), "type"),
        (("securityContext.windowsOptions.hostProcess=true",), "hostProcess"),
        (("podSecurityContext.sysctls[0].name=kernel.msgmax", "@podSecurityContext.sysctls[0].value=65536"), "name"),
        (("securityContext=null",), "securityContext"),
        ((f"{APPARMOR}=unconfined",), "apparmor"),
    ],
)
def test_security_context_overrides_that_break_the_restricted_profile_are_refused(overrides: tuple[str, ...], field: str) -> None:
    """A platform team's namespace enforcing "restricted" would refuse the pods only after `helm install` had
    succeeded (the ReplicaSet's events): the chart refuses such values itself, naming the field."""
    returncode, stderr, objects = helm(RELEASE, NAMESPACE, *overrides)
    violations = {kind: restricted_violations(*pod) for kind, pod in pods(objects).items()}
    assert returncode != 0, f"--set {' '.join(overrides)} was accepted: {violations}"
    assert field in stderr, stderr


@pytest.mark.parametrize(
    "overrides",
    [
        # OpenShift's restricted-v2 SCC picks the UID, GID and fsGroup from the namespace's range.
        (
            "securityContext.runAsUser=null",
            "securityContext.runAsGroup=null",
            "podSecurityContext.runAsUser=null",
            "podSecurityContext.runAsGroup=null",
            "podSecurityContext.fsGroup=null",
        ),
        ("podSecurityContext=null",),  # the container's context alone meets the profile
        ("securityContext.seccompProfile=null",),  # the pod's seccompProfile covers the container
        ("securityContext.runAsNonRoot=null",),  # so does the pod's runAsNonRoot
        ("securityContext.capabilities.add={NET_BIND_SERVICE}", "securityContext.runAsUser=1001"),
        ("podSecurityContext.sysctls[0].name=net.ipv4.ip_unprivileged_port_start", "@podSecurityContext.sysctls[0].value=0"),
        ("securityContext.seLinuxOptions.type=container_t", "securityContext.appArmorProfile.type=RuntimeDefault"),
        (f"{APPARMOR}=runtime/default",),
    ],
)
def test_security_context_overrides_within_the_restricted_profile_render(overrides: tuple[str, ...]) -> None:
    returncode, stderr, objects = helm(RELEASE, NAMESPACE, *overrides)
    assert returncode == 0, stderr
    found = pods(objects)
    assert set(found) == {"Deployment", "Pod"}
    assert {kind: restricted_violations(*pod) for kind, pod in found.items()} == {"Deployment": [], "Pod": []}


# ------------------------------------------------------------------------------------------ extra labels
@pytest.mark.parametrize(
    ("override", "field"),
    [
        # A key the chart sets itself rendered twice in one mapping (invalid YAML the API server refuses) and, on the
        # pod, would move it out of its Deployment's selector.
        ("podLabels.app\\.kubernetes\\.io/name=operator", "podLabels"),
        ("podLabels.app\\.kubernetes\\.io/instance=prod", "podLabels"),
        ("podLabels.app\\.kubernetes\\.io/component=controller", "podLabels"),
        ("metrics.serviceMonitor.labels.app\\.kubernetes\\.io/part-of=monitoring", "labels"),
        ("grafanaDashboard.labels.app\\.kubernetes\\.io/component=grafana", "labels"),
        # What the API server refuses in a label, refused before anything is installed.
        ("podLabels.team name=a", "podLabels"),
        ("podLabels.team=a b", "podLabels"),
        ("podLabels.team=" + "x" * 64, "podLabels"),
        ("metrics.serviceMonitor.labels.release=kube prometheus", "labels"),
    ],
)
def test_extra_labels_the_api_server_would_refuse_are_refused(override: str, field: str) -> None:
    returncode, stderr, _ = helm(RELEASE, NAMESPACE, *EVERYTHING, override)
    assert returncode != 0, f"--set {override} was accepted"
    assert field in stderr, stderr


def test_dashboard_without_labels_renders() -> None:
    """``grafanaDashboard.labels: null`` (a sidecar selecting by folder annotation) rendered ``null`` into the
    ConfigMap's labels: a YAML parse error."""
    returncode, stderr, objects = helm(RELEASE, NAMESPACE, "grafanaDashboard.enabled=true", "grafanaDashboard.labels=null")
    assert returncode == 0, stderr
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert "grafana_dashboard" not in configmap["metadata"]["labels"]
    assert name_problems(configmap) == []


# ------------------------------------------------------------------------------------ ports, disruptions
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        # The operator's servers would meet 'address already in use' and crash-loop, after a successful install.
        (("metrics.port=8081",), "metrics.port"),  # the image's fixed liveness port
        (("metrics.port=9443",), "metrics.port"),  # the webhook's
        (("webhook.port=8081",), "webhook.port"),
        (("webhook.port=8080",), "webhook.port"),  # the metrics port
        # A budget of 0 blocks every node drain for ever, though one replica is all the operator needs.
        (("podDisruptionBudget.maxUnavailable=0",), "maxUnavailable"),
    ],
)
def test_values_the_operator_cannot_run_with_are_refused(overrides: tuple[str, ...], field: str) -> None:
    returncode, stderr, _ = helm(RELEASE, NAMESPACE, *overrides)
    assert returncode != 0, f"--set {' '.join(overrides)} was accepted"
    assert field in stderr, stderr


# ------------------------------------------------------------------------------------------ scrape timing
MONITOR = "metrics.serviceMonitor"


@pytest.mark.parametrize(
    ("interval", "timeout", "accepted"),
    [
        ("30s", "10s", True),
        ("30s", "30s", True),  # Prometheus refuses only a timeout greater than the interval
        ("1m", "59s", True),
        ("1m30s", "90s", True),
        ("2s", "1500ms", True),
        ("1h", "59m59s", True),
        ("30s", "31s", False),
        ("1m", "1m1s", False),
        ("1m30s", "2m", False),
        ("500ms", "1s", False),
        ("10s", "1h", False),
    ],
)
def test_a_scrape_timeout_longer_than_the_interval_is_refused(interval: str, timeout: str, accepted: bool) -> None:
    """The Prometheus Operator drops such a ServiceMonitor (a log line in its pod), so the operator was never scraped."""
    returncode, stderr, objects = helm(
        RELEASE, NAMESPACE, f"{MONITOR}.enabled=true", f"{MONITOR}.interval={interval}", f"{MONITOR}.scrapeTimeout={timeout}"
    )
    if accepted:
        assert returncode == 0, stderr
        (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
        assert monitor["spec"]["endpoints"][0]["scrapeTimeout"] == timeout
    else:
        assert returncode != 0, f"scrapeTimeout {timeout} with interval {interval} was accepted"
        (line,) = [line for line in stderr.splitlines() if "scrapeTimeout" in line]
        assert f"{MONITOR}.scrapeTimeout: {timeout} is longer than {MONITOR}.interval {interval};" in line


@pytest.mark.parametrize(
    "overrides",
    [("metrics.port=9443", "webhook.enabled=false"), ("metrics.port=9090", "webhook.port=8443")],
)
def test_ports_of_their_own_render(overrides: tuple[str, ...]) -> None:
    returncode, stderr, objects = helm(RELEASE, NAMESPACE, *overrides)
    assert returncode == 0, stderr
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = [port["containerPort"] for port in container["ports"]]
    assert len(ports) == len(set(ports)), ports
