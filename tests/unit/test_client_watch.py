"""The wait loop's back-off (``finetune_operator.client_watch``): growing, jittered, capped, reset by a watch that worked.

``follow`` runs against a scripted watch (no API server): each round's watch either fails at once, delivers an
event that does not end the wait, or delivers the awaited one; the test records the pauses it asks for.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, ClassVar

import kubernetes.watch
import pytest
from kubernetes.client.exceptions import ApiException

from finetune_operator.client_watch import Backoff, follow


@pytest.mark.parametrize(
    ("draw", "expected"),
    [
        (1.0, [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]),  # doubling, capped
        (0.0, [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]),  # jitter: never below half
    ],
)
def test_the_back_off_grows_is_jittered_and_capped(draw: float, expected: list[float]) -> None:
    backoff = Backoff(rng=lambda: draw)
    assert [backoff.next() for _ in expected] == expected
    backoff.reset()
    assert backoff.next() == expected[0]


def test_a_long_outage_does_not_overflow() -> None:
    backoff = Backoff(rng=lambda: 1.0)
    assert [backoff.next() for _ in range(2000)][-1] == 10.0


class ScriptedWatch:
    """``kubernetes.watch.Watch`` whose n-th stream plays the n-th of ``rounds``."""

    rounds: ClassVar[list[str]] = []

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        round_ = ScriptedWatch.rounds.pop(0)
        if round_ == "fail":
            raise ApiException(status=500, reason="Internal Server Error")
        phase = "Succeeded" if round_ == "done" else "Running"
        yield {"type": "MODIFIED", "object": {"metadata": {"name": "j"}, "status": {"phase": phase}}}

    def stop(self) -> None:
        pass


def test_failed_watches_back_off_and_a_watch_that_delivered_resets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubernetes.watch, "Watch", ScriptedWatch)
    ScriptedWatch.rounds = ["fail", "fail", "fail", "events", "fail", "done"]
    pauses: list[float] = []
    read = lambda: {"metadata": {"name": "j", "resourceVersion": "1"}, "status": {"phase": "Pending"}}  # noqa: E731
    last, reached = _until_succeeded(read, pauses.append)
    assert reached and last is not None and last["status"]["phase"] == "Succeeded"
    assert pauses == [0.25, 0.5, 1.0, 0.25]  # growing; none after the watch that delivered; then from the start


def test_a_job_made_again_under_the_same_name_is_not_the_one_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted and created again while no watch was open (a dropped connection): reads went by name alone, and `wait`
    reported the new job's Succeeded for the one it was following."""
    from finetune_operator.client_errors import JobNotFound

    monkeypatch.setattr(kubernetes.watch, "Watch", ScriptedWatch)
    ScriptedWatch.rounds = ["fail"]
    reads = iter(
        [
            {"metadata": {"name": "j", "uid": "first", "resourceVersion": "1"}, "status": {"phase": "Running"}},
            {"metadata": {"name": "j", "uid": "second", "resourceVersion": "9"}, "status": {"phase": "Succeeded"}},
        ]
    )
    with pytest.raises(JobNotFound, match=r"^FineTuneJob ns/j was deleted \(a new FineTuneJob of that name exists now\)"):
        _until_succeeded(lambda: next(reads))


class ErrorEventWatch(ScriptedWatch):
    """A watch whose stream dies on an ERROR event without the fields the library indexes (as it does on one)."""

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        if ScriptedWatch.rounds.pop(0) == "error":
            raise KeyError("code")
        yield {"type": "MODIFIED", "object": {"metadata": {"name": "j"}, "status": {"phase": "Succeeded"}}}


def test_an_error_event_the_library_cannot_read_is_watched_past(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubernetes.watch, "Watch", ErrorEventWatch)
    ScriptedWatch.rounds = ["error", "done"]
    last, reached = _until_succeeded(lambda: {"metadata": {"name": "j", "resourceVersion": "1"}, "status": {"phase": "Running"}})
    assert reached and last is not None


def _until_succeeded(read: Any, sleep: Any = lambda seconds: None) -> Any:
    """``follow`` of job ns/j until it Succeeded, over the scripted watch (it calls nothing); ``sleep`` gets the pauses."""
    return follow(
        SimpleNamespace(list_namespaced_custom_object=None),  # type: ignore[arg-type]
        read,
        "j",
        "ns",
        3600,
        lambda obj: (obj.get("status") or {}).get("phase") == "Succeeded",
        backoff=Backoff(rng=lambda: 1.0),
        sleep=sleep,
    )


class NoiseWatch(ScriptedWatch):
    """A watch that sends what is no change of the job, then ends at once: a line that is not JSON (the library
    yields None for it), a BOOKMARK, an event of a type no API server sends."""

    NOISE: ClassVar[dict[str, Any]] = {
        "garbage": None,
        "bookmark": {"type": "BOOKMARK", "object": {"kind": "FineTuneJob", "metadata": {"resourceVersion": "9"}}},
        "unknown": {"type": "WHAT", "object": {"metadata": {"name": "j"}, "status": {"phase": "Succeeded"}}},
    }

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        round_ = ScriptedWatch.rounds.pop(0)
        if round_ == "done":
            yield {"type": "MODIFIED", "object": {"metadata": {"name": "j"}, "status": {"phase": "Succeeded"}}}
        else:
            yield NoiseWatch.NOISE[round_]


def test_a_watch_that_sends_only_noise_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-JSON line was an AttributeError dump; a server that sent one BOOKMARK and closed was watched again at
    once, dozens of times a second for the whole --timeout (a BOOKMARK 'delivered' and reset the back-off)."""
    monkeypatch.setattr(kubernetes.watch, "Watch", NoiseWatch)
    ScriptedWatch.rounds = ["garbage", "bookmark", "unknown", "bookmark", "done"]
    pauses: list[float] = []
    read = lambda: {"metadata": {"name": "j", "resourceVersion": "1"}, "status": {"phase": "Running"}}  # noqa: E731
    last, reached = _until_succeeded(read, pauses.append)
    assert reached and last is not None
    assert pauses == [0.25, 0.5, 1.0, 2.0]  # the unknown type's Succeeded is not taken for the job's
