"""The operator's /metrics behind the API server's reviews (``finetune_operator.metrics_server``): who gets what answer,
what is cached, and a real HTTPS exchange on localhost. The reviews against a real HTTP API (the emulator) and the
operator's entrypoint serving them: tests/integration/test_metrics_auth.py and test_operator.py."""

from __future__ import annotations

import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

from finetune_operator import metrics_server
from finetune_operator.metrics_server import CACHE_SECONDS, CACHE_SIZE, REVIEW_BURST, REVIEWS_PER_SECOND, TokenReviewer, serve

USERS = {"prometheus-token": {"username": "system:serviceaccount:monitoring:prometheus"}, "other-token": {"username": "eve"}}
READERS = {"system:serviceaccount:monitoring:prometheus"}


class Reviews:
    """The API server's answers, counted; ``down``: it does not answer."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.down = False

    def authenticate(self, token: str) -> Mapping[str, Any] | None:
        self.calls.append("TokenReview")
        if self.down:
            raise ConnectionRefusedError("connection refused")
        return USERS.get(token)

    def authorize(self, user: Mapping[str, Any]) -> bool:
        self.calls.append("SubjectAccessReview")
        return user["username"] in READERS


@pytest.mark.parametrize(
    ("token", "status", "calls"),
    [
        ("prometheus-token", 200, ["TokenReview", "SubjectAccessReview"]),
        ("other-token", 403, ["TokenReview", "SubjectAccessReview"]),  # someone, not allowed /metrics
        ("forged", 401, ["TokenReview"]),  # no one
    ],
)
def test_a_token_gets_what_the_api_server_says(token: str, status: int, calls: list[str]) -> None:
    reviews = Reviews()
    reviewer = TokenReviewer(reviews.authenticate, reviews.authorize)
    assert reviewer(token) == status
    assert reviewer(token) == status  # the second scrape: from the cache
    assert reviews.calls == calls


def test_answers_expire_and_the_cache_is_bounded() -> None:
    now = [0.0]
    reviews = Reviews()
    reviewer = TokenReviewer(reviews.authenticate, reviews.authorize, clock=lambda: now[0])
    reviewer("prometheus-token")
    now[0] += CACHE_SECONDS + 1  # a revoked binding is noticed within a minute
    reviewer("prometheus-token")
    assert reviews.calls.count("TokenReview") == 2
    for i in range(CACHE_SIZE + 10):  # a flood of made-up tokens cannot grow it without end
        now[0] += 1  # within the review rate
        reviewer(f"forged-{i}")
    assert len(reviewer._refused) == CACHE_SIZE


def test_an_api_server_that_does_not_answer_is_503_and_not_remembered() -> None:
    reviews = Reviews()
    reviewer = TokenReviewer(reviews.authenticate, reviews.authorize)
    reviews.down = True
    assert reviewer("prometheus-token") == 503
    reviews.down = False
    assert reviewer("prometheus-token") == 200


@pytest.fixture
def https() -> Iterator[str]:
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("finetune_test_total", "A series only readers see.", registry=registry).inc()
    reviews = Reviews()
    server = serve(0, registry, TokenReviewer(reviews.authenticate, reviews.authorize), host="127.0.0.1")
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def _get(url: str, token: str | None = None) -> tuple[int, str, Mapping[str, str]]:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # as a ServiceMonitor's insecureSkipVerify
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


@pytest.mark.parametrize(
    ("token", "status", "says"),
    [
        (None, 401, "a bearer token is required"),
        ("forged", 401, "a bearer token is required"),
        ("other-token", 403, "may not get the non-resource URL /metrics"),
        ("prometheus-token", 200, "finetune_test_total 1.0"),
    ],
)
def test_metrics_over_https_only_to_an_allowed_token(https: str, token: str | None, status: int, says: str) -> None:
    got, body, headers = _get(f"https://{https}/metrics", token)
    assert (got, says in body) == (status, True), body
    assert ("finetune_test_total" in body) is (status == 200)
    if status == 401:
        assert headers["WWW-Authenticate"].startswith("Bearer")


def test_no_key_is_left_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ssl loads a key only from a file: it is removed once read, at the start and at each renewal (every server
    left its private key in a folder of its own under /tmp, 194 of them on the development machine)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(metrics_server, "RENEWAL_CHECK_SECONDS", 0.01)
    now = [datetime(2026, 1, 1, tzinfo=timezone.utc)]
    registry = prometheus_client.CollectorRegistry()
    reviews = Reviews()
    server = serve(0, registry, TokenReviewer(reviews.authenticate, reviews.authorize), host="127.0.0.1", clock=lambda: now[0])
    try:
        first = ssl.get_server_certificate(("127.0.0.1", server.server_port))
        now[0] += timedelta(days=3650)  # past any renewal point: the next check renews
        deadline = time.monotonic() + 10
        while ssl.get_server_certificate(("127.0.0.1", server.server_port)) == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ssl.get_server_certificate(("127.0.0.1", server.server_port)) != first  # renewed
        assert list(tmp_path.iterdir()) == []
    finally:
        server.shutdown()
        server.server_close()


def test_plain_http_gets_no_metrics(https: str) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{https}/metrics", timeout=10)


def test_without_review_it_is_plain_http() -> None:
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("finetune_open_total", "Plain.", registry=registry).inc()
    server = serve(0, registry, None, host="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            assert "finetune_open_total 1.0" in response.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def test_a_connection_that_never_says_hello_stops_no_scrape(https: str) -> None:
    """The TLS handshake runs in the request's thread: done in the accepting one, a silent TCP connection (any pod can
    open one) blocked every later scrape."""
    import socket

    host, port = https.split(":")
    with socket.create_connection((host, int(port)), timeout=5):
        got, body, _ = _get(f"https://{https}/metrics", "prometheus-token")
    assert got == 200 and "finetune_test_total 1.0" in body


# ------------------------------------------------------------------- the review's attacks on the first version
def test_an_error_with_no_message_is_a_503_not_a_500() -> None:
    def authenticate(token: str) -> Mapping[str, Any] | None:
        raise ConnectionResetError()  # str() is '': splitlines()[0] raised IndexError out of the reviewer

    assert TokenReviewer(authenticate, lambda user: True)("token") == 503


def test_a_flood_of_made_up_tokens_cannot_push_the_scrapers_answer_out() -> None:
    reviews = Reviews()
    reviewer = TokenReviewer(reviews.authenticate, reviews.authorize)
    reviewer("prometheus-token")
    for i in range(CACHE_SIZE * 2):
        reviewer(f"forged-{i}")
    before = len(reviews.calls)
    assert reviewer("prometheus-token") == 200
    assert len(reviews.calls) == before  # still cached: refused tokens are kept apart


def test_a_flood_of_made_up_tokens_is_reviewed_at_a_bounded_rate() -> None:
    """Each unknown token cost a TokenReview, as fast as any pod could send them: the operator's own requests then met
    the API server's throttling of its ServiceAccount. Beyond the rate a token is 429, unreviewed; one allowed before
    is reviewed again whatever the flood, so that the scraper's expired answer is renewed."""
    now = [0.0]
    reviews = Reviews()
    reviewer = TokenReviewer(reviews.authenticate, reviews.authorize, clock=lambda: now[0])
    assert reviewer("prometheus-token") == 200
    now[0] += CACHE_SECONDS + 1
    answers = [reviewer(f"forged-{i}") for i in range(100)]
    assert answers.count(401) == reviews.calls.count("TokenReview") - 1 == REVIEW_BURST
    assert answers.count(429) == 100 - REVIEW_BURST
    assert reviewer("prometheus-token") == 200 and reviews.calls.count("TokenReview") == REVIEW_BURST + 2
    now[0] += 1
    assert [reviewer(f"later-{i}") for i in range(100)].count(401) == REVIEWS_PER_SECOND


