"""The operator's liveness endpoint (``--liveness``; the chart probes ``/healthz`` on 8081): ``serve(endpoint(url),
alive)``, and ``KopfAlive``, what alive means.

As controller-runtime's healthz: GET or HEAD of the path answers ``200 ok`` or ``500 not ok``, one line and nothing
else. The kubelet's probe carries no credentials and the port is open to every pod (the chart's NetworkPolicy), so the
answer reveals nothing: Kopf's own endpoint answered its probe handlers' results, the cluster-wide job count among
them, to anyone. Why it is not alive goes to the log, once each time it changes.

What any pod may send is bounded (``bounded_http``): Kopf's aiohttp kept every connection an hour, as many as came
(5,000 half-sent requests cost 67 MiB; some 38,000 passed the pod's memory limit).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple

from finetune_operator.bounded_http import BoundedServer, QuietHandler

log = logging.getLogger(__name__)

MAX_CONNECTIONS: Final = 64
PER_CLIENT: Final = 4
"""Connections at once, in all and from one address. The kubelet probes from its node's address, one or two at a time
(liveness and readiness): one pod taking every slot would have the probe refused and the operator restarted."""
CONNECTION_SECONDS: Final = 5.0
"""A connection is closed this long after it was accepted (the chart's probes give up after 5 s)."""
MAX_HEAD_BYTES: Final = 4096
"""Request line and headers together (the kubelet sends some 150 bytes); beyond: 414 or 431."""
PING_SECONDS: Final = 3.0
"""How long Kopf's event loop may take to run a callback before it counts as wedged: below the probe's 5 s."""
OK: Final = b"ok\n"
NOT_OK: Final = b"not ok\n"
EXPECTED: Final = "expected http://HOST:PORT/PATH, e.g. http://0.0.0.0:8081/healthz"

Check = Callable[[], str | None]
"""None when alive, else why not (for the log, never for the answer)."""


class Endpoint(NamedTuple):
    host: str
    port: int
    path: str


class LivenessError(ValueError):
    """A ``--liveness`` URL that cannot be served; one line naming the flag and the value."""


def endpoint(url: str) -> Endpoint:
    """``--liveness`` as Kopf read it: http only; no host: localhost; no port: 80; no path: ``/``."""
    shown = url if len(url) <= 80 else url[:77] + "..."
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port that is no number, or past 65535
        raise LivenessError(f"--liveness={shown}: {exc}; {EXPECTED}") from exc
    if parts.scheme != "http":
        raise LivenessError(f"--liveness={shown}: not an http:// URL; {EXPECTED}")
    return Endpoint(parts.hostname or "localhost", 80 if port is None else port, parts.path or "/")


class _Server(BoundedServer):
    """``bounded_http``'s server with the bounds of /healthz."""

    max_connections, per_client, connection_seconds = MAX_CONNECTIONS, PER_CLIENT, CONNECTION_SECONDS
    max_head_bytes = MAX_HEAD_BYTES


def serve(where: Endpoint, alive: Check) -> BoundedServer:
    """Start answering ``alive`` on ``where`` in a daemon thread; returns the server (``server_port``; ``shutdown()``)."""
    try:
        server = _Server((where.host, where.port), QuietHandler, ipv6=":" in where.host)
    except OSError as exc:  # the port taken, an address not this host's
        raise LivenessError(f"--liveness: cannot listen on {where.host}:{where.port}: {exc.strerror or exc}") from exc
    server.set_app(app(where.path, alive))
    threading.Thread(target=server.serve_forever, name="liveness", daemon=True).start()
    log.debug("serving liveness on %s:%d%s", where.host, server.server_port, where.path)
    return server


def app(path: str, alive: Check) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: ``path`` only, GET and HEAD only, ``ok`` or ``not ok``."""
    last: list[str | None] = [None]
    lock = threading.Lock()

    def answer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        if environ.get("PATH_INFO") != path:
            status, body, extra = "404 Not Found", b"not found\n", []
        elif method not in ("GET", "HEAD"):
            status, body, extra = "405 Method Not Allowed", b"GET or HEAD only\n", [("Allow", "GET, HEAD")]
        else:
            why = alive()
            with lock:
                if why != last[0]:
                    if why is None:
                        log.info("liveness: alive again")
                    else:
                        log.warning("liveness: not alive: %s", why)
                    last[0] = why
            status, body, extra = ("200 OK", OK, []) if why is None else ("500 Internal Server Error", NOT_OK, [])
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        start_response(status, [*headers, ("Cache-Control", "no-store"), ("Server", "finetune-operator"), *extra])
        return [b"" if method == "HEAD" else body]

    return answer


class KopfAlive:
    """Kopf is alive when its start-up handlers have run (``ready``, Kopf's ready flag), it has not stopped (``attach``
    until it returns), and its event loop runs a callback within ``PING_SECONDS``. Kopf's own endpoint ran in that loop
    and ran the probe handlers: a wedged loop did not answer (now a 500), and no handler of ours could fail."""

    def __init__(self, ping_seconds: float = PING_SECONDS) -> None:
        self.ready = threading.Event()
        self.ping_seconds = ping_seconds
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def detach(self) -> None:
        self._loop = None
        self.ready.clear()

    def __call__(self) -> str | None:
        loop = self._loop
        if loop is None:
            return "Kopf is not running"
        if not self.ready.is_set():
            return "Kopf's start-up handlers have not finished"
        pong = threading.Event()
        try:
            loop.call_soon_threadsafe(pong.set)
        except RuntimeError:  # closed
            return "Kopf's event loop is closed"
        if not pong.wait(self.ping_seconds):
            return f"Kopf's event loop did not run a callback within {self.ping_seconds:g} s (blocked)"
        return None
