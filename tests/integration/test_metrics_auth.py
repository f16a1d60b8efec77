"""/metrics' reviews over real HTTP (``metrics_server.kube_reviews`` on the official client, against the emulator's
TokenReview and SubjectAccessReview): the answers, and the exact permissions they need (the chart's and kustomize's
metrics-auth ClusterRole is held to ``k8s_tools.METRICS_AUTH_RULES``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from finetune_operator.metrics_server import METRICS_PATH, TokenReviewer, kube_reviews
from tests.support.k8s_tools import METRICS_AUTH_RULES
from tests.support.kube_emulator import KubeEmulator

PROMETHEUS = "system:serviceaccount:monitoring:prometheus"


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emulator:
        emulator.add_token("scraper-token", PROMETHEUS, groups=("system:serviceaccounts",))
        emulator.add_token("tenant-token", "system:serviceaccount:team-a:default")
        emulator.allow(PROMETHEUS, METRICS_PATH)
        yield emulator
        assert emulator.internal_errors == []


@pytest.mark.parametrize(("token", "status"), [("scraper-token", 200), ("tenant-token", 403), ("forged", 401)])
def test_the_api_server_decides_who_reads_metrics(emu: KubeEmulator, token: str, status: int) -> None:
    with emu.kubernetes_client() as client:
        assert TokenReviewer(*kube_reviews(client))(token) == status


def test_the_reviews_need_exactly_the_metrics_auth_rules(emu: KubeEmulator) -> None:
    emu.reset_request_counts()
    with emu.kubernetes_client() as client:
        reviewer = TokenReviewer(*kube_reviews(client))
        for token in ("scraper-token", "tenant-token", "forged"):
            reviewer(token)
    used: dict[tuple[str, str], set[str]] = {}
    for (verb, key), count in emu.requests_with_token("kube-emulator").items():
        group, _, plural = key.rpartition("/")
        used.setdefault((group.split("/")[0] if "/" in group else "", plural), set()).add(verb)
        assert count > 0
    assert {k: frozenset(v) for k, v in used.items()} == METRICS_AUTH_RULES
