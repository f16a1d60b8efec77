"""The chart's Prometheus Operator ServiceMonitor (``metrics.serviceMonitor.*``): every one it renders is valid against
the Prometheus Operator's own CRD (vendored in tests/data/prometheus-operator-v0.93.0), which kubernetes-validate does
not know. Rendered with the real helm binary (tests/unit/test_chart.py has the variants)."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest

from tests.support import k8s_tools
from tests.support.schemas import REPO, servicemonitor_schema, strict_errors

CHART = REPO / "charts" / "finetune-operator"
RELEASE, NAMESPACE = "ft", "finetune-system"
FULLNAME = f"{RELEASE}-finetune-operator"
MONITOR = "metrics.serviceMonitor"


@cache
def render(*set_values: str) -> tuple[dict[str, Any], ...]:
    return tuple(k8s_tools.helm_template(CHART, release=RELEASE, namespace=NAMESPACE, set_values=set_values))


def monitor_of(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    return monitor


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("metrics.auth=false",),
        (f"{MONITOR}.labels.release=kube-prometheus-stack", f"{MONITOR}.interval=15s"),
    ],
    ids=["token-file", "plain-http", "labels"],
)
def test_the_servicemonitor_is_valid_for_the_prometheus_operator(overrides: tuple[str, ...]) -> None:
    assert strict_errors(monitor_of(render(f"{MONITOR}.enabled=true", *overrides)), servicemonitor_schema()) == []
