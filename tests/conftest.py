"""Test tiers: unit (default), `integration` (emulator, Kopf), `slow` (starts Ray or trains), `e2e` (a real cluster)."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kube-config",
        default=os.environ.get("FINETUNE_E2E_KUBECONFIG"),
        help="kubeconfig of a disposable kind cluster (context kind-*) for the e2e tier",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The tier follows the folder, so that `make unit` can never run an emulator or Kopf test by accident.
    for item in items:
        if item.path.parent.name == "integration":
            item.add_marker(pytest.mark.integration)
    if config.getoption("--kube-config"):
        return
    skip = pytest.mark.skip(reason="e2e: needs a real cluster, pass --kube-config (see tests/e2e/README.md)")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)
