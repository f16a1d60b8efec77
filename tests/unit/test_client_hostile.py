"""The ``finetune`` cluster verbs against a hostile or broken API server (``tests.support.api_server``: a real local
HTTP server answering every request as the test says): a proxy's HTML page, a cut body, JSON that is no object, fields
of the wrong type, a Retry-After of 1e9 s, a redirect to another host, no answer at all. Each verb must end in one line
on stderr naming the request and an exit code: never a traceback, never a hang."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from finetune_operator.cli import main
from tests.support.api_server import GOOD, JOB, Api, one_line

pytestmark = pytest.mark.timeout(30)

VERBS = {
    "get": (["get", "j"], "get FineTuneJob ns/j"),
    "list": (["list"], "list FineTuneJob ns"),
    "describe": (["describe", "j"], "get FineTuneJob ns/j"),
    "logs": (["logs", "j"], "get FineTuneJob ns/j"),
    "suspend": (["suspend", "j"], "suspend FineTuneJob ns/j"),
    "delete": (["delete", "j"], "delete FineTuneJob ns/j"),
}


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize(
    ("body", "content_type", "said"),
    [
        (b"<html><body>502 Bad Gateway</body></html>", "text/html", "the answer is not JSON"),
        (b'{"metadata": {"name": ', "application/json", "the answer is not JSON"),
        (b"[" * 100_000, "application/json", "the answer is not JSON"),
        ([1, 2], "application/json", "the answer is not an object"),
        (None, "application/json", "the answer is not an object"),
        ("a string", "application/json", "the answer is not an object"),
    ],
    ids=["html", "cut", "deep", "list", "null", "string"],
)
def test_an_answer_that_is_no_json_object_is_one_line(
    api: Api, capsys: pytest.CaptureFixture[str], verb: str, body: Any, content_type: str, said: str
) -> None:
    """A proxy's error page with a 200, a cut body or a JSON list was a ValueError, TypeError or AttributeError dump."""
    api.answer(body, content_type=content_type)
    argv, what = VERBS[verb]
    code, err = one_line(argv, capsys)
    assert code == 4 and err.startswith(f"error: {what}: {said}")


@pytest.mark.parametrize(
    ("verb", "said"),
    [("logs", "list pods ns/batch.kubernetes.io/job-name="), ("describe", "list events ns/j")],
)
def test_pods_or_events_answered_with_something_else_is_one_line(
    api: Api, capsys: pytest.CaptureFixture[str], verb: str, said: str
) -> None:
    """The job reads fine, the pod or Event list that follows does not: the library's typed reader raised a pydantic
    ValidationError with its multi-line dump."""
    api.answer(JOB)
    code, err = one_line([verb, "j"], capsys)
    assert code == 4 and err.startswith(f"error: {said}") and "the answer is not a list the API server would send" in err


@pytest.mark.parametrize(
    "verb",
    [["get", "j", "-o", "wide"], ["list", "-o", "wide"], ["list", "-A"], ["describe", "j"], ["logs", "j"]],
    ids=lambda verb: "-".join(verb),
)
@pytest.mark.parametrize(
    "change",
    [
        {"metadata": "x"},
        {"metadata": {"namespace": "ns"}},  # no name
        {"spec": {**GOOD["spec"], "model": "x", "strategy": [1], "resources": "x"}},
        {"status": "x"},
        {"status": [1]},
        {"status": {"phase": "Running", "conditions": "x", "progress": "x", "metrics": [1]}},
        {"status": {"phase": 5, "conditions": [{"type": None, "status": 1, "reason": {}}, "x"]}},
        {"status": {"progress": {"epoch": 1, "percent": "x"}, "metrics": {"valAccuracy": "high"}}},
        {"status": {"phase": "Succeeded", "artifacts": "x"}},
        {"status": {"phase": "Failed", "artifacts": {"exports": [1], "protection": "x"}, "message": {"a": 1}}},
    ],
    ids=[
        "metadata-string", "no-name", "spec-parts-wrong", "status-string", "status-list", "status-parts-strings",
        "phase-number-condition-nulls", "percent-string", "artifacts-string", "exports-list",
    ],
)  # fmt: skip
def test_a_job_whose_fields_have_the_wrong_type_is_shown_as_it_is(
    api: Api, capsys: pytest.CaptureFixture[str], verb: list[str], change: dict[str, Any]
) -> None:
    """A FineTuneJob from a server that does not hold to the CRD's schema (a proxy, a hand-made server, a CRD of
    another version): each field is shown as it is or as "-"; it was an AttributeError, KeyError or TypeError dump."""
    job = {**GOOD, **change}
    api.answer(job, path="/finetunejobs/j")
    api.answer({"kind": "FineTuneJobList", "items": [job]}, path="/finetunejobs")
    api.answer({"kind": "List", "items": []}, path="/pods")
    api.answer({"kind": "List", "items": []}, path="/events")
    code = main(verb)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and len(err.splitlines()) <= 1, err
    assert code == (4 if verb[0] == "logs" else 0), err  # logs: "no pod holds the output" (LogsUnavailable)
    assert bool(out) == (verb[0] != "logs")  # the job shown, whatever its fields hold


