"""Operator benchmark: N FineTuneJobs applied at once against the API emulator, the real Kopf operator reconciling.

This script owns the operator's numbers in ``bench/README.md`` (section "Operator"). It is not a test
(the test tier never runs it) and asserts nothing about speed; it measures and prints:

- **jobs/s reconciled**: N / (time from the first create to the moment the last job is *reconciled*),
  where a job is reconciled once its RayJob exists AND its status says ``phase: Provisioning`` with
  ``rayJobName`` (the create handler's whole work: validate, five children, status);
- **create → RayJob created**, p50/p95/max over the jobs (queueing included: all jobs arrive at once
  unless ``--rate`` paces them);
- **API requests per job**: the emulator's count of HTTP requests by verb (and by resource with
  ``--by-resource``) from just before the first create until the system is quiet (no write for 2 s),
  divided by N. Open watch streams count once each. Jobs are created directly in the emulator's store,
  as ``kubectl apply`` would from outside, so every counted request is the operator's;
- **peak RSS**: ``--operator inprocess`` (default) runs Kopf in a thread of this process, so the figure is
  this process's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` — emulator, operator and harness
  together — next to the RSS before the operator started (``VmRSS`` from ``/proc/self/status``).
  ``--operator subprocess`` runs ``python -m finetune_operator.handlers`` (the container's command,
  credentials from ``KUBECONFIG``) and reports that process's own peak, ``VmHWM`` from
  ``/proc/<pid>/status``, and its CPU time: the operator alone, as a pod would see it.

Timestamps come from an emulator listener called on every committed change (``time.perf_counter``),
so they are the API server's view, not the client's. The emulator runs with ``mirror_objects=False``
and a bounded kmock request log (see ``bound_request_log``: unbounded, routing is quadratic).

Run from the repository root: ``.venv/bin/python bench/operator_bench.py [--jobs 1000] [--operator subprocess]``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import logging
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.support lives in the repository, not in the installed packages

from tests.support.kube_emulator import KubeEmulator, ResourceSpec  # noqa: E402

QUIET_SECONDS = 2.0
REQUEST_LOG = 256
EXAMPLE = REPO / "manifests" / "examples" / "digits-cpu.yaml"


@dataclass
class Recorder:
    """An emulator listener: when each job was created, got its RayJob, and was reported Provisioning."""

    created: dict[tuple[str, str], float] = field(default_factory=dict)
    rayjob: dict[tuple[str, str], float] = field(default_factory=dict)
    provisioning: dict[tuple[str, str], float] = field(default_factory=dict)
    reconciled: dict[tuple[str, str], float] = field(default_factory=dict)
    last_write: float = 0.0

    def __call__(self, spec: ResourceSpec, event_type: str, obj: Mapping[str, Any]) -> None:
        # Called under the store's lock on every commit: keep it to a few dict operations.
        now = time.perf_counter()
        self.last_write = now
        meta = obj["metadata"]
        if spec.kind == "FineTuneJob":
            key = (meta["namespace"], meta["name"])
            if event_type == "ADDED":
                self.created.setdefault(key, now)
            status = obj.get("status") or {}
            if status.get("phase") == "Provisioning" and status.get("rayJobName") and key not in self.provisioning:
                self.provisioning[key] = now
                self._maybe_reconciled(key, now)
        elif spec.kind == "RayJob" and event_type == "ADDED":
            owner = next((r["name"] for r in meta.get("ownerReferences") or [] if r.get("kind") == "FineTuneJob"), None)
            if owner is not None:
                key = (meta["namespace"], owner)
                self.rayjob.setdefault(key, now)
                self._maybe_reconciled(key, now)

    def _maybe_reconciled(self, key: tuple[str, str], now: float) -> None:
        if key in self.rayjob and key in self.provisioning:
            self.reconciled.setdefault(key, now)


def job_body(index: int, namespaces: list[str], template: Mapping[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(dict(template))
    body["metadata"] = {"name": f"bench-{index:05d}", "namespace": namespaces[index % len(namespaces)]}
    return body


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def proc_status(pid: int | str, field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmRSS, VmHWM) in KiB; None where /proc is absent."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from ``/proc/<pid>/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bound_request_log(emu: KubeEmulator, keep: int = REQUEST_LOG) -> None:
    """Keep only kmock's newest ``keep`` requests.

    kmock 0.8 records every request and routes each new one by scanning that whole log through every
    reaction's filter (``request in payload._source`` in ``kmock/_internal/apps.py``), so serving costs
    O(requests so far): after ~10,000 requests each one took ~125 ms and the operator crawled at 8
    requests/s. A request is routed right after it is appended, so a short log routes the same way.
    The emulator's own per-verb counters are separate and unaffected.
    """
    root: Any = emu.kmock
    if not isinstance(getattr(root, "_requests", None), list):
        raise RuntimeError("kmock's request log is not where kmock 0.8 keeps it; revisit bound_request_log()")
    root._requests = collections.deque(root._requests, maxlen=keep)


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_quiet(recorder: Recorder, quiet: float, timeout: float) -> bool:
    """Poll until nothing was written for ``quiet`` seconds (the operator has caught up with its own patches)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if time.perf_counter() - recorder.last_write >= quiet:
            return True
        time.sleep(0.1)
    return False


