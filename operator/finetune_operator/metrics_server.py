"""The operator's ``/metrics`` endpoint: ``serve(port, auth=...)``.

With ``auth`` (``FINETUNE_OPERATOR_METRICS_AUTH``, on by default) it is what controller-runtime's secure metrics
are: HTTPS on a certificate the operator makes itself (``certificates.issue``; a scraper skips its verification or
trusts nothing: the CA never leaves the pod), and a request must carry a bearer token that the API server
authenticates (a TokenReview) and authorises to ``get`` the non-resource URL ``/metrics`` (a SubjectAccessReview),
as the chart's ``metrics-reader`` ClusterRole grants it. Without a token: 401; a token not allowed: 403; the API
server unreachable: 503. Why: the per-job series name every tenant's jobs (namespace, name, phase), and a plain
HTTP port is open to every pod of the cluster. Answers are kept ``CACHE_SECONDS`` per token (a Prometheus scrapes
every few seconds; each review is an API request), at most ``CACHE_SIZE`` tokens; tokens never allowed before are
reviewed at most ``REVIEWS_PER_SECOND`` (429 beyond).

Without ``auth``: plain HTTP, for a cluster that puts its own authenticating proxy or mesh in front.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from finetune_operator import certificates
from finetune_operator.bounded_http import BoundedServer, QuietHandler

__all__ = ["CACHE_SECONDS", "CACHE_SIZE", "METRICS_PATH", "TokenReviewer", "kube_reviews", "metrics_app", "serve", "serve_once"]

log = logging.getLogger(__name__)

METRICS_PATH: Final = "/metrics"
CACHE_SECONDS: Final = 60.0
CACHE_SIZE: Final = 256
RENEWAL_CHECK_SECONDS: Final = 3600.0
CONNECTION_SECONDS: Final = 30.0
"""A connection is closed this long after it was accepted, whatever it is doing (a scrape takes milliseconds)."""
MAX_CONNECTIONS: Final = 16
"""Connections served at once; one more is closed at once. A Prometheus or two scrape a few at a time."""
REVIEW_TIMEOUT: Final = (5, 10)
"""(connect, read) seconds of a review's request to the API server: a stalled API server is a 503, not a hung scrape."""
UNAVAILABLE: Final = 503
TOO_MANY: Final = 429
REVIEWS_PER_SECOND: Final = 5
REVIEW_BURST: Final = 10
"""Reviews of tokens never allowed before, at most (a token bucket; client-go's default rate for a client): each is an
API request on the operator's ServiceAccount, and a flood of made-up tokens from any pod would have the API server
throttle the operator's own requests. Beyond it: 429, nothing asked. A token allowed before is always reviewed."""

Authenticate = Callable[[str], Mapping[str, Any] | None]
"""A bearer token → the user the API server says it is (TokenReview's ``status.user``), None when it is no one."""
Authorize = Callable[[Mapping[str, Any]], bool]
"""A user → whether it may ``get`` ``/metrics`` (SubjectAccessReview's ``status.allowed``)."""


class TokenReviewer:
    """A bearer token → the HTTP status its request gets (200, 401, 403; 503 when the API server did not answer, which
    is not cached). Allowed tokens and refused ones are kept apart, each least recently used first out: a flood of
    made-up tokens (any pod can send them) cannot push a scraper's answer out and make every scrape a review again."""

    def __init__(self, authenticate: Authenticate, authorize: Authorize, clock: Callable[[], float] = time.monotonic) -> None:
        self.authenticate, self.authorize, self.clock = authenticate, authorize, clock
        self._allowed: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._refused: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._budget, self._budget_at = float(REVIEW_BURST), clock()

    def __call__(self, token: str) -> int:
        key = hashlib.sha256(token.encode()).hexdigest()  # the token itself is never kept
        now = self.clock()
        with self._lock:
            for answers in (self._allowed, self._refused):
                cached = answers.get(key)
                if cached is not None and cached[1] > now:
                    answers.move_to_end(key)
                    return cached[0]
            if key not in self._allowed and not self._spend(now):  # a scraper's expired answer is renewed regardless
                return TOO_MANY
        try:
            user = self.authenticate(token)
            status = 401 if user is None else (200 if self.authorize(user) else 403)
        except Exception as e:  # the API server unreachable, throttling, our RBAC missing: say so, keep nothing
            detail = (str(e).splitlines() or [""])[0][:200]
            log.warning("metrics: cannot review a scraper's token: %s: %s", type(e).__name__, detail)
            return UNAVAILABLE
        with self._lock:
            answers = self._allowed if status == 200 else self._refused
            answers[key] = (status, now + CACHE_SECONDS)
            answers.move_to_end(key)
            while len(answers) > CACHE_SIZE:
                answers.popitem(last=False)
        return status

    def _spend(self, now: float) -> bool:
        """Take one review from the bucket (refilled at ``REVIEWS_PER_SECOND``, up to ``REVIEW_BURST``); False if empty."""
        self._budget = min(float(REVIEW_BURST), self._budget + (now - self._budget_at) * REVIEWS_PER_SECOND)
        self._budget_at = now
        if self._budget < 1:
            return False
        self._budget -= 1
        return True


