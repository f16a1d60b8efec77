"""The operator's /healthz (``liveness``) met with real sockets: what it answers (nothing but ``ok`` / ``not ok``),
when it says alive (``KopfAlive``, followed by ``handlers._run_kopf`` around a stand-in for ``kopf.operator``), and
what any pod may hold of it (connections, time, bytes). Through the whole operator: tests/integration/test_operator.py.
Kopf's own endpoint, which this replaces, answered ``{"jobs": N}`` to anyone and kept every connection an hour."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from finetune_operator import handlers, liveness
from finetune_operator.liveness import KopfAlive

PATH = "/healthz"


class Alive:
    """A check whose answer the test sets: None (alive) or why not."""

    def __init__(self) -> None:
        self.why: str | None = None

    def __call__(self) -> str | None:
        return self.why


@pytest.fixture
def check() -> Alive:
    return Alive()


@pytest.fixture
def port(check: Alive) -> Iterator[int]:
    server = liveness.serve(liveness.Endpoint("127.0.0.1", 0, PATH), check)
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    connection.settimeout(5)
    return connection


def ask(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    """The whole answer to ``request`` (read until the server closes; b"" when it closed without one)."""
    with connect(port, source) as connection:
        with contextlib.suppress(OSError):  # closed while the request was still going out
            connection.sendall(request)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):
                answer += chunk
        return answer


def get(method: str = "GET", path: str = PATH, extra: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() + extra + b"\r\n"


def parts(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# ------------------------------------------------------------------------------------ what it answers
@pytest.mark.parametrize(
    ("why", "status", "body"),
    [
        (None, 200, b"ok\n"),
        ("Kopf's event loop did not run a callback within 3 s (blocked)", 500, b"not ok\n"),
        ("Kopf is not running", 500, b"not ok\n"),
    ],
)
def test_the_answer_is_one_fixed_line(port: int, check: Alive, why: str | None, status: int, body: bytes) -> None:
    """Kopf's endpoint answered its probe handlers' results (the cluster-wide job count) to any pod: nothing now."""
    check.why = why
    got, headers, text = parts(ask(port, get()))
    assert (got, text) == (status, body)
    assert headers["content-type"] == "text/plain; charset=utf-8" and headers["server"] == "finetune-operator"


def test_why_it_is_not_alive_is_logged_once(port: int, check: Alive, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=liveness.__name__)
    check.why = "Kopf is not running"
    for _ in range(3):
        ask(port, get())
    check.why = None
    ask(port, get())
    said = [record.getMessage() for record in caplog.records if record.name == liveness.__name__]
    assert said == ["liveness: not alive: Kopf is not running", "liveness: alive again"]


def test_head_is_answered_without_a_body(port: int) -> None:
    got, headers, body = parts(ask(port, get("HEAD")))
    assert (got, headers["content-length"], body) == (200, "3", b"")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_methods_other_than_get_and_head_are_405(port: int, check: Alive, method: str) -> None:
    check.why = "never asked"
    got, headers, body = parts(ask(port, get(method)))
    assert (got, headers["allow"], body) == (405, "GET, HEAD", b"GET or HEAD only\n")


@pytest.mark.parametrize("path", ["/", "/healthz/", "/metrics", "/healthz/../metrics"])
def test_other_paths_are_404(port: int, path: str) -> None:
    assert parts(ask(port, get(path=path)))[0] == 404


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (b"GET /" + b"a" * 1_000_000 + b" HTTP/1.1\r\n\r\n", 414),  # a 1 MB request line
        (get(extra=b"X-Big: " + b"a" * 8_000 + b"\r\n"), 431),  # one header past the head's bound
        (get(extra=b"".join(b"X-%d: aaaaaaaaaaaaaaaa\r\n" % i for i in range(300))), 431),  # many small ones
    ],
)
def test_a_request_head_past_its_bound_is_refused(port: int, request_: bytes, status: int) -> None:
    assert parts(ask(port, request_))[0] == status


# ------------------------------------------------------------------------------------ what a pod may hold
def test_connections_beyond_one_clients_share_are_closed_and_the_kubelet_still_gets_in(port: int) -> None:
    """A pod holding every slot would have the kubelet's probe refused and the operator restarted: one address gets
    PER_CLIENT, another (the node's) is still answered."""
    held = [connect(port) for _ in range(liveness.PER_CLIENT)]
    try:
        time.sleep(0.3)  # accepted and counted
        assert ask(port, get()) == b""  # closed at once, nothing read
        assert parts(ask(port, get(), source="127.0.0.2"))[0] == 200
    finally:
        for connection in held:
            connection.close()


def test_connections_beyond_the_cap_are_closed(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liveness._Server, "max_connections", 3)  # read by each new server
    monkeypatch.setattr(liveness._Server, "per_client", None)
    server = liveness.serve(liveness.Endpoint("127.0.0.1", 0, PATH), lambda: None)
    held = [connect(server.server_port, f"127.0.0.{i + 2}") for i in range(3)]
    try:
        time.sleep(0.3)
        assert ask(server.server_port, get(), source="127.0.0.9") == b""
        held.pop().close()
        time.sleep(0.3)  # its thread has finished
        assert parts(ask(server.server_port, get(), source="127.0.0.9"))[0] == 200
    finally:
        for connection in held:
            connection.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("drip", [False, True], ids=["silent", "a-byte-at-a-time"])
def test_a_half_sent_request_is_closed_at_the_deadline(check: Alive, monkeypatch: pytest.MonkeyPatch, drip: bool) -> None:
    """A socket timeout bounds each read only: a byte every quarter second held a thread and its buffers for ever."""
    monkeypatch.setattr(liveness._Server, "connection_seconds", 1.0)
    server = liveness.serve(liveness.Endpoint("127.0.0.1", 0, PATH), check)
    try:
        with connect(server.server_port) as connection:
            started = time.monotonic()
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            answer = b""
            try:
                while time.monotonic() - started < 4 and not answer:
                    if drip:
                        connection.sendall(b"a")
                    connection.settimeout(0.25)
                    try:
                        answer = connection.recv(4096) or b"closed"
                    except TimeoutError:
                        continue
            except OSError:  # reset
                answer = b"closed"
            assert answer == b"closed" and time.monotonic() - started < 2.5
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------ when it says alive
def _loop_in_thread() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return loop


def test_kopf_alive_follows_its_loop() -> None:
    alive, loop = KopfAlive(ping_seconds=0.3), _loop_in_thread()
    try:
        assert alive() == "Kopf is not running"
        alive.attach(loop)
        assert alive() == "Kopf's start-up handlers have not finished"
        alive.ready.set()
        assert alive() is None
        loop.call_soon_threadsafe(time.sleep, 1.0)  # a handler that blocks the loop: Kopf is wedged
        started = time.monotonic()
        assert alive() == "Kopf's event loop did not run a callback within 0.3 s (blocked)"
        assert time.monotonic() - started < 1.0
        time.sleep(1.0)
        assert alive() is None
        alive.detach()
        assert alive() == "Kopf is not running" and not alive.ready.is_set()
    finally:
        loop.call_soon_threadsafe(loop.stop)


def test_a_closed_loop_is_not_alive() -> None:
    alive, loop = KopfAlive(), asyncio.new_event_loop()
    alive.attach(loop)
    alive.ready.set()
    loop.close()
    assert alive() == "Kopf's event loop is closed"


def test_run_kopf_is_alive_from_kopfs_ready_flag_until_it_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """``handlers._run_kopf``: not alive while the start-up handlers run, alive once Kopf raises its ready flag, not
    alive when its loop is blocked, and not once it has returned."""
    alive, seen, go = KopfAlive(ping_seconds=0.3), [], threading.Event()

    async def operator(ready_flag: threading.Event, **options: Any) -> None:
        assert options == {"standalone": True}
        seen.append(alive())  # the start-up handlers
        ready_flag.set()
        await asyncio.sleep(0)
        await asyncio.to_thread(lambda: seen.append(alive()))  # running
        go.set()
        time.sleep(0.6)  # wedged

    monkeypatch.setattr(handlers.kopf, "operator", operator)
    during = threading.Thread(target=lambda: go.wait(5) and seen.append(alive()))
    during.start()
    handlers._run_kopf(alive, standalone=True)
    during.join()
    blocked = "Kopf's event loop did not run a callback within 0.3 s (blocked)"
    assert seen == ["Kopf's start-up handlers have not finished", None, blocked]
    assert alive() == "Kopf is not running"


# ------------------------------------------------------------------------------------ --liveness
@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("http://0.0.0.0:8081/healthz", ("0.0.0.0", 8081, "/healthz")),  # the image's
        ("http://127.0.0.1:9000/live/z", ("127.0.0.1", 9000, "/live/z")),
        ("http://[::1]:8081/healthz", ("::1", 8081, "/healthz")),
        ("http://:8081", ("localhost", 8081, "/")),  # Kopf's defaults: localhost, port 80
        ("http://example/healthz", ("example", 80, "/healthz")),
    ],
)
def test_liveness_urls_are_read_as_kopf_read_them(url: str, where: tuple[str, int, str]) -> None:
    assert liveness.endpoint(url) == where


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://0.0.0.0:8081/healthz", "not an http:// URL"),
        ("0.0.0.0:8081", "not an http:// URL"),
        ("http://0.0.0.0:99999/healthz", "out of range"),
        ("http://0.0.0.0:port/healthz", "ould not be cast"),
        ("ftp://" + "a" * 500, "aaa..."),
    ],
)
def test_a_bad_liveness_url_is_one_line_naming_the_flag(url: str, says: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers.kopf, "operator", None)  # never reached
    with pytest.raises(SystemExit) as exited:
        handlers.main([f"--liveness={url}"])
    message = str(exited.value)
    assert message.startswith("finetune-operator: --liveness=") and says in message
    assert "\n" not in message and "http://HOST:PORT/PATH" in message and len(message) < 250


def test_a_port_taken_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers.kopf, "operator", None)
    with socket.create_server(("127.0.0.1", 0)) as taken, pytest.raises(SystemExit) as exited:
        handlers.main([f"--liveness=http://127.0.0.1:{taken.getsockname()[1]}/healthz"])
    message = str(exited.value)
    assert message.startswith("finetune-operator: --liveness: cannot listen on 127.0.0.1:") and "\n" not in message
