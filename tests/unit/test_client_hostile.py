"""The ``finetune`` cluster verbs against a hostile or broken API server: a real local HTTP server answers every
request as the test says (a proxy's HTML page, a cut body, JSON that is no object, fields of the wrong type). Each
verb must end in one line on stderr naming the request and an exit code: never a traceback, never a hang."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.cli import main
from tests.support.schemas import REPO

pytestmark = pytest.mark.timeout(30)

JOB: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "j", "namespace": "ns", "creationTimestamp": "2024-01-01T00:00:00Z"},
    "spec": {"model": {"name": "resnet18"}},
}


class Api:
    """Answers each request as ``answer`` said for the longest part of its path given there (``""``: any request);
    ``requests``: (method, path, headers) seen."""

    def __init__(self) -> None:
        self.replies: dict[str, tuple[int, dict[str, str], bytes]] = {"": (200, {"Content-Type": "application/json"}, b"{}")}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.closing = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                api.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, body = api.replies[max((p for p in api.replies if p in self.path), key=len)]
                if status == 0:  # silent: the connection open, no byte of an answer, until the test ends
                    api.closing.wait(30)
                    return
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def answer(
        self, body: Any, status: int = 200, content_type: str = "application/json", path: str = "", **headers: str
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.replies[path] = (status, {"Content-Type": content_type, **headers}, data)


def kubeconfig(path: Path, server: str, user: dict[str, Any] | None = None) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "ns"}}],
                "clusters": [{"name": "k", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "SECRET"} if user is None else user}],
            }
        )
    )
    return path


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    server = Api()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", server.url)))
    yield server
    server.closing.set()
    server.http.shutdown()
    server.http.server_close()


def one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit code, the one line on stderr) of ``finetune ARGV``; fails on a traceback or more lines."""
    code = main(argv)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return code, err.strip()


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


GOOD: dict[str, Any] = {
    **yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text()),
    "metadata": {"name": "j", "namespace": "ns", "creationTimestamp": "2024-01-01T00:00:00Z", "uid": "u1"},
}


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


def _authorization(api: Api) -> str | None:
    return next((v for k, v in api.requests[-1][2].items() if k.lower() == "authorization"), None)


@pytest.mark.parametrize(
    "user",
    [{"token": "abc\n"}, {"token": " abc \r\n"}, {"tokenFile": "token"}],
    ids=["token", "token-crlf", "token-file"],
)
def test_a_token_ending_with_a_newline_is_trimmed_as_kubectl_does(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], user: dict[str, str]
) -> None:
    """``echo $TOKEN > token`` writes a newline after it: the header was 'Bearer abc\\n', a ValueError dump."""
    (tmp_path / "token").write_text("abc\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", api.url, user)))
    api.answer(GOOD)
    assert main(["get", "j"]) == 0, capsys.readouterr().err
    assert _authorization(api) == "Bearer abc"


def test_a_token_with_a_line_break_inside_is_one_line(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", api.url, {"token": "abc\r\nX-Evil: 1"})))
    code, err = one_line(["get", "j"], capsys)
    assert code == 4 and "token" in err and "control character" in err
    assert api.requests == []


def test_a_server_without_a_scheme_is_https_as_for_kubectl(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``server: host:6443``: kubectl speaks TLS to it; urllib3 took it for plain HTTP, sent the token in clear and
    printed a FutureWarning with its source line."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", api.url.removeprefix("http://"))))
    api.answer(GOOD)
    code, err = one_line(["get", "j"], capsys)  # the test server speaks plain HTTP: the TLS handshake fails
    assert code == 4 and "TLS with the API server https://127.0.0.1:" in err
    assert api.requests == []  # no request in clear, no token


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("section", "field", "target"),
    [
        ("users", "tokenFile", "fifo"),
        ("users", "tokenFile", "/dev/zero"),
        ("users", "client-certificate", "fifo"),
        ("clusters", "certificate-authority", "/dev/zero"),
    ],
)
def test_a_named_file_that_is_a_pipe_or_a_device_is_one_line(
    api: Api,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    section: str,
    field: str,
    target: str,
) -> None:
    """A tokenFile that is a FIFO hung the CLI for ever (the library reads it whole); /dev/zero filled the memory."""
    os.mkfifo(tmp_path / "fifo")
    path = kubeconfig(tmp_path / "kubeconfig", api.url)
    document = json.loads(path.read_text())
    entry = document[section][0]["user" if section == "users" else "cluster"]
    entry[field] = target  # relative: to the kubeconfig's folder
    path.write_text(json.dumps(document))
    code, err = one_line(["get", "j"], capsys)
    assert code == 4 and err.startswith(f"error: the kubeconfig {path} cannot be used: ")
    assert f"'s {field} {target} is not a regular file" in err
    assert api.requests == []


