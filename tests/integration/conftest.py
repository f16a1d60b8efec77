"""Fixtures shared by the integration tier: the Kubernetes API emulator over HTTP, one per test, and the operator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import KubeEmulator
from tests.support.operator_threads import start_operator, stop_operator


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    """A fresh emulator; a test fails if the emulator itself raised while serving it."""
    with KubeEmulator() as emulator:
        yield emulator
        assert emulator.internal_errors == []


@pytest.fixture
def operator(emu: KubeEmulator) -> Iterator[KopfRunner]:
    """The operator's handlers in Kopf (``kopf run --standalone``), started against ``emu``; stopped once it settled."""
    runner = start_operator(emu)
    try:
        yield runner
    finally:
        stop_operator(emu, runner)
