"""Fixtures shared by the integration tier: the Kubernetes API emulator over HTTP, one per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.kube_emulator import KubeEmulator


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    """A fresh emulator; a test fails if the emulator itself raised while serving it."""
    with KubeEmulator() as emulator:
        yield emulator
        assert emulator.internal_errors == []
