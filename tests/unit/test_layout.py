"""Guards the repository layout: `operator/` must never become a package shadowing the stdlib."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.schemas import REPO


@pytest.mark.parametrize("folder", ["operator", "trainer"])
def test_top_level_folders_are_not_packages(folder: str) -> None:
    assert not (REPO / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow the standard library"


def test_import_operator_is_the_stdlib_from_repo_root() -> None:
    code = "import operator, sys; assert operator.add(2, 3) == 5, operator.__file__; print(operator.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "site-packages" not in out.stdout and "/operator/" not in out.stdout.replace("operator.py", "")


def test_packages_import_from_repo_root() -> None:
    code = "import finetune_operator, finetune_trainer; print(finetune_operator.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "operator/finetune_operator/__init__.py" in out.stdout
