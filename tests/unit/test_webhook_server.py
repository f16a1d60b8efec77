"""The admission webhook's HTTPS server (``webhook_server.GuardedWebhookServer``) met with real sockets: what it answers
to bodies that are not an AdmissionReview at all, and to a client that never finishes sending one. Kopf's serving
loop runs here in a thread of its own, around a stand-in for Kopf's admission function that counts its calls; the
reviews themselves, through the whole operator: tests/integration/test_webhook.py."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from finetune_operator import certificates, webhook_server
from finetune_operator.webhook_server import GuardedWebhookServer

HOST = "localhost"
ALLOWED = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {"uid": "u", "allowed": True}}


class Served:
    """``GuardedWebhookServer`` on a free port of 127.0.0.1, with a certificate of ``certificates.issue`` in ``folder``."""

    def __init__(self, folder: Path, **options: Any) -> None:
        self.issued = certificates.issue(HOST, datetime.now(timezone.utc))
        self.certfile = folder / "tls.pem"
        self.certfile.write_bytes(self.issued.chain)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        server = GuardedWebhookServer(
            port=self.port, host=HOST, addr="127.0.0.1", certfile=self.certfile, pkeyfile=self.certfile, **options
        )
        self.calls: list[Any] = []
        self.loop, ready = asyncio.new_event_loop(), threading.Event()

        async def admit(review: Any, **_: Any) -> dict[str, Any]:
            self.calls.append(review)
            return ALLOWED

        async def serve() -> None:
            async for _ in server(admit):
                ready.set()

        self.task = self.loop.create_task(serve())
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert ready.wait(10), "the webhook server did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self.task)
        left = asyncio.all_tasks(self.loop)  # connections the test left open
        for task in left:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        self.loop.close()

    def connect(self, ca: bytes | None = None) -> ssl.SSLSocket:
        context = ssl.create_default_context(cadata=(ca or self.issued.ca).decode())
        return context.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=20), server_hostname=HOST)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = Served(tmp_path)
    yield server
    server.stop()


def request(body: bytes, length: int | None = None) -> bytes:
    """A POST of ``body`` to the webhook's path, announcing ``length`` bytes (default: as many as there are)."""
    announced = len(body) if length is None else length
    return b"POST /validate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b" % (announced, body)


def answer(connection: ssl.SSLSocket) -> tuple[int, str]:
    """The status and body of the server's answer (as long as its Content-Length: aiohttp may linger before closing)."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := connection.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length and (chunk := connection.recv(65536)):
        body += chunk
    return int(head.split()[1]), body.decode()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),  # json.loads gives up past Python's recursion limit
        (b'{"request": {"uid": "\xff"}}', "UnicodeDecodeError"),
        (b"not json", "JSONDecodeError"),
    ],
    ids=["nested-100k-deep", "not-utf-8", "not-json"],
)
def test_a_body_that_is_not_json_gets_one_line_and_no_500(served: Served, body: bytes, says: str) -> None:
    """Kopf parsed the body itself and knew only JSONDecodeError: the others were an HTTP 500 and a traceback."""
    connection = served.connect()
    connection.sendall(request(body))
    status, text = answer(connection)
    assert status == 400, text
    assert text.startswith(f"the request body is not a JSON AdmissionReview: {says}: ") and text.count("\n") == 1, text
    assert served.calls == []


def test_a_body_that_never_arrives_is_answered_408_at_the_deadline(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing bounded the body's read: a client announcing 100 bytes and sending 1 held its task (and up to
    MAX_REVIEW_BYTES buffered) for ever; the keep-alive timer does not run while a request is being handled."""
    monkeypatch.setattr(webhook_server, "READ_SECONDS", 1.0, raising=False)
    connection = served.connect()
    connection.sendall(request(b"{", length=100))
    started = time.monotonic()
    status, text = answer(connection)
    assert status == 408 and text == "the request body did not arrive within 1 seconds\n", text
    assert time.monotonic() - started < 5
    assert served.calls == []


def test_a_renewed_certificate_is_served_without_waiting_for_a_dawdling_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kopf restarts its server on new certificate files and first waits up to 60 s for requests in flight, its port
    closed meanwhile: one client that never finished its body took the webhook away for a minute at each renewal."""
    monkeypatch.setattr(webhook_server, "READ_SECONDS", 1.0, raising=False)
    served = Served(tmp_path, file_check_interval=0.2)
    try:
        dawdling = served.connect()
        dawdling.sendall(request(b"{", length=100))
        time.sleep(0.5)  # in the handler, reading
        renewed = certificates.issue(HOST, datetime.now(timezone.utc))
        served.certfile.write_bytes(renewed.chain)
        started = time.monotonic()
        while time.monotonic() - started < 15:
            with contextlib.suppress(OSError):
                connection = served.connect(renewed.ca)
                connection.sendall(request(b"{}"))
                if answer(connection)[0] == 200:
                    break
            time.sleep(0.2)
        assert time.monotonic() - started < 5, "the webhook was away while a client dawdled"
    finally:
        served.stop()


def closed_within(connection: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``connection`` within ``seconds`` (an answer on it counts as not closed)."""
    connection.settimeout(seconds)
    try:
        return connection.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset, or a TLS alert: closed too
        return True


def test_connections_beyond_the_cap_are_closed_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection held its TLS buffers (about 300 KiB) for aiohttp's keep-alive hour: some 2,000 idle ones from
    any pod took the operator past its 512 MiB limit. Beyond MAX_CONNECTIONS one is closed once its handshake is done."""
    monkeypatch.setattr(webhook_server, "MAX_CONNECTIONS", 4, raising=False)
    served = Served(tmp_path)
    try:
        held = [served.connect() for _ in range(4)]
        one_more = served.connect()
        assert closed_within(one_more, 3)
        for connection in held:
            connection.close()
        time.sleep(0.5)
        connection = served.connect()
        connection.sendall(request(b"{}"))
        assert answer(connection)[0] == 200
    finally:
        served.stop()


@pytest.mark.parametrize(
    ("setting", "says"),
    [("IDLE_SECONDS", b"POST /validate HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa"), ("HANDSHAKE_SECONDS", None)],
    ids=["headers-never-finished", "never-says-hello"],
)
def test_a_connection_that_never_makes_a_request_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, says: bytes | None
) -> None:
    """An unfinished request was kept for aiohttp's keep-alive hour (3630 s), a connection without a TLS hello for
    asyncio's minute: each a slot and its buffers."""
    monkeypatch.setattr(webhook_server, setting, 1.0, raising=False)
    served = Served(tmp_path)
    try:
        if says is None:
            connection: socket.socket = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        else:
            connection = served.connect()
            connection.sendall(says)
        assert closed_within(connection, 4)
    finally:
        served.stop()
