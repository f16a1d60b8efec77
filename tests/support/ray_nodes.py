"""What each node of a ``ray.cluster_utils.Cluster`` ran, seen from the operating system rather than from Ray's
state API (the dashboard it needs is not installed): a Ray worker is a child process of its node's raylet, and
Ray titles it after the task or actor method it is running (``ray::MapBatches(...)``, ``ray::RayTrainWorker...``).
Sampled: a task shorter than the interval may be missed, so assert that a title was seen where it should be and
never seen where it must not be. Linux only (``/proc``)."""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from ray import ray_constants
from ray.cluster_utils import Cluster

__all__ = ["NodeTitles"]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:  # the thread or process has gone
            continue
    return found


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


def _raylet_pid(node: Any) -> int | None:
    processes = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET) or []
    return processes[0].process.pid if processes else None


class NodeTitles:
    """A thread that records, per node id, the ``ray::`` titles of its raylet's descendants until ``stop``."""

    def __init__(self, cluster: Cluster, interval: float = 0.05) -> None:
        self.cluster = cluster
        self.interval = interval
        self.seen: dict[str, set[str]] = defaultdict(set)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NodeTitles:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for node in list(self.cluster.worker_nodes):  # a copy: the test adds and removes nodes meanwhile
                raylet = _raylet_pid(node)
                if raylet is None:
                    continue
                pending = _children(raylet)
                while pending:
                    pid = pending.pop()
                    title = _title(pid)
                    if title.startswith("ray::"):
                        self.seen[node.node_id].add(title)
                    pending.extend(_children(pid))

    def ran(self, node_id: str, fragment: str) -> bool:
        """Whether a process titled with ``fragment`` was seen under ``node_id``."""
        return any(fragment in title for title in self.seen.get(node_id, ()))
