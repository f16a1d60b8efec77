"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import OperatorSettings
from tests.support.api_server import Api, kubeconfig
from tests.support.fake_kube import Events, FakeKube

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)  # the reconcile tests' clock


@pytest.fixture
def kube() -> FakeKube:
    """The in-memory API the reconcile rules are tested against."""
    return FakeKube()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def rec(kube: FakeKube, events: Events) -> Reconciler:
    """The rules over ``kube`` with default settings, Events kept in ``events``, the clock at ``NOW``."""
    return Reconciler(kube, OperatorSettings(metrics_port=0), emit=events, clock=lambda: NOW)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny model inputs gain nothing from intra-op threads, and on a busy machine their spin-waits made
    the model modules several times slower. Opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    """A hostile API server (``tests.support.api_server``) that ``KUBECONFIG`` points at (never a pod's own)."""
    server = Api()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", server.url)))
    yield server
    server.closing.set()
    server.http.shutdown()
    server.http.server_close()
