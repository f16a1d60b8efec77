"""The admission webhook's HTTPS server (``webhook_server.GuardedWebhookServer``) met with real sockets: what it answers
to bodies that are not an AdmissionReview at all, and to a client that never finishes sending one. Kopf's serving
loop runs here in a thread of its own, around a stand-in for Kopf's admission function that counts its calls; the
reviews themselves, through the whole operator: tests/integration/test_webhook.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from finetune_operator import certificates
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
        threading.Thread(target=self._run, daemon=True).start()
        assert ready.wait(10), "the webhook server did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self.task)

    def connect(self, ca: bytes | None = None) -> ssl.SSLSocket:
        context = ssl.create_default_context(cadata=(ca or self.issued.ca).decode())
        return context.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=20), server_hostname=HOST)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)


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
    """The status and body of the server's answer, read until it closes the connection."""
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
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
