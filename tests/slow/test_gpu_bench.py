"""``bench/gpu_bench.py --smoke``: the GPU benchmark end to end on the CPU (tiny resnet18, two epochs, every
part through its own `--part` command line), so the script a lent GPU machine runs is known to work before one is lent. It
measures nothing; the numbers it prints are not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_gpu_bench_smoke_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--smoke", "--mode", "inprocess", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        # The script puts the checkout's operator/ and trainer/ first on its path itself: no PYTHONPATH needed.
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CPU (smoke test, not a measurement)" in done.stdout
    assert "trainer ÷ plain (bf16 + channels_last):" in done.stdout and "target ≥ 0.95×" in done.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "inprocess"
    # Every side ran both epochs and reported a rate for each.
    assert {side: len(runs[0]["images_per_second"]) for side, runs in result["runs"].items()} == {
        "trainer": 2,
        "channels_last": 2,
        "nchw": 2,
        "synthetic": 2,
    }
    # On the CPU the trainer keeps fp32 and NCHW (autocast and channels_last are CUDA-only choices).
    assert (result["runs"]["trainer"][0]["dtype"], result["runs"]["trainer"][0]["memory_format"]) == (
        "fp32",
        "torch.preserve_format",
    )