@pytest.mark.parametrize(
    ("script", "said"),
    [
        ("echo 'token expired, run login' >&2; exit 3", "exec: process returned 3. token expired, run login"),
        ("echo 'not json'", "exec: failed to decode process output"),
        ("echo '[1, 2]'", "exec: malformed response"),
    ],
    ids=["fails", "garbage", "not-an-object"],
)
def test_an_exec_plugin_that_fails_is_one_line_and_nothing_is_sent(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], script: str, said: str
) -> None:
    """The library logged the plugin's failure ("ERROR:root:..." through a logging set up on the spot) and sent the
    request without credentials: two lines, the second a 401 saying to log in again, whatever the plugin said."""
    plugin = tmp_path / "plugin"
    plugin.write_text(f"#!/bin/sh\n{script}\n")
    plugin.chmod(0o755)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": str(plugin)}}
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", api.url, user)))
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh `finetune` process
    code, err = one_line(["get", "j"], capsys)
    assert code == 4 and err.startswith("error: the kubeconfig's user cannot be logged in: its exec plugin said: ")
    assert said in err and api.requests == []


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


def test_a_server_certificate_the_kubeconfig_does_not_trust_is_one_line_saying_what_to_check(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A self-signed certificate, or one of another cluster: the line was urllib3's nested repr of MaxRetryError,
    SSLError and SSLCertVerificationError, and said neither that TLS failed nor what to check."""
    import base64
    import ssl
    from datetime import datetime, timezone

    from finetune_operator import certificates

    now = datetime.now(timezone.utc)
    served, other = certificates.issue("127.0.0.1", now), certificates.issue("127.0.0.1", now)
    (tmp_path / "chain.pem").write_bytes(served.chain)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "chain.pem")
    api.http.socket = context.wrap_socket(api.http.socket, server_side=True)
    path = kubeconfig(tmp_path / "kubeconfig", api.url.replace("http://", "https://"))
    document = json.loads(path.read_text())
    document["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(other.ca).decode()
    path.write_text(json.dumps(document))
    monkeypatch.setenv("KUBECONFIG", str(path))
    code, err = one_line(["get", "j"], capsys)
    assert code == 4 and err.startswith("error: get FineTuneJob ns/j: TLS with the API server https://127.0.0.1:")
    assert "certificate verify failed" in err and "certificate-authority" in err and "HTTPSConnectionPool" not in err


@pytest.mark.timeout(15)
def test_a_kubeconfig_from_a_pipe_is_read_once(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--kubeconfig <(vault read ...)`` (kubectl takes it): the file was read three times, and a pipe gives its
    content once: "Invalid kube-config. /dev/fd/63 file is empty"."""
    text = kubeconfig(tmp_path / "kubeconfig", api.url).read_bytes()
    readable, writable = os.pipe()
    threading.Thread(target=lambda: (os.write(writable, text), os.close(writable)), daemon=True).start()
    api.answer(GOOD)
    try:
        assert main(["get", "j", "--kubeconfig", f"/dev/fd/{readable}"]) == 0, capsys.readouterr().err
    finally:
        os.close(readable)
    assert len(api.requests) == 1
