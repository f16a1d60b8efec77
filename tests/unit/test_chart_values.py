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
from tests.support.schemas import REPO

CHART = REPO / "charts" / "finetune-operator"
RELEASE, NAMESPACE = "ft", "finetune-system"
# Every optional object on, so that each template's names and labels are checked.
EVERYTHING = (
    "metrics.serviceMonitor.enabled=true",
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