def kube_reviews(api_client: Any) -> tuple[Authenticate, Authorize]:
    """The TokenReview and SubjectAccessReview calls on ``api_client`` (the operator's ClusterRole creates both)."""
    import kubernetes

    authn = kubernetes.client.AuthenticationV1Api(api_client)
    authz = kubernetes.client.AuthorizationV1Api(api_client)

    client = kubernetes.client

    def authenticate(token: str) -> Mapping[str, Any] | None:
        review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        reviewed = authn.create_token_review(review, _request_timeout=REVIEW_TIMEOUT)
        status = api_client.sanitize_for_serialization(reviewed).get("status") or {}
        return (status.get("user") or {}) if status.get("authenticated") else None

    def authorize(user: Mapping[str, Any]) -> bool:
        spec = client.V1SubjectAccessReviewSpec(
            user=user.get("username", ""),
            uid=user.get("uid"),
            groups=user.get("groups"),
            extra=user.get("extra"),
            non_resource_attributes=client.V1NonResourceAttributes(path=METRICS_PATH, verb="get"),
        )
        review = client.V1SubjectAccessReview(spec=spec)
        reviewed = authz.create_subject_access_review(review, _request_timeout=REVIEW_TIMEOUT)
        status = api_client.sanitize_for_serialization(reviewed).get("status") or {}
        return bool(status.get("allowed"))

    return authenticate, authorize


_REASONS: Final = {401: "Unauthorized", 403: "Forbidden", TOO_MANY: "Too Many Requests", UNAVAILABLE: "Service Unavailable"}
_SAY: Final = {
    401: b"a bearer token is required (a ServiceAccount allowed to get the non-resource URL /metrics)\n",
    403: b"this token may not get the non-resource URL /metrics (bind the metrics-reader ClusterRole)\n",
    TOO_MANY: b"too many new tokens to review at once; try again in a second\n",
    UNAVAILABLE: b"the API server could not review the token; try again\n",
}


def metrics_app(registry: CollectorRegistry, review: Callable[[str], int] | None) -> Callable[..., Iterable[bytes]]:
    """prometheus_client's WSGI app behind ``review`` (None: no authentication)."""
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if review is not None:
            scheme, _, token = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
            status = review(token.strip()) if scheme.lower() == "bearer" and token.strip() else 401
            if status != 200:
                headers = [("Content-Type", "text/plain; charset=utf-8")]
                if status == 401:
                    headers.append(("WWW-Authenticate", 'Bearer realm="finetune-operator metrics"'))
                elif status == TOO_MANY:
                    headers.append(("Retry-After", "1"))
                start_response(f"{status} {_REASONS[status]}", headers)
                return [_SAY[status]]
        return exposition(environ, start_response)  # type: ignore[no-any-return]

    return app


class _Server(BoundedServer):
    """``bounded_http``'s server with the bounds of /metrics."""

    max_connections, connection_seconds = MAX_CONNECTIONS, CONNECTION_SECONDS


_served: list[int] = []
_serving = threading.Lock()


def serve_once(port: int, registry: CollectorRegistry, review: Callable[[str], int] | None) -> bool:
    """``serve`` on ``port`` once per process (Kopf runs the start-up handlers of each of its registries); False when
    ``port`` is 0 (off) or it is served already."""
    with _serving:
        if port == 0 or _served:
            return False
        serve(port, registry, review)
        _served.append(port)
        return True


def serve(
    port: int,
    registry: CollectorRegistry,
    review: Callable[[str], int] | None,
    *,
    host: str = "",
    tls_name: str = "localhost",
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> ThreadingWSGIServer:
    """Start serving ``registry`` on ``host:port`` in a daemon thread; HTTPS behind ``review`` when it is given, on a
    certificate for ``tls_name`` renewed before it expires. Returns the server (``server_port``; ``shutdown()``)."""
    server = _Server((host, port), QuietHandler)
    server.set_app(metrics_app(registry, review))
    if review is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            issued = _load(context, tls_name, clock())
            server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        except BaseException:  # the port is bound already: left open, a retry would meet 'address already in use'
            server.server_close()
            raise

        def renew() -> None:
            nonlocal issued
            while True:
                time.sleep(RENEWAL_CHECK_SECONDS)
                if issued.renewal_due(clock()):
                    try:
                        issued = _load(context, tls_name, clock())  # new handshakes get the new certificate
                    except Exception as e:  # a full disk: try again next hour, the current one has a month left
                        log.warning("metrics: the certificate was not renewed: %s: %s", type(e).__name__, e)

        threading.Thread(target=renew, name="metrics-tls-renewal", daemon=True).start()
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def _load(context: ssl.SSLContext, name: str, now: datetime) -> certificates.Issued:
    """A new certificate and key for ``name`` into ``context``. ssl reads a key only from a file: it is written into a
    private folder (0700, the file 0600) and removed once read, so that no key is left at rest (each server left its
    key behind in the temporary folder, a new one per start)."""
    issued = certificates.issue(name, now)
    with tempfile.TemporaryDirectory(prefix="finetune-metrics-tls-") as folder:
        chain = Path(folder) / "tls.pem"
        chain.touch(mode=0o600)
        chain.write_bytes(issued.chain)
        context.load_cert_chain(chain)
    return issued
