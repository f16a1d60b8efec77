"""Two operator replicas under leader election against one emulator; the active one stopped in the middle of a burst.

Each test asserts the end state: exactly one RayJob per job, owned by its job, every job Provisioning with its
Validated condition; the standby did nothing but read the Lease while the leader lived (each replica's requests
carry a token of its own); and no request storm once everything settled. Short durations (``TIMING``) keep the
take-over after a SIGKILL, which cannot release the Lease, to a few seconds.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

import finetune_operator.handlers  # noqa: F401  (importing it registers the operator's handlers with Kopf)
from finetune_operator import naming
from finetune_operator.failures import ApiFailure, Retry
from finetune_operator.k8s import Kube
from finetune_operator.leadership import Fenced, LeaderElector, Timing
from tests.integration.test_operator import condition, job, status_of
from tests.support.kube_emulator import KubeEmulator, wait_for
from tests.support.operator_threads import SETTINGS, Replica, settle
from tests.support.schemas import REPO

pytestmark = pytest.mark.timeout(360)

NS, JOBS = "default", 20
# Shorter than the defaults (15/10/2) to keep a SIGKILL's take-over short, yet roomy: on a loaded CI machine a renewal
# can stall for seconds, and a leader that misses its deadline steps down (correctly, but the test then takes longer).
TIMING = {"lease_duration_seconds": 20.0, "renew_deadline_seconds": 15.0, "retry_period_seconds": 2.0}
HA = SETTINGS.replace(leader_election=True, leader_election_namespace=NS, **TIMING)
LEASES = "coordination.k8s.io/v1/leases"
JOB_KINDS = ("finetunejobs", "rayjobs", "serviceaccounts", "roles", "rolebindings", "configmaps", "networkpolicies", "events")
WRITES = {"create", "update", "patch", "delete", "deletecollection"}


def provisioned(emu: KubeEmulator, count: int) -> bool:
    jobs = emu.list("finetunejobs", NS)
    return len(jobs) == count and all("rayJobName" in (j.get("status") or {}) for j in jobs)


def wait_provisioned(emu: KubeEmulator, count: int) -> None:
    try:
        wait_for(lambda: provisioned(emu, count), 150, message=f"{count} jobs provisioned")
    except TimeoutError as exc:
        # What Kopf noted on each job left behind (its progress annotations): a deferred handler, and why.
        behind = {
            j["metadata"]["name"]: (j.get("status"), j["metadata"].get("annotations"))
            for j in emu.list("finetunejobs", NS)
            if "rayJobName" not in (j.get("status") or {})
        }
        raise AssertionError(f"{exc}; Lease: {emu.find('leases', NS, 'finetune-operator')}; behind: {behind}") from exc


def assert_end_state(emu: KubeEmulator, count: int) -> None:
    """Exactly one RayJob per job, controlled by it; a phase and a condition that say what happened."""
    rayjobs = emu.list("rayjobs", NS)
    owners = Counter(ref["uid"] for r in rayjobs for ref in r["metadata"]["ownerReferences"] if ref.get("controller"))
    jobs = emu.list("finetunejobs", NS)
    assert len(jobs) == count and len(rayjobs) == count
    for found in jobs:
        uid, name = found["metadata"]["uid"], found["metadata"]["name"]
        assert owners[uid] == 1, name
        assert emu.get("rayjobs", NS, naming.rayjob_name(name))["metadata"]["labels"]["finetune.dev/job-uid"] == uid
        status = status_of(emu, name)
        assert status["phase"] == "Provisioning", (name, status)
        assert condition(status, "Validated")["status"] == "True", name


def requests_but_leases(emu: KubeEmulator, seconds: float) -> Counter[tuple[str, str]]:
    """Requests other than watches and Lease renewals in the next ``seconds``: a settled operator makes none."""
    before = emu.kmock.request_counts()
    time.sleep(seconds)
    made = emu.kmock.request_counts() - before
    return Counter({(verb, key): n for (verb, key), n in made.items() if verb != "watch" and key != LEASES})


def quiet_soon(emu: KubeEmulator) -> None:
    """No request storm: the operator falls quiet (handlers that the old leader's fencing deferred by a second run
    once more on the new one, reading and finding everything done); and each RayJob was POSTed once, or twice when
    the old leader's create landed but not its status patch (the new one's POST gets 409 and adopts the RayJob)."""
    made: list[Counter[tuple[str, str]]] = []
    wait_for(lambda: not made.append(requests_but_leases(emu, 1.0)) and not made[-1], 30, message=f"quiet (last: {made[-1:]})")
    assert emu.request_counts("rayjobs")["create"] <= 2 * JOBS


def writes(counts: Counter[tuple[str, str]]) -> dict[tuple[str, str], int]:
    return {(verb, key): n for (verb, key), n in counts.items() if verb in WRITES and key != LEASES}


def only_read_the_lease(counts: Counter[tuple[str, str]]) -> bool:
    """A standby's requests: reads of the Lease, and API discovery; nothing written, nothing watched."""
    return all((verb == "get" and key == LEASES) or verb == "discovery" for verb, key in counts)