@pytest.mark.parametrize("change", [{"metadata": "x"}, {"status": "x"}])
def test_waiting_on_a_job_whose_fields_have_the_wrong_type_times_out_in_one_line(
    api: Api, capsys: pytest.CaptureFixture[str], change: dict[str, Any]
) -> None:
    api.answer({**GOOD, **change})
    code, err = one_line(["wait", "j", "--timeout", "1s"], capsys)
    assert code == 3 and err.startswith("error: FineTuneJob ns/j: still "), err


@pytest.mark.timeout(15)
@pytest.mark.parametrize("verb", ["get", "delete"])
@pytest.mark.parametrize(("status", "retry_after"), [(429, "1000000000"), (503, "86400"), (429, "1e9"), (429, "soon")], ids=str)
def test_a_retry_after_is_not_slept_on(
    api: Api, capsys: pytest.CaptureFixture[str], verb: str, status: int, retry_after: str
) -> None:
    """urllib3's default retry slept a GET's or DELETE's 429/503 Retry-After out, however long it said (a hang without
    end), and an unreadable one ("soon") was reported as "the API server cannot be reached"."""
    api.answer({"kind": "Status", "message": "slow down"}, status=status, **{"Retry-After": retry_after})
    code, err = one_line([verb, "j"], capsys)
    assert code == 4 and err.startswith(f"error: {verb} FineTuneJob ns/j: HTTP {status} ")
    assert len(api.requests) == 1


@pytest.fixture
def elsewhere() -> Iterator[Api]:
    """Another server (another host, 127.0.0.2) that a redirect points to."""
    server = Api()
    server.http.shutdown()
    server.http.server_close()
    server.http = ThreadingHTTPServer(("127.0.0.2", 0), server.http.RequestHandlerClass)
    server.http.daemon_threads = True
    threading.Thread(target=server.http.serve_forever, daemon=True).start()
    server.answer(JOB)
    yield server
    server.http.shutdown()
    server.http.server_close()


@pytest.mark.parametrize("verb", [["get", "j"], ["suspend", "j"], ["delete", "j"]], ids=lambda verb: verb[0])
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_followed(
    api: Api, elsewhere: Api, capsys: pytest.CaptureFixture[str], verb: list[str], status: int
) -> None:
    """urllib3 followed it: a 307 or 308 sent the PATCH or DELETE, body and all, to whatever host it named, and the
    other host's answer was shown as the job. An API server never redirects: the kubeconfig's server URL is wrong."""
    target = f"http://127.0.0.2:{elsewhere.http.server_address[1]}/login"
    api.answer(b"", status=status, Location=target)
    code, err = one_line(verb, capsys)
    assert code == 4 and err.startswith(f"error: {verb[0]} FineTuneJob ns/j: HTTP {status} ")
    assert f"redirects to {target}" in err
    assert elsewhere.requests == []


@pytest.mark.timeout(20)
def test_a_silent_server_ends_wait_at_its_timeout(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    """A server that takes the request and never answers: the first read of `wait --timeout 2s` waited its 30 s read
    timeout four times (urllib3 sent it again three times), two minutes."""
    api.answer(b"", status=0)
    started = time.monotonic()
    code, err = one_line(["wait", "j", "--timeout", "2s"], capsys)
    assert code == 3 and err == "error: FineTuneJob ns/j: still unknown after 2s"
    assert time.monotonic() - started < 8


@pytest.mark.timeout(20)
def test_a_request_a_silent_server_does_not_answer_is_not_sent_again(
    api: Api, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_operator import client

    monkeypatch.setattr(client, "REQUEST_TIMEOUT", (5.0, 1.0))
    api.answer(b"", status=0)
    code, err = one_line(["get", "j"], capsys)
    assert code == 4 and err.startswith("error: get FineTuneJob ns/j: the API server cannot be reached: ") and "timed out" in err
    assert len(api.requests) == 1
