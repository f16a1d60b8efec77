"""The admission webhook's HTTPS server for Kopf: on cert-manager's certificate when mounted, else on a self-signed
one of our own (``certificates.SelfSignedTLS``, its CA published into the webhook configuration); every answer to a
malformed review a refusal (``GuardedWebhookServer``); and the server that never listens, for a webhook turned off.

``handlers.configure`` picks one of them for ``settings.admission.server``; the checks themselves live in
``admission`` and the ``validate`` handler.
"""

from __future__ import annotations

import asyncio
import functools
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

        async for config in super().__call__(guarded):
            yield config

    @staticmethod
    async def _serve(fn: Any, request: web.Request) -> web.Response:
        # Kopf's own _serve reads the body under aiohttp's 1 MiB limit (Kopf makes its Application inside __call__,
        # with no way to set it) and knows only JSONDecodeError: a body nested past Python's recursion limit, or not
        # UTF-8, was an HTTP 500 and a traceback. Read and parsed here; Kopf's part starts at ``fn``.
        request = request.clone(client_max_size=admission.MAX_REVIEW_BYTES)  # the API server's largest, before reading
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
