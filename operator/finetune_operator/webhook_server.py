"""The admission webhook's HTTPS server for Kopf: on cert-manager's certificate when mounted, else on a self-signed
one of our own (``certificates.SelfSignedTLS``, its CA published into the webhook configuration); every answer to a
malformed review a refusal, and what any pod may send it bounded in connections, time and bytes
(``GuardedWebhookServer``); and the server that never listens, for a webhook turned off.

``handlers.configure`` picks one of them for ``settings.admission.server``; the checks themselves live in
``admission`` and the ``validate`` handler.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import kopf
from aiohttp import web

from finetune_operator import admission, naming
from finetune_operator.certificates import SelfSignedTLS
from finetune_operator.k8s import Kube
from finetune_operator.reconcile import Reconciler

READ_SECONDS: Final = 10.0
"""How long a review's body may take to arrive once its headers have: the API server sends it at once and gives up on
the webhook after ``timeoutSeconds`` (at most 30). Kopf restarts its server on a renewed certificate and first waits up
to a minute for requests in flight, its port closed: a client that never finished a body would take the webhook away."""
MAX_CONNECTIONS: Final = 64
"""Connections open at once; one more is closed once its TLS handshake is done. Each holds about 300 KiB of TLS
buffers: without a bound, some 2,000 idle connections from any pod took the operator past its memory limit. The API
servers use a few each, one per admission call in flight."""
IDLE_SECONDS: Final = 120.0
"""A connection with no request, or an unfinished one, is closed after this long (aiohttp's default: an hour). Longer
than the API server's 90 s for idle connections, so that it closes them first and never sends on a closing one."""
HANDSHAKE_SECONDS: Final = 10.0
"""A TLS handshake not done by then is given up (asyncio's default: a minute)."""


async def listen_nowhere(fn: Any) -> AsyncIterator[Any]:
    """The admission "server" when FINETUNE_OPERATOR_WEBHOOK_PORT is 0: it serves nothing until the operator stops."""
    nothing: tuple[dict[str, Any], ...] = ()
    await asyncio.Event().wait()
    for config in nothing:  # an async generator that yields nothing, as Kopf's servers are generators
        yield config


def https_server(reconciler: Reconciler, memo: kopf.Memo) -> kopf.WebhookServer:
    """Kopf's HTTPS server for ``validate``: on cert-manager's certificate when mounted, else on one of our own."""
    operator = reconciler.settings
    common: dict[str, Any] = {"port": operator.webhook_port, "host": operator.webhook_host}
    if operator.webhook_cert_dir:
        directory = Path(operator.webhook_cert_dir)
        return GuardedWebhookServer(**common, certfile=directory / "tls.crt", pkeyfile=directory / "tls.key")
    kube = reconciler.kube
    if not isinstance(kube, Kube):
        raise kopf.PermanentError("the webhook's own certificate needs a Kubernetes client to publish its CA")
    publish = functools.partial(kube.set_webhook_ca_bundle, operator.webhook_configuration, naming.WEBHOOK_NAME)
    tls = SelfSignedTLS(operator.webhook_host, Path(tempfile.mkdtemp(prefix="finetune-webhook-")), publish)
    memo["webhook_tls"] = tls
    # Certificate and key in one file (replaced atomically on renewal): Kopf restarts its server when it changes.
    return GuardedWebhookServer(**common, certfile=tls.certfile, pkeyfile=tls.certfile, cafile=tls.cafile)


class GuardedWebhookServer(kopf.WebhookServer):
    """Kopf's HTTPS server, whose every answer to a JSON body is an AdmissionReview. Kopf turns a request it cannot
    take apart (no ``request``, an ``object`` that is a list or null, ``metadata`` a string) into an HTTP 500 or 400
    and a traceback in the log; here it is a refusal naming what is wrong, as the API server expects an answer."""

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async def guarded(request: Any, **kwargs: Any) -> Any:
            try:
                return await fn(request, **kwargs)
            except Exception as exc:  # what Kopf raises, or trips over, on a malformed review
                return admission.malformed_review_answer(request, exc)

        async def serve(request: web.Request) -> web.Response:
            return await self._serve(guarded, request)

        # Kopf's serving loop (a new server whenever the certificate files change), on an aiohttp set up here: Kopf's
        # takes aiohttp's defaults (1 MiB bodies, connections kept an hour, as many as come) and cannot be told otherwise.
        while True:
            cadata, context = self._build_ssl()
            app = web.Application(client_max_size=admission.MAX_REVIEW_BYTES)  # the API server's largest review
            app.add_routes([web.post(f"{(self.path or '').rstrip('/')}/{{id:.*}}", serve)])
            runner = web.AppRunner(app, handle_signals=False, keepalive_timeout=IDLE_SECONDS, shutdown_timeout=READ_SECONDS)
            await runner.setup()
            listening: asyncio.AbstractServer | None = None
            try:
                port, server = self.port or self._allocate_free_port(), runner.server
                assert server is not None  # set up above
                listening = await asyncio.get_running_loop().create_server(
                    functools.partial(_Capped, server),
                    self.addr or None,
                    port,
                    ssl=context,
                    ssl_handshake_timeout=HANDSHAKE_SECONDS if context else None,
                    reuse_address=True,
                    reuse_port=True,
                )
                host = self.host or self._get_accessible_addr(self.addr)
                config: dict[str, Any] = {"url": self._build_url("https" if context else "http", host, port, self.path or "")}
                if cadata is not None:
                    config["caBundle"] = base64.b64encode(cadata).decode("ascii")
                yield config
                await _until_changed(
                    [path for path in (self.certfile, self.pkeyfile, self.cafile) if path], self.file_check_interval
                )
            finally:
                if listening is not None:
                    listening.close()
                await runner.cleanup()  # waits up to READ_SECONDS for requests in flight

    @staticmethod
    async def _serve(fn: Any, request: web.Request) -> web.Response:
        # Kopf's own _serve knows only JSONDecodeError: a body nested past Python's recursion limit, or not
        # UTF-8, was an HTTP 500 and a traceback. Read and parsed here; Kopf's part starts at ``fn``.
        try:  # aiohttp's keep-alive timer does not run while a request is handled: nothing else ends this read
            body = await asyncio.wait_for(request.read(), READ_SECONDS)
        except asyncio.TimeoutError:
            return web.Response(status=408, text=f"the request body did not arrive within {READ_SECONDS:g} seconds\n")
        try:
            review = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            detail = (str(exc).splitlines() or [""])[0][:200]
            say = f"the request body is not a JSON AdmissionReview: {type(exc).__name__}: {detail}\n"
            return web.Response(status=400, text=say)
        sslpeer = request.transport.get_extra_info("peercert") if request.transport else None
        answer = await fn(review, webhook=request.match_info.get("id"), sslpeer=sslpeer, headers=dict(request.headers))
        return web.json_response(answer)


class _Capped(asyncio.Protocol):
    """A connection to aiohttp's ``server`` while fewer than ``MAX_CONNECTIONS`` are open, else closed at once; counted
    when the TLS handshake is done, as a burst of handshakes all begun under the bound would all be let in."""

    def __init__(self, server: web.Server) -> None:
        self.server: web.Server = server
        self.inner: asyncio.Protocol | None = None

    def connection_made(self, transport: Any) -> None:
        if len(self.server.connections) >= MAX_CONNECTIONS:
            transport.abort()
            return
        self.inner = inner = self.server()
        inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self.inner is None else self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


async def _until_changed(paths: list[Any], interval: float) -> None:
    """Return once the files at ``paths`` hold something else (Kopf's way: mounted Secrets change without events)."""

    def digest() -> bytes:
        return hashlib.sha256(b"".join(Path(path).read_bytes() for path in paths)).digest()

    first = digest()
    while digest() == first:
        await asyncio.sleep(interval)
