"""scripts/test.sh runs both test phases whatever the first gives and exits with the worse status: run
on a copy of the script beside a fake set-up, a fake lint and a fake `python` (the script puts .venv/bin
first on PATH) that records each pytest call and fails the phases the table says."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Exits with $PHASE1 for the unit/integration call, $PHASE2 for the slow/e2e one; logs every pytest call.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-c" ]; then echo 2; exit 0; fi
echo "$*" >> "$CALLS"
case "$*" in
  *tests/unit*) exit "$PHASE1" ;;
  *tests/slow*) exit "$PHASE2" ;;
esac
"""


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize(
    ("phase1", "phase2", "expected"),
    [
        (0, 0, 0),
        (1, 0, 1),  # phase 1 failed: phase 2 still runs, the script fails
        (0, 1, 1),
        (1, 2, 2),  # the worse of the two
        (3, 1, 3),
    ],
)
def test_both_phases_run_and_the_worse_status_wins(tmp_path: Path, phase1: int, phase2: int, expected: int) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "test.sh", tmp_path / "scripts" / "test.sh")
    for name in ("setup.sh", "lint.sh"):
        _executable(tmp_path / "scripts" / name, "#!/usr/bin/env bash\nexit 0\n")
    _executable(tmp_path / ".venv" / "bin" / "python", FAKE_PYTHON)
    calls = tmp_path / "calls.log"
    env = {**os.environ, "CALLS": str(calls), "PHASE1": str(phase1), "PHASE2": str(phase2)}

    out = subprocess.run(["bash", str(tmp_path / "scripts" / "test.sh")], env=env, capture_output=True, text=True, check=False)

    assert out.returncode == expected, out.stdout + out.stderr
    ran = calls.read_text().splitlines()
    assert [line.split()[2] for line in ran] == ["tests/unit", "tests/slow"], ran
