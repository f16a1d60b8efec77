"""Fixtures shared by the integration tier: the Kubernetes API emulator over HTTP, one per test, and the operator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from finetune_operator import metrics
from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import KubeEmulator
from tests.support.operator_threads import start_operator, stop_operator


@pytest.fixture(autouse=True)
def fresh_job_metrics() -> None:
    """Each test starts with the metrics of a freshly started operator: no jobs, counting. The leader-election tests
    run replicas as threads of this process, and a replica that steps down stops the process-wide counting, which
    left the next test on that pytest-xdist worker exporting no job at all."""
    metrics.step_down()
    metrics.take_over()


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
