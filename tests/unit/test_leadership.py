"""Leader election (``finetune_operator.leadership``): the rule as a table, then the elector against the fake API.

Time is a fake monotonic clock moved by the tests; the Lease lives in ``FakeKube``, which refuses a stale
update with 409 as the API server does.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Any

import pytest

from finetune_operator.failures import ApiFailure, Retry
from finetune_operator.leadership import GONE, Action, Fenced, LeaderElector, Observed, Timing, decide, record_of
from finetune_operator.reconcile import KubeApi
from finetune_operator.settings import OperatorSettings, SettingsError
from finetune_operator.status_writer import StatusApi
from finetune_operator.stuck import PodsAndEvents
from finetune_operator.suspension import WorkloadApi
from tests.support.fake_kube import FakeKube

NS, NAME = "finetune-system", "finetune-operator"
TIMING = Timing(lease_duration=15, renew_deadline=10, retry_period=2)


def lease(holder: str | None, renew: str = "t1", version: str = "7", duration: int | None = 15) -> dict[str, Any]:
    spec: dict[str, Any] = {"holderIdentity": holder, "renewTime": renew}
    if duration is not None:
        spec["leaseDurationSeconds"] = duration
    return {"kind": "Lease", "metadata": {"name": NAME, "namespace": NS, "resourceVersion": version}, "spec": spec}


SEEN_AT_100 = Observed(("other", "t1", "7"), 100.0)


@pytest.mark.parametrize(
    ("case", "found", "observed", "now", "action", "since"),
    [
        ("no Lease yet", None, None, 100.0, Action.CREATE, None),
        ("ours: renew", lease("me"), None, 100.0, Action.RENEW, 100.0),
        ("released (no holder)", lease(None), None, 100.0, Action.TAKE, 100.0),
        ("released (empty holder)", lease(""), SEEN_AT_100, 101.0, Action.TAKE, 101.0),
        ("another's, first seen now", lease("other"), None, 100.0, Action.WAIT, 100.0),
        ("another's, unchanged for less than its duration", lease("other"), SEEN_AT_100, 114.9, Action.WAIT, 100.0),
        ("another's, unchanged for its duration: expired", lease("other"), SEEN_AT_100, 115.0, Action.TAKE, 100.0),
        (
            "another's, renewed since: fresh again",
            lease("other", renew="t2", version="8"),
            SEEN_AT_100,
            130.0,
            Action.WAIT,
            130.0,
        ),
        ("another's, only the resourceVersion moved", lease("other", version="9"), SEEN_AT_100, 130.0, Action.WAIT, 130.0),
        ("another's with a longer duration of its own", lease("other", duration=60), SEEN_AT_100, 140.0, Action.WAIT, 100.0),
        ("another's without a duration: ours applies", lease("other", duration=None), SEEN_AT_100, 115.0, Action.TAKE, 100.0),
        # A Lease that vanished: another replica may still lead until its term runs out on our clock.
        ("another's, deleted: wait", None, SEEN_AT_100, 101.0, Action.WAIT, 101.0),
        ("another's, deleted for less than the duration", None, Observed(GONE, 101.0), 115.9, Action.WAIT, 101.0),
        ("another's, deleted for the duration: create", None, Observed(GONE, 101.0), 116.0, Action.CREATE, 101.0),
        ("ours, deleted: create at once", None, Observed(("me", "t1", "7"), 100.0), 101.0, Action.CREATE, None),
        ("released, deleted: create at once", None, Observed(("", "t1", "7"), 100.0), 101.0, Action.CREATE, None),
    ],
)
def test_decide(
    case: str, found: dict[str, Any] | None, observed: Observed | None, now: float, action: Action, since: float | None
) -> None:
    got, seen = decide(found, "me", observed, now, 15.0)
    assert got is action, case
    assert (seen.since if seen else None) == since, case


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Events:
    def __init__(self) -> None:
        self.log: list[str] = []


def elector(
    kube: FakeKube, identity: str = "me", *, clock: Clock | None = None, healthy: bool = True
) -> tuple[LeaderElector, Events]:
    events = Events()
    wall = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=timezone.utc)
    return (
        LeaderElector(
            kube,
            NS,
            NAME,
            identity,
            timing=TIMING,
            on_started=lambda: events.log.append("started"),
            on_stopped=lambda: events.log.append("stopped"),
            healthy=lambda: healthy,
            clock=clock or Clock(),
            wall_clock=lambda: wall,
        ),
        events,
    )


def stored(kube: FakeKube) -> dict[str, Any]:
    found = kube.get("Lease", NS, NAME)
    assert found is not None
    return found


def test_no_lease_creates_it_and_leads() -> None:
    kube = FakeKube()
    me, events = elector(kube)
    me.step()
    assert (me.leading, events.log) == (True, ["started"])
    spec = stored(kube)["spec"]
    assert spec == {
        "holderIdentity": "me",
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-11-30T12:00:00.123456Z",
        "renewTime": "2026-11-30T12:00:00.123456Z",
        "leaseTransitions": 0,
    }
    me.step()  # renews: started is not called again
    assert (me.leading, events.log, kube.count("update", "Lease")) == (True, ["started"], 1)


def test_a_fresh_lease_of_another_is_left_alone_until_it_expires_on_our_clock() -> None:
    kube, clock = FakeKube(), Clock()
    kube.put(lease("other"))
    me, events = elector(kube, clock=clock)
    me.step()
    clock.now += 14
    me.step()
    assert (me.leading, events.log, kube.count("update", "Lease"), record_of(stored(kube))[0]) == (False, [], 0, "other")
    clock.now += 1  # 15 s without a change since we first saw it
    me.step()
    spec = stored(kube)["spec"]
    assert (me.leading, events.log, spec["holderIdentity"], spec["leaseTransitions"]) == (True, ["started"], "me", 1)


def test_a_standby_that_loses_the_race_to_take_over_does_not_lead() -> None:
    kube, clock = FakeKube(), Clock()
    kube.put(lease(None))
    me, events = elector(kube, clock=clock)
    original = kube.read_lease

    def read_then_someone_else_writes(namespace: str, name: str) -> dict[str, Any] | None:
        found = original(namespace, name)
        kube.put(lease("other", renew="t9"))  # the other standby's write lands between our read and our PUT
        return found

    kube.read_lease = read_then_someone_else_writes  # type: ignore[method-assign]
    me.step()
    assert (me.leading, events.log, record_of(stored(kube))[0]) == (False, [], "other")


def test_renewals_that_fail_fence_the_leader_at_the_renew_deadline() -> None:
    kube, clock = FakeKube(), Clock()
    me, events = elector(kube, clock=clock)
    me.step()
    kube.faults[("read", "Lease")] = ApiFailure("read Lease", None, "API server unreachable")
    clock.now += 9.9
    me.step()
    assert (me.leading, events.log) == (True, ["started"])
    clock.now += 0.1
    assert me.leading is False  # between two tries already: nothing may act on a stale term
    me.step()
    assert events.log == ["started", "stopped"]
    me.check_deadline()
    assert events.log == ["started", "stopped"]  # stopped once


def test_the_leader_stops_at_once_when_another_holds_the_lease() -> None:
    kube = FakeKube()
    me, events = elector(kube)
    me.step()
    kube.put(lease("other", renew="t5"))
    me.step()
    assert (me.leading, events.log) == (False, ["started", "stopped"])


def test_stopping_steps_down_and_releases_the_lease() -> None:
    kube = FakeKube()
    me, events = elector(kube)
    stop = threading.Event()
    stop.set()
    me.step()
    me.run(stop)
    spec = stored(kube)["spec"]
    assert (me.leading, events.log, spec["holderIdentity"]) == (False, ["started", "stopped"], None)
    other, other_events = elector(kube, "other")
    other.step()  # released: taken at the next try, not after the lease duration
    assert (other.leading, other_events.log) == (True, ["started"])


def test_release_leaves_a_lease_that_another_holds() -> None:
    kube = FakeKube()
    kube.put(lease("other"))
    me, _ = elector(kube)
    me.release()
    assert (record_of(stored(kube))[0], kube.count("update", "Lease")) == ("other", 0)


def test_a_leader_whose_operator_stopped_hands_the_lease_on() -> None:
    kube = FakeKube()
    me, events = elector(kube, healthy=False)
    me.step()  # takes it (nothing runs yet to be unhealthy)
    me.step()
    assert (me.leading, events.log, stored(kube)["spec"]["holderIdentity"]) == (False, ["started", "stopped"], None)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LEADER_ELECTION": "true"},
            "FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE is empty, which FINETUNE_OPERATOR_LEADER_ELECTION=true cannot use",
        ),
        (
            {"RENEW_DEADLINE_SECONDS": "15"},
            "FINETUNE_OPERATOR_RENEW_DEADLINE_SECONDS=15 is not accepted with FINETUNE_OPERATOR_LEASE_DURATION_SECONDS=15",
        ),
        (
            {"RETRY_PERIOD_SECONDS": "10"},
            "expected retry period < renew deadline < lease duration",
        ),
        ({"LEASE_DURATION_SECONDS": "0"}, "FINETUNE_OPERATOR_LEASE_DURATION_SECONDS='0' is not accepted; expected a number"),
        ({"LEADER_ELECTION_IDENTITY": "a b"}, "FINETUNE_OPERATOR_LEADER_ELECTION_IDENTITY='a b' is not accepted"),
        ({"LEADER_ELECTION_LEASE": "Lease_1"}, "FINETUNE_OPERATOR_LEADER_ELECTION_LEASE='Lease_1' is not accepted"),
    ],
)
def test_bad_election_settings_say_what_is_accepted(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        OperatorSettings.from_env({f"FINETUNE_OPERATOR_{key}": value for key, value in env.items()})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_election_settings_parse() -> None:
    settings = OperatorSettings.from_env(
        {
            "FINETUNE_OPERATOR_LEADER_ELECTION": "true",
            "FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE": "finetune-system",
            "FINETUNE_OPERATOR_LEADER_ELECTION_IDENTITY": "finetune-operator-7d9f-abcde",
            "FINETUNE_OPERATOR_LEASE_DURATION_SECONDS": "4",
            "FINETUNE_OPERATOR_RENEW_DEADLINE_SECONDS": "2.5",
            "FINETUNE_OPERATOR_RETRY_PERIOD_SECONDS": "0.5",
        }
    )
    assert (settings.leader_election, settings.leader_election_lease, settings.lease_duration_seconds) == (
        True,
        "finetune-operator",
        4,
    )
    assert OperatorSettings.from_env(settings.to_env()) == settings


def test_the_work_of_an_earlier_term_stays_fenced_when_the_replica_leads_again() -> None:
    kube, clock = FakeKube(), Clock()
    me, events = elector(kube, clock=clock)
    me.step()
    first = me.term
    clock.now += 10  # a stall past the renew deadline
    me.check_deadline()
    me.step()  # still the holder: leads again, a new term
    assert (events.log, me.leading, me.leads(first), me.leads(me.term)) == (["started", "stopped", "started"], True, False, True)


def test_a_renewal_overtaken_by_a_step_down_does_not_count() -> None:
    kube, clock = FakeKube(), Clock()
    me, events = elector(kube, clock=clock)
    me.step()
    original = kube.read_lease

    def slow_read(namespace: str, name: str) -> dict[str, Any] | None:
        clock.now += 10  # the renewal hangs past the deadline; the fence thread steps down meanwhile
        me.check_deadline()
        return original(namespace, name)

    kube.read_lease = slow_read  # type: ignore[method-assign]
    me.step()
    assert (events.log, me.leading) == (["started", "stopped"], False)


def test_a_standby_runs_kopf_with_the_webhook_alone() -> None:
    """``handlers.WEBHOOK_REGISTRY`` (every replica) watches nothing and reconciles nothing; the leader's Kopf serves
    neither the webhook nor metrics (the first Kopf of its process does)."""
    from finetune_operator import handlers, naming, replication

    registry = handlers.WEBHOOK_REGISTRY
    for part in (registry._changing, registry._watching, registry._spawning, registry._indexing):
        assert list(part.get_all_handlers()) == []
    assert [handler.id for handler in registry._webhooks.get_all_handlers()] == [naming.WEBHOOK_PATH]
    activities = {handler.id for handler in registry._activities.get_all_handlers()}
    assert "start_resync" not in activities and {"configure", "login"} <= activities
    leader = replication.reconciling_settings(OperatorSettings(leader_election=True, leader_election_namespace=NS))
    assert (leader.webhook_port, leader.metrics_port, leader.leader_election) == (0, 0, True)


@pytest.mark.parametrize("protocol", [KubeApi, StatusApi, PodsAndEvents, WorkloadApi])
def test_the_fenced_client_has_every_call_the_reconciler_makes(protocol: type) -> None:
    """The leader's reconciler speaks only through ``Fenced``: a call it lacks fails only on a cluster, at run time."""
    calls = {name for name in vars(protocol) if not name.startswith("_")}
    assert calls and calls <= set(vars(Fenced))


