"""``finetune logs -f`` against a real local HTTP server whose connection goes silent (headers sent, then nothing, no
FIN): the follow must neither hang for ever nor end a job's legitimately quiet log. Past ``FOLLOW_IDLE_S`` without a
byte it asks again from its last line, as kubelet timestamps place it, and shows no line twice."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes.client
import pytest

from finetune_operator import client_logs
from finetune_operator.client_errors import ApiError
from finetune_operator.client_logs import LogSource, log_lines

# What each request is answered: (body, then silent until the test ends instead of closing the connection).
Script = list[tuple[bytes, bool]]


class _Server:
    def __init__(self, script: Script) -> None:
        self.script, self.queries = script, []
        self.done = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked, as the API server streams a followed log

            def do_GET(self) -> None:
                server.queries.append(parse_qs(urlsplit(self.path).query))
                body, silent = server.script[min(len(server.queries), len(server.script)) - 1]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if body:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
                    self.wfile.flush()
                if silent:  # no byte more, no FIN: until the test ends
                    server.done.wait(30)
                    self.close_connection = True
                    return
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def core(self) -> kubernetes.client.CoreV1Api:
        config = kubernetes.client.Configuration()
        config.host = f"http://127.0.0.1:{self.http.server_address[1]}"
        return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(config))

    def close(self) -> None:
        self.done.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(client_logs, "FOLLOW_IDLE_S", 0.5)
    servers: list[_Server] = []

    def start(script: Script) -> _Server:
        servers.append(_Server(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


T = "2024-05-01T10:00:0"


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("script", "shown"),
    [
        # Silent after two lines; asked again, the server sends the last second again (sinceSeconds counts whole
        # seconds), then a line of that same second and a later one, and ends (the container ended).
        (
            [
                (f"{T}0.1Z epoch 1\n{T}1Z epoch 1 done\n".encode(), True),
                (f"{T}0.1Z epoch 1\n{T}1Z epoch 1 done\n{T}1Z same second\n{T}2.5Z epoch 2\n".encode(), False),
            ],
            ["epoch 1", "epoch 1 done", "same second", "epoch 2"],
        ),
        # A job quiet from the start, twice over: the follow waits on and shows the lines once they come.
        ([(b"", True), (b"", True), (f"{T}3.000000001+00:00 first\n".encode(), False)], ["first"]),
    ],
    ids=["silent-after-lines", "quiet-from-the-start"],
)
def test_a_silent_follow_asks_again_from_its_last_line(serve: Any, script: Script, shown: list[str]) -> None:
    server = serve(script)
    assert list(log_lines(server.core(), LogSource("ns", "p", None, "submitter"), follow=True)) == shown
    assert len(server.queries) == len(script)
    assert all(query["timestamps"] == ["true"] and query["follow"] == ["true"] for query in server.queries)
    if shown[0] == "epoch 1":
        assert "sinceSeconds" not in server.queries[0] and int(server.queries[1]["sinceSeconds"][0]) >= 60


@pytest.mark.timeout(20)
def test_a_silent_follow_without_timestamps_to_resume_from_is_one_line(serve: Any) -> None:
    server = serve([(b"epoch 1\n", True)])
    lines = log_lines(server.core(), LogSource("ns", "p", None, "submitter"), follow=True)
    assert next(lines) == "epoch 1"
    with pytest.raises(ApiError, match=r"^read log of pod ns/p: no output for 0.5s, and no timestamps") as info:
        next(lines)
    assert "\n" not in str(info.value)