def test_the_standby_takes_over_when_the_leader_stops_mid_burst(emu: KubeEmulator) -> None:
    first = Replica(emu, "replica-a", HA).start()
    wait_for(lambda: first.kopf_running and emu.watch_count("finetunejobs") >= 1, 15, message="a leads")
    second = Replica(emu, "replica-b", HA).start()
    try:
        wait_for(lambda: emu.requests_with_token("replica-b")["get", LEASES] >= 2, 10, message="b campaigns")
        for i in range(JOBS // 2):
            emu.create(job(f"burst-{i}"))
        wait_for(lambda: len(emu.list("rayjobs", NS)) >= 3, 15, message="a few RayJobs")
        standby_before = emu.requests_with_token("replica-b")
        first_when_second_leads: list[Counter[tuple[str, str]]] = []
        second.on_lead.append(lambda: first_when_second_leads.append(emu.requests_with_token("replica-a")))
        first.stop()  # SIGTERM: steps down, Kopf stops, the Lease is released
        for i in range(JOBS // 2, JOBS):
            emu.create(job(f"burst-{i}"))
        wait_provisioned(emu, JOBS)
        settle(emu)
        assert_end_state(emu, JOBS)
        assert only_read_the_lease(standby_before), standby_before
        # Never both at once: the first wrote nothing (but the release of its Lease) once the second began.
        assert writes(emu.requests_with_token("replica-a")) == writes(first_when_second_leads[0])
        assert len(first.terms) == 1 and holder(emu) == "replica-b"
        quiet_soon(emu)
        assert first.kopf_failures == second.kopf_failures == []
    finally:
        settle(emu)
        second.stop()
        first.stop()


def _replica_process(emu: KubeEmulator, identity: str, tmp_path: Path) -> subprocess.Popen[str]:
    """``python -m finetune_operator.handlers`` as the chart runs it (leader election on), with a token of its own."""
    config = yaml.safe_load(emu.write_kubeconfig(tmp_path / f"{identity}.kubeconfig").read_text())
    config["users"][0]["user"]["token"] = identity
    kubeconfig = tmp_path / f"{identity}.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    env: dict[str, Any] = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "FINETUNE_OPERATOR_METRICS_PORT": "0",
        "FINETUNE_OPERATOR_WEBHOOK_PORT": "0",
        "FINETUNE_OPERATOR_LEADER_ELECTION": "true",
        "FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE": NS,
        "FINETUNE_OPERATOR_LEADER_ELECTION_IDENTITY": identity,
        **{f"FINETUNE_OPERATOR_{key.upper()}": str(value) for key, value in TIMING.items()},
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)
    cmd = [sys.executable, "-m", "finetune_operator.handlers", "--liveness=", f"--namespace={NS}"]  # the chart's way
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def served_the_webhook_only(counts: Counter[tuple[str, str]]) -> bool:
    """A standby process: its webhook's Kopf reads namespaces, CRDs and discovery; nothing of any job, nothing written."""
    return not any(verb in WRITES for verb, _ in counts) and not any(key.endswith(JOB_KINDS) for _, key in counts)


def holder(emu: KubeEmulator) -> str | None:
    lease = emu.find("leases", NS, "finetune-operator")
    return None if lease is None else lease["spec"].get("holderIdentity")


def test_a_killed_leader_is_replaced_after_the_lease_duration(emu: KubeEmulator, tmp_path: Path) -> None:
    """SIGKILL: the Lease is never released; the standby takes over once it has not changed for its duration."""
    first = _replica_process(emu, "process-a", tmp_path)
    second: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: holder(emu) == "process-a" and emu.watch_count("finetunejobs") >= 1, 30, message="a leads")
        second = _replica_process(emu, "process-b", tmp_path)
        wait_for(lambda: emu.requests_with_token("process-b")["get", LEASES] >= 2, 30, message="b campaigns")
        for i in range(JOBS // 2):
            emu.create(job(f"killed-{i}"))
        wait_for(lambda: len(emu.list("rayjobs", NS)) >= 3, 15, message="a few RayJobs")
        standby_before = emu.requests_with_token("process-b")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        for i in range(JOBS // 2, JOBS):
            emu.create(job(f"killed-{i}"))
        wait_provisioned(emu, JOBS)
        settle(emu)
        assert_end_state(emu, JOBS)
        assert holder(emu) == "process-b"
        assert served_the_webhook_only(standby_before), standby_before
        quiet_soon(emu)
    finally:
        settle(emu)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                output = proc.communicate(timeout=30)[0]
                print(output)  # shown when the test fails
                assert proc.returncode in (0, -15), output


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_deleted_under_the_leader_never_makes_two_leaders(emu: KubeEmulator) -> None:
    """``kubectl delete lease``: the standby may not create it while the leader may still lead; the leader stops."""
    clock, timing = Clock(), Timing(lease_duration=15, renew_deadline=10, retry_period=2)
    with emu.kubernetes_client() as api:
        kube = Kube(api)
        a = LeaderElector(kube, NS, "finetune-operator", "replica-a", timing=timing, clock=clock)
        b = LeaderElector(kube, NS, "finetune-operator", "replica-b", timing=timing, clock=clock)
        a.step()
        b.step()
        emu.delete("leases", NS, "finetune-operator")
        for _ in range(3):
            b.step()  # sees the Lease gone, a moment ago held by replica-a
            assert not (a.leading and b.leading)
            a.step()  # the leader sees it gone: steps down, creates it again, leads at its next try
            assert not (a.leading and b.leading)
            clock.now += 2
        assert (a.leading, a.term, b.leading) == (True, 2, False)
        assert emu.get("leases", NS, "finetune-operator")["spec"]["holderIdentity"] == "replica-a"


def test_a_fenced_write_that_hangs_gives_up_before_the_lease_could_pass(emu: KubeEmulator) -> None:
    """A write started while leading, answered slowly: it must end before another replica may lead, not after 30 s."""
    emu.create(job("slow-write"))
    timing = Timing(lease_duration=2, renew_deadline=1.5, retry_period=0.5)
    with emu.kubernetes_client() as api:
        kube = Kube(api)
        elector = LeaderElector(kube, NS, "finetune-operator", "replica-a", timing=timing)
        elector.step()
        term = elector.term
        fenced = Fenced(kube, functools.partial(elector.leads, term), functools.partial(elector.remaining, term))

        async def answered_late() -> dict[str, Any]:  # a stalled API server: the answer comes after the lease ran out
            await asyncio.sleep(6)
            return emu.get("finetunejobs", NS, "slow-write")

        emu.kmock[f"patch /apis/finetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/slow-write/status"] << answered_late
        with pytest.raises((ApiFailure, Retry)):  # timed out (or not even sent on a machine slower than the lease)
            fenced.patch_status("FineTuneJob", NS, "slow-write", {"phase": "Running"})
