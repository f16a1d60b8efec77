"""The operator's /metrics behind the API server's reviews (``finetune_operator.metrics_server``): who gets what answer,
what is cached, and a real HTTPS exchange on localhost. The reviews against a real HTTP API (the emulator) and the
operator's entrypoint serving them: tests/integration/test_metrics_auth.py and test_operator.py."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import prometheus_client
import pytest

from finetune_operator.metrics_server import CACHE_SECONDS, CACHE_SIZE, TokenReviewer, serve

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
        reviewer(f"forged-{i}")
    assert len(reviewer._answers) == CACHE_SIZE


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