class InProcessOperator:
    """Kopf with our handlers in a thread of this process (tests/support/kopf_runner.py), configured as in production."""

    def __init__(self, emu: KubeEmulator, log_path: Path) -> None:
        import kopf

        import finetune_operator.handlers  # noqa: F401  (registers the handlers in Kopf's default registry)
        from finetune_operator.settings import OperatorSettings
        from tests.support.kopf_runner import KopfRunner

        # As `python -m finetune_operator.handlers` logs (INFO), but to a file.
        logging.basicConfig(filename=log_path, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # The emulator's aiohttp access log (one line per request) is not the operator's to pay for.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        # The startup handler builds its client from KUBECONFIG, as the container does.
        memo = kopf.Memo(settings=OperatorSettings(metrics_port=0))
        # Stopping 1,000 per-object workers and timers takes Kopf a while.
        self.runner = KopfRunner(emu, memo=memo, startup_timeout=60, stop_timeout=180)

    def start(self) -> None:
        self.runner.start()

    def stop(self) -> None:
        self.runner.stop()

    def peak_rss_kib(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def cpu_seconds(self) -> float | None:
        return None  # shared with the emulator: not separable


class SubprocessOperator:
    """``python -m finetune_operator.handlers``, the container's command, against the emulator."""

    def __init__(self, emu: KubeEmulator, log_path: Path) -> None:
        self.emu = emu
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "FINETUNE_OPERATOR_METRICS_PORT": "0", "FINETUNE_OPERATOR_LOG_LEVEL": "INFO"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        cmd = [sys.executable, "-m", "finetune_operator.handlers", f"--liveness=http://127.0.0.1:{free_port()}/healthz"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.emu.wait_until(
            lambda: self.emu.watch_count("finetunejobs") >= 1 and self.emu.watch_count("rayjobs") >= 1,
            timeout=60,
            message="the operator watching FineTuneJobs and RayJobs",
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)

    def peak_rss_kib(self) -> int | None:
        return None if self.proc is None else proc_status(self.proc.pid, "VmHWM")

    def cpu_seconds(self) -> float | None:
        return None if self.proc is None else proc_cpu_seconds(self.proc.pid)


def run(args: argparse.Namespace) -> dict[str, Any]:
    namespaces = [f"bench-{i}" for i in range(args.namespaces)]
    template = yaml.safe_load(EXAMPLE.read_text())
    recorder = Recorder()
    workdir = Path(tempfile.mkdtemp(prefix="operator-bench-"))
    with KubeEmulator(namespaces=("default", *namespaces), mirror_objects=False) as emu:
        emu.store.add_listener(recorder)
        bound_request_log(emu)
        os.environ["KUBECONFIG"] = str(emu.write_kubeconfig(workdir / "kubeconfig"))
        rss_before = proc_status("self", "VmRSS")
        operator: InProcessOperator | SubprocessOperator
        make: Callable[[KubeEmulator, Path], InProcessOperator | SubprocessOperator] = (
            InProcessOperator if args.operator == "inprocess" else SubprocessOperator
        )
        operator = make(emu, workdir / "operator.log")
        operator.start()
        try:
            cpu_start = operator.cpu_seconds()
            self_start = self_cpu_seconds()
            emu.reset_request_counts()
            bodies = [job_body(i, namespaces, template) for i in range(args.jobs)]
            start = time.perf_counter()
            for i, body in enumerate(bodies):
                if args.rate > 0:
                    # Pacing, not synchronisation: the i-th job is due at start + i/rate.
                    delay = start + i / args.rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                emu.create(body)
            applied = time.perf_counter() - start
            emu.wait_until(
                lambda: len(recorder.reconciled) >= args.jobs,
                timeout=args.timeout,
                message=f"{args.jobs} jobs reconciled (see {workdir / 'operator.log'})",
            )
            done = time.perf_counter()
            counts_reconciled = emu.request_counts()
            settled = wait_quiet(recorder, QUIET_SECONDS, timeout=args.timeout)
            counts = emu.request_counts()
            by_resource = Counter({f"{verb} {res}": n for (verb, res), n in emu.kmock.request_counts().items()})
            peak = operator.peak_rss_kib()
            cpu_end = operator.cpu_seconds()
            self_cpu = self_cpu_seconds() - self_start
            phases = Counter((o.get("status") or {}).get("phase") for o in emu.list("finetunejobs"))
            errors = list(emu.internal_errors)
        finally:
            try:
                operator.stop()
            except RuntimeError as exc:  # the numbers are taken; a slow shutdown must not lose them
                print(f"warning: {exc}", file=sys.stderr)
    latencies = [recorder.rayjob[k] - recorder.created[k] for k in recorder.created if k in recorder.rayjob]
    reconcile = [recorder.reconciled[k] - recorder.created[k] for k in recorder.created if k in recorder.reconciled]
    return {
        "jobs": args.jobs,
        "namespaces": args.namespaces,
        "operator": args.operator,
        "rate": args.rate,
        "apply_seconds": applied,
        "wall_seconds": done - start,
        "jobs_per_second": args.jobs / (done - start),
        "rayjob_p50": statistics.median(latencies),
        "rayjob_p95": percentile(latencies, 0.95),
        "rayjob_max": max(latencies),
        "reconciled_p50": statistics.median(reconcile),
        "reconciled_p95": percentile(reconcile, 0.95),
        "requests_per_job_reconciled": sum(counts_reconciled.values()) / args.jobs,
        "requests_per_job": sum(counts.values()) / args.jobs,
        "requests_by_verb": dict(counts),
        "requests_by_resource": dict(by_resource),
        "settled": settled,
        "peak_rss_mib": None if peak is None else peak / 1024,
        "rss_before_operator_mib": None if rss_before is None else rss_before / 1024,
        "operator_cpu_seconds": None if cpu_start is None or cpu_end is None else cpu_end - cpu_start,
        "bench_process_cpu_seconds": self_cpu,
        "phases": dict(phases),
        "emulator_errors": len(errors),
        "log": str(workdir / "operator.log"),
    }


def print_table(r: dict[str, Any], *, by_resource: bool) -> None:
    n = r["jobs"]
    mode = "in-process (Kopf thread)" if r["operator"] == "inprocess" else "subprocess (python -m finetune_operator.handlers)"
    rss_label = "peak RSS, whole process (ru_maxrss)" if r["operator"] == "inprocess" else "operator peak RSS (VmHWM)"
    rows: list[tuple[str, str]] = [
        ("jobs / namespaces", f"{n} / {r['namespaces']}"),
        ("operator", mode),
        ("arrival", "all at once" if not r["rate"] else f"{r['rate']:g} jobs/s"),
        (
            "jobs/s reconciled",
            f"{r['jobs_per_second']:.1f}  ({r['wall_seconds']:.1f} s for all; creates took {r['apply_seconds']:.1f} s)",
        ),
        ("create → RayJob created p50", f"{r['rayjob_p50']:.2f} s"),
        ("create → RayJob created p95", f"{r['rayjob_p95']:.2f} s  (max {r['rayjob_max']:.2f} s)"),
        ("create → Provisioning p50/p95", f"{r['reconciled_p50']:.2f} s / {r['reconciled_p95']:.2f} s"),
        ("API requests per job", f"{r['requests_per_job']:.1f}  ({r['requests_per_job_reconciled']:.1f} until all reconciled)"),
    ]
    for verb, count in sorted(r["requests_by_verb"].items(), key=lambda item: -item[1]):
        rows.append((f"  {verb}", f"{count / n:.2f}"))
    if r["peak_rss_mib"] is not None:
        rows.append((rss_label, f"{r['peak_rss_mib']:.0f} MiB"))
    if r["operator"] == "inprocess" and r["rss_before_operator_mib"] is not None:
        rows.append(("  RSS before the operator started", f"{r['rss_before_operator_mib']:.0f} MiB"))
    if r["operator_cpu_seconds"] is not None:
        rows.append(
            ("operator CPU time", f"{r['operator_cpu_seconds']:.1f} s  ({1000 * r['operator_cpu_seconds'] / n:.1f} ms per job)")
        )
    own = "emulator + operator + harness" if r["operator"] == "inprocess" else "emulator + harness"
    rows.append((f"CPU time of this process ({own})", f"{r['bench_process_cpu_seconds']:.1f} s"))
    rows.append(("final phases", ", ".join(f"{k}: {v}" for k, v in sorted(r["phases"].items(), key=str))))
    if not r["settled"] or r["emulator_errors"]:
        rows.append(("WARNING", f"settled={r['settled']}, emulator errors={r['emulator_errors']}"))
    if by_resource:
        for key, count in sorted(r["requests_by_resource"].items(), key=lambda item: -item[1]):
            rows.append((f"  {key}", f"{count / n:.2f}"))
    width = max(len(label) for label, _ in rows)
    print(f"| {'metric':<{width}} | value")
    print(f"|{'-' * (width + 2)}|{'-' * 40}")
    for label, value in rows:
        print(f"| {label:<{width}} | {value}")
    print(f"operator log: {r['log']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=1000, help="FineTuneJobs to apply (default 1000)")
    parser.add_argument("--namespaces", type=int, default=4, help="namespaces the jobs are spread over (default 4)")
    parser.add_argument("--operator", choices=("inprocess", "subprocess"), default="inprocess", help="where Kopf runs")
    parser.add_argument("--rate", type=float, default=0.0, help="jobs per second to apply (default 0: all at once)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for reconciliation (default 1800)")
    parser.add_argument("--by-resource", action="store_true", help="also break API requests down by resource")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.namespaces < 1:
        parser.error("--jobs and --namespaces must be at least 1")
    result = run(args)
    print_table(result, by_resource=args.by_resource)
    return 0


if __name__ == "__main__":
    sys.exit(main())
