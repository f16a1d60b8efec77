"""The threaded HTTP server under the operator's plain ports (``/metrics``: ``metrics_server``; ``/healthz``: ``liveness``),
where what any pod of the cluster may send is bounded: connections at once (in all, and from one address), how long
each may last, and how many bytes its request head may take. One request per connection: nothing is kept alive.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import threading
from collections import Counter
from typing import Any, ClassVar
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)


class QuietHandler(WSGIRequestHandler):
    """One request, in its own thread: the TLS handshake happens here, under the server's ``connection_seconds``, not in
    the accepting thread, where one connection that never says hello would stop every other request."""

    server: BoundedServer
    server_version, sys_version = "finetune-operator", ""  # the Server header names no Python version

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.connection_seconds)  # each read's; the server's deadline bounds them all
        if self.server.max_head_bytes is not None:
            self.rfile = _Head(self.rfile, self.server.max_head_bytes)  # type: ignore[assignment]
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()

    def handle(self) -> None:
        try:
            super().handle()
        except http.client.LineTooLong:  # the request line past max_head_bytes (wsgiref's own bound is 64 KiB)
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request is noise; refusals are the client's to report


class _Head:
    """The request's reader, at most ``left`` bytes of head: past it, ``LineTooLong`` (http.server answers 431 for a
    header, ``QuietHandler`` 414 for the request line). The body is never read: no endpoint here takes one."""

    def __init__(self, raw: Any, left: int) -> None:
        self.raw, self.left = raw, left

    def readline(self, size: int = -1) -> bytes:
        line: bytes = self.raw.readline(self.left + 1 if size < 0 else min(size, self.left + 1))
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong("the request head")
        return line

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        self.raw.close()


class BoundedServer(ThreadingWSGIServer):
    """At most ``max_connections`` at once (``per_client`` from one address), each closed ``connection_seconds`` after
    it was accepted, one more closed at once: a socket timeout alone bounds each read, and a client sending a byte at
    a time, or many clients saying nothing, would hold threads and buffers in the operator's process for ever."""

    request_queue_size = 128  # the listen backlog: socketserver's 5 drops a burst's connections into SYN retries
    max_connections: ClassVar[int] = 16
    connection_seconds: ClassVar[float] = 30.0
    per_client: ClassVar[int | None] = None
    """Connections from one address: a single pod cannot take every slot (the kubelet's probe among them)."""
    max_head_bytes: ClassVar[int | None] = None

    def __init__(self, address: tuple[str, int], handler: type[QuietHandler], *, ipv6: bool = False) -> None:
        if ipv6:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(self.max_connections)
        self.clients: Counter[str] = Counter()
        self.clients_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        client = str(client_address[0])
        with self.clients_lock:
            admitted = (self.per_client is None or self.clients[client] < self.per_client) and self.slots.acquire(False)
            if admitted:
                self.clients[client] += 1
        if not admitted:
            request.close()  # no TLS goodbye: the handshake never happened
            return
        deadline = threading.Timer(self.connection_seconds, close, args=(request,))
        deadline.daemon = True
        deadline.start()

        def served() -> None:
            try:
                self.process_request_thread(request, client_address)
            finally:
                deadline.cancel()
                self.slots.release()
                self._leave(client)

        threading.Thread(target=served, name=f"{type(self).__name__}-request", daemon=True).start()

    def _leave(self, client: str) -> None:
        with self.clients_lock:
            self.clients[client] -= 1
            if self.clients[client] <= 0:
                del self.clients[client]

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("a connection from %s failed", client_address, exc_info=True)  # a failed handshake, a reset, a deadline


def close(connection: Any) -> None:
    """End ``connection`` from another thread: its reads and writes fail at once, and its thread finishes."""
    with contextlib.suppress(OSError):  # closed already
        connection.shutdown(socket.SHUT_RDWR)