def test_the_fenced_client_refuses_writes_once_not_leading() -> None:
    kube, leading = FakeKube(), [True]
    fenced = Fenced(kube, lambda: leading[0])
    fenced.create_or_get({"kind": "ConfigMap", "metadata": {"name": "a", "namespace": "ns"}})
    leading[0] = False
    assert fenced.read("ConfigMap", "ns", "a") is not None  # reads pass
    with pytest.raises(Retry, match="not the leader"):
        fenced.post_event(
            {"kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "ns"}}, "Normal", "X", "m", component="c"
        )
    with pytest.raises(Retry, match="not the leader"):
        fenced.patch("ConfigMap", "ns", "a", {"data": {}})


def test_a_fractional_lease_duration_is_written_rounded_up() -> None:
    """2.5 s written as 2 would let the others take over half a second before this replica's fence stops it."""
    kube = FakeKube()
    me = LeaderElector(kube, NS, NAME, "me", timing=Timing(lease_duration=2.5, renew_deadline=2.0, retry_period=0.5))
    me.step()
    assert stored(kube)["spec"]["leaseDurationSeconds"] == 3
    assert me.leading


def test_the_lease_left_to_a_term_bounds_its_writes() -> None:
    kube, clock = FakeKube(), Clock()
    me, _ = elector(kube, clock=clock)
    assert me.remaining(0) == 0.0  # not leading
    me.step()
    clock.now += 4
    assert (me.term, me.remaining(me.term), me.remaining(me.term - 1)) == (1, 11.0, 0.0)
    clock.now += 6  # past the renew deadline: fenced, nothing left to write with
    assert me.remaining(me.term) == 0.0


def test_a_deleted_lease_is_lost_leadership_and_never_two_leaders() -> None:
    kube, clock = FakeKube(), Clock()
    me, mine = elector(kube, clock=clock)
    other, others = elector(kube, "other", clock=clock)
    me.step()
    other.step()
    del kube.objects[("Lease", NS, NAME)]  # kubectl delete lease, a namespace cleanup
    other.step()  # it saw "me" hold the Lease: "me" may still lead, so it does not create it yet
    assert (me.leading, other.leading) == (True, False)
    me.step()  # the leader sees its Lease gone: it stops, then creates it again
    assert (me.leading, mine.log, record_of(stored(kube))[0]) == (False, ["started", "stopped"], "me")
    me.step()
    other.step()
    assert (me.leading, me.term, other.leading, others.log) == (True, 2, False, [])
