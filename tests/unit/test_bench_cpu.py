"""The cold-start row's CPU figure (bench/trainer_bench.py): the CPU of a process tree read from /proc, and the
value of the sampled series at the first step."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trainer_bench", REPO / "bench" / "trainer_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


BURN = (
    "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n"
    "print('done', flush=True)\ntime.sleep(30)"
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_cpu_of_a_tree_counts_its_descendants_and_nothing_else() -> None:
    bench = _bench()
    # A child that burns 0.4 s of CPU under a parent that only waits, and an unrelated process that burns as much.
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BURN!r}])"])
    other = subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline() == "done\n"
        deadline = time.time() + 30
        while (tree := bench.tree_cpu_seconds([parent.pid])) < 0.4 and time.time() < deadline:
            time.sleep(0.05)
        assert 0.4 <= tree < 0.4 + 1.0  # the child's burn and two interpreter starts, not the other process's burn
        assert bench.tree_cpu_seconds([parent.pid, other.pid]) >= tree + 0.4
        assert bench.tree_cpu_seconds([]) == 0.0
        assert bench.tree_cpu_seconds([os.getpid()]) >= tree  # this process is above both
    finally:
        for p in (parent, other):
            p.kill()
            p.wait()


@pytest.mark.parametrize(
    ("samples", "at", "expected"),
    [
        ([(0.0, 0.0), (1.0, 2.0), (2.0, 3.0)], 0.5, 1.0),
        ([(0.0, 0.0), (1.0, 2.0), (2.0, 3.0)], 1.0, 2.0),
        ([(0.0, 0.0), (1.0, 2.0), (2.0, 3.0)], 1.75, 2.75),
        ([(0.0, 0.0), (1.0, 2.0)], 1.5, None),  # after the last sample: unknown, not extrapolated
        ([(0.0, 0.0), (1.0, 2.0)], -0.1, None),
        ([(0.0, 0.0)], 0.0, None),
        ([(1.0, 2.0), (1.0, 2.0)], 1.0, 2.0),
    ],
)
def test_the_cpu_at_the_first_step_is_interpolated_between_samples(
    samples: list[tuple[float, float]], at: float, expected: float | None
) -> None:
    got = _bench().interpolate(samples, at)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["ray::TrainController.run"], "ray::TrainController"),
        (["ray::RayTrainWorker.__init__ extra"], "ray::RayTrainWorker"),
        (["ray::IDLE"], "ray::IDLE"),
        (["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--node_ip_address=1"], "raylet"),
        (["/usr/bin/python3.11", "-u", "/venv/site-packages/ray/dashboard/agent.py", "--head"], "agent.py"),
        (["/venv/bin/python", "/venv/bin/finetune", "run", "job.yaml"], "finetune"),
        (["/venv/bin/python", "-c", "import sys, time, ray\nray.init()"], "python -c"),
        (["/venv/bin/python", "-u", "-m", "finetune_operator.cli", "run"], "finetune_operator.cli"),
        (["/venv/bin/python"], "python"),
        ([], "?"),
    ],
)
def test_each_process_of_a_run_is_named_by_its_kind(argv: list[str], kind: str) -> None:
    assert _bench().kind_of(argv) == kind