def test_beyond_the_review_rate_a_scraper_is_told_to_come_back() -> None:
    app = metrics_server.metrics_app(prometheus_client.CollectorRegistry(), lambda token: 429)
    started: list[Any] = []
    body = b"".join(app({"HTTP_AUTHORIZATION": "Bearer new-token"}, lambda status, headers: started.append((status, headers))))
    assert started == [("429 Too Many Requests", [("Content-Type", "text/plain; charset=utf-8"), ("Retry-After", "1")])]
    assert body == b"too many new tokens to review at once; try again in a second\n"


def _tls(port: int) -> ssl.SSLSocket:
    import socket

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))


def test_a_client_dripping_its_request_is_cut_off_at_the_deadline(https: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket timeout bounds each read only: a byte every half second held a thread for ever."""
    import time

    from finetune_operator import metrics_server

    monkeypatch.setattr(metrics_server._Server, "connection_seconds", 1.0)
    started = time.monotonic()
    answer = _drip(_tls(int(https.split(":")[1])), until=started + 4)
    assert not answer.startswith(b"HTTP/1.0 200"), answer[:40]
    assert time.monotonic() - started < 3.5


def _drip(connection: ssl.SSLSocket, until: float) -> bytes:
    """A request sent a header byte at a time until ``until``, then finished; the answer (b"": cut off)."""
    import time

    try:
        connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        while time.monotonic() < until:
            connection.sendall(b"a")
            time.sleep(0.25)
        connection.sendall(b"\r\nAuthorization: Bearer prometheus-token\r\n\r\n")
        return connection.recv(4096)
    except OSError:
        return b""


def test_idle_connections_hold_a_bounded_number_of_threads(https: str) -> None:
    import socket
    import threading
    import time

    from finetune_operator.metrics_server import MAX_CONNECTIONS

    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", int(https.split(":")[1]))) for _ in range(200)]
    try:
        time.sleep(1)
        assert threading.active_count() - before <= 2 * MAX_CONNECTIONS  # a thread and a deadline each, at most
    finally:
        for connection in idle:
            connection.close()


def test_a_stalled_api_server_is_a_503_within_the_review_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import threading

    import kubernetes

    from finetune_operator import metrics_server

    monkeypatch.setattr(metrics_server, "REVIEW_TIMEOUT", (1, 1))
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog), never answers
    try:
        configuration = kubernetes.client.Configuration(host=f"http://127.0.0.1:{listener.getsockname()[1]}")
        configuration.retries = 0
        reviewer = TokenReviewer(*metrics_server.kube_reviews(kubernetes.client.ApiClient(configuration)))
        answers: list[int] = []
        scrape = threading.Thread(target=lambda: answers.append(reviewer("token")), daemon=True)
        scrape.start()
        scrape.join(8)
        assert answers == [503]
    finally:
        listener.close()


def _disk_full(*args: Any, **kwargs: Any) -> Any:
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize(("owner", "step"), [(metrics_server.certificates, "issue"), (Path, "write_bytes")])
def test_a_first_certificate_that_fails_closes_the_bound_port(owner: Any, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The port is bound before the first certificate is made: a failure there left it bound (a leaked socket), and
    Kopf's retry of the start-up handler met 'address already in use' on the same port for as long as it lived."""
    bound: list[Any] = []

    class Recorded(metrics_server._Server):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            bound.append(self)

    monkeypatch.setattr(metrics_server, "_Server", Recorded)
    registry = prometheus_client.CollectorRegistry()
    reviews = Reviews()
    with monkeypatch.context() as failing:
        failing.setattr(owner, step, _disk_full)
        with pytest.raises(OSError, match="No space left"):
            serve(0, registry, TokenReviewer(reviews.authenticate, reviews.authorize), host="127.0.0.1")
    assert len(bound) == 1
    assert bound[0].socket.fileno() == -1  # ``bound`` keeps the server alive: nothing but serve closes its socket
    server = serve(bound[0].server_port, registry, TokenReviewer(reviews.authenticate, reviews.authorize), host="127.0.0.1")
    server.shutdown()
    server.server_close()
