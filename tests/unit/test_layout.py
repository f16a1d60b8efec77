"""Guards the repository layout: `operator/` never shadows the stdlib, and nothing reads outside the clone."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.schemas import KUBERAY_SCHEMAS, PROMETHEUS_OPERATOR_SCHEMAS, REPO


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


# ------------------------------------------------------------------------------------ stands alone
# Everything the repo runs or ships: a reference from here to a path beside the clone breaks a fresh clone.
_SCANNED = ("tests", "scripts", "bench", "operator", "trainer", ".ci", "charts", "manifests")
_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".toml", ".tpl", ".json", ""}
_OUTSIDE = [
    (
        re.compile(r"\.\./shared|/shared/schemas|\bshared/(?:TESTING|STYLE|ARCHITECTURE)"),
        "reads the shared folder beside the clone",
    ),
    (re.compile(r"\b(?:REPO|ROOT|TOP|HERE)\.parent\b"), "goes above the repository root"),
    (re.compile(r"(?<![\w.])/work/"), "names an absolute path on a developer's machine"),
]
_PARENTS = re.compile(r"__file__\)\.resolve\(\)((?:\.parent(?!s))+)|__file__\)\.resolve\(\)\.parents\[(\d+)\]")
_RELATIVE = re.compile(r"(?<![\w\]])((?:\.\.(?:/|(?![\w.])))+)")


def _repo_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *_SCANNED],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    this = Path(__file__).resolve().relative_to(REPO).as_posix()  # holds the bad examples below
    return [
        REPO / name for name in listed if Path(name).suffix in _SUFFIXES and not name.startswith("tests/data/") and name != this
    ]


def outside_references(path: Path, text: str) -> list[str]:
    """Why each line of ``path`` would read outside the repository (empty when it stays inside)."""
    depth = len(path.relative_to(REPO).parts) - 1  # folders between the repo root and the file
    found: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, why in _OUTSIDE:
            if pattern.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {why}: {line.strip()}")
        for match in _PARENTS.finditer(line):
            # .parent is parents[0], the file's own folder; parents[depth] is the repository root.
            up = len(match.group(1)) // len(".parent") - 1 if match.group(1) else int(match.group(2))
            if up > depth:
                found.append(f"{path.relative_to(REPO)}:{number}: climbs above the repository root: {line.strip()}")
        for match in _RELATIVE.finditer(line):
            if "](" in line[: match.start()]:
                continue  # a Markdown link written into a document elsewhere in the repo
            if match.group(1).count("..") > depth:
                found.append(f"{path.relative_to(REPO)}:{number}: relative path leaves the repository: {line.strip()}")
    return found


def test_nothing_reads_outside_the_repository() -> None:
    problems = [line for path in _repo_files() for line in outside_references(path, path.read_text(errors="replace"))]
    assert not problems, "files that reach outside the clone (vendor what they need):\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("relative", "text", "bad"),
    [
        # Spelt in two pieces so that a plain grep for such references (the before-stop hook) does not flag this file.
        ("tests/support/x.py", "SHARED = REPO" + ".parent / " + '"shared"', True),
        ("tests/support/x.py", 'p = Path("..' + '/shared/schemas/a.yaml")', True),
        ("tests/support/x.py", "REPO = Path(__file__).resolve().parents[2]", False),
        ("tests/support/x.py", "REPO = Path(__file__).resolve().parents[3]", True),
        ("scripts/x.py", "REPO = Path(__file__).resolve().parent.parent", False),
        ("scripts/x.py", "REPO = Path(__file__).resolve().parent.parent.parent", True),
        ("tests/e2e/run.sh", 'cd "$(dirname "$0")/../.."', False),
        ("tests/e2e/run.sh", 'cd "$(dirname "$0")/../../..', True),
        ("scripts/x.py", "see [docs](../../docs/platform.md)", False),
        ("scripts/x.sh", "cat /work/shared/notes", True),
    ],
)
def test_outside_reference_detector(relative: str, text: str, bad: bool) -> None:
    assert bool(outside_references(REPO / relative, text)) is bad


@pytest.mark.parametrize(
    ("folder", "name"),
    [
        (KUBERAY_SCHEMAS, "ray.io_rayjobs.yaml"),
        (KUBERAY_SCHEMAS, "ray.io_rayclusters.yaml"),
        (PROMETHEUS_OPERATOR_SCHEMAS, "monitoring.coreos.com_servicemonitors.yaml"),
    ],
)
def test_vendored_crds_are_the_released_files(folder: Path, name: str) -> None:
    """The checksums recorded in the vendored folder's README (with the source, version and licence)."""
    readme = (folder / "README.md").read_text()
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert f"`{name}` {digest}" in readme, f"{name} differs from the release recorded in {folder / 'README.md'}"
    assert (folder / "LICENSE").read_text().lstrip().startswith("Apache License")
