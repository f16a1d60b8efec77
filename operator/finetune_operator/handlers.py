"""Kopf handlers of the FineTuneJob operator: decorators, ``configure`` and ``main``, and nothing else.

Run it with::

    python -m finetune_operator.handlers --all-namespaces  # the image's entry point; leader election when
                                                           # FINETUNE_OPERATOR_LEADER_ELECTION=true
    kopf run -m finetune_operator.handlers --standalone --all-namespaces  # or --namespace=NS (repeatable)

The chart probes ``/healthz`` on 8081 (``--liveness``), served by ``liveness``, not by Kopf (whose ``--liveness``
answers the probe handlers' results to anyone): only ``ok`` or ``not ok``. Prometheus scrapes ``/metrics`` on
``FINETUNE_OPERATOR_METRICS_PORT``; the API server calls the admission webhook (``validate``) over HTTPS on
``FINETUNE_OPERATOR_WEBHOOK_PORT``, served by the server ``configure`` picks from ``webhook_server``.

Each handler hands its event to ``reconcile.Reconciler`` (the rules live there, unit-tested without Kopf)
and translates the outcome into Kopf's words: ``failures.Refused`` → ``kopf.PermanentError``;
``failures.Retry`` and API failures that may heal → ``kopf.TemporaryError`` with a delay.
FineTuneJob deleted: the children go with their owner references. The operator puts no finalizer on jobs, so
deleting a job or its namespace never waits for the operator.

Two or more replicas (``main`` with leader election on): every replica runs Kopf with ``WEBHOOK_REGISTRY`` (the
webhook and liveness), and only the holder of the Lease (``leadership``) also runs Kopf with every handler
in another thread, its webhook turned off, started and stopped by the election (``replication.leader_elector``).

Handlers return None: Kopf writes nothing into the status (its progress lives in ``finetune.dev/*``
annotations, since the structural schema would prune ``status.kopf``); status is written by merge
patches on the status subresource.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final, cast

import kopf

from finetune_operator import admission, liveness, metrics, naming, webhook_server
from finetune_operator.api.versions import GROUP, PLURAL, RAYJOB_GROUP, RAYJOB_PLURAL, RAYJOB_VERSION, VERSION
from finetune_operator.certificates import SelfSignedTLS
from finetune_operator.failures import ApiFailure, Refused, Retry, retry_delay
from finetune_operator.k8s import Kube
from finetune_operator.kubeclient import load_client
from finetune_operator.leadership import Fenced
from finetune_operator.metrics_server import TokenReviewer, kube_reviews, serve_once
from finetune_operator.reconcile import Reconciler
from finetune_operator.replication import leader_elector
from finetune_operator.settings import OperatorSettings, SettingsError
from finetune_operator.status_writer import EventSink, log_event

FTJ: Final = (GROUP, VERSION, PLURAL)
FINALIZER: Final = "finetune.dev/finalizer"
LIVENESS: Final = "http://0.0.0.0:8081/healthz"
RESYNC_SECONDS: Final = 60.0
CERTIFICATE_CHECK_SECONDS: Final = 60.0
EVENT_COMPONENT: Final = "kopf"  # the Events the resync round posts itself look like Kopf's (settings.posting)
log = logging.getLogger(__name__)
# What every replica serves, leader or not (see the module docstring); the default registry holds everything.
WEBHOOK_REGISTRY: Final = kopf.OperatorRegistry()


def _reconciler(memo: Any) -> Reconciler:
    reconciler = memo.get("ctx")
    if not isinstance(reconciler, Reconciler):
        raise kopf.PermanentError("the operator was not configured (the startup handler did not run)")
    return reconciler


def _event_sink(kube: Any) -> EventSink:
    """Events through Kopf inside its handlers; through the API from threads of our own (the resync round).

    Kopf's event queue is a context variable of each object's processing task only, so ``kopf.event`` raises
    LookupError anywhere else, even in a thread started with a copy of the startup handler's context.
    """

    def emit(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            kopf.event(kopf.Body(cast(kopf.RawBody, dict(obj))), type=type_, reason=reason, message=message)
            return
        except LookupError:
            if not isinstance(kube, (Kube, Fenced)):  # outside a running operator (tests, scripts): a log line
                log_event(obj, type_, reason, message)
                return
        try:
            kube.post_event(obj, type_, reason, message, component=EVENT_COMPONENT)
        except (ApiFailure, Retry) as exc:  # an Event is worth a log line, never a failed round (Retry: fenced)
            log.warning("could not post Event %s %s: %s", type_, reason, exc)

    return emit


@contextmanager
def _kopf_outcomes(retry: int) -> Iterator[None]:
    """The reconcile outcomes in Kopf's words (see the module docstring); ``retry`` is Kopf's retry count,
    so that the delay grows (``failures.retry_delay``) and honours a server's Retry-After."""
    try:
        yield
    except Refused as exc:
        raise kopf.PermanentError(str(exc)) from exc
    except ApiFailure as exc:
        if exc.status in (400, 422):  # never gets better by retrying
            raise kopf.PermanentError(str(exc)) from exc
        raise kopf.TemporaryError(str(exc), delay=retry_delay(retry, exc)) from exc
    except Retry as exc:
        raise kopf.TemporaryError(str(exc), delay=retry_delay(retry, exc)) from exc


@kopf.on.startup(registry=WEBHOOK_REGISTRY)
@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Kopf's settings and our reconciler, from the memo (tests, scripts) or the environment and kubeconfig."""
    reconciler = memo.get("ctx")
    if not isinstance(reconciler, Reconciler):
        try:
            operator = memo.get("settings") or OperatorSettings.from_env()
        except SettingsError as exc:
            raise kopf.PermanentError(f"bad operator settings: {exc}") from exc
        kube = memo.get("kube") or Kube(load_client())
        reconciler = Reconciler(kube, operator, emit=_event_sink(kube))
        memo["ctx"] = reconciler
    logging.getLogger("finetune_operator").setLevel(reconciler.settings.log_level_number)
    # No handler needs a finalizer; naming Kopf's lets it remove the one that earlier versions added.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="finetune.dev", key="last-handled-configuration"
    )
    # Watch only our RayJobs, server-side: a cluster may run thousands of other people's.
    settings.watching.label_selectors[RAYJOB_GROUP, RAYJOB_PLURAL] = (
        f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY},{naming.LABEL_JOB}"
    )
    # Reconnect watches every few minutes rather than trusting one stream forever behind load balancers.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    port = reconciler.settings.metrics_port
    if port and serve_once(port, metrics.REGISTRY, _metrics_review(reconciler.settings, memo)):
        how = "HTTPS, to tokens the API server allows" if reconciler.settings.metrics_auth else "plain HTTP, to anyone"
        log.info("serving Prometheus metrics on :%d/metrics (%s)", port, how)
    # Kopf refuses to start with admission handlers and no server: turned off, the webhook gets one that never listens.
    settings.admission.server = (
        webhook_server.https_server(reconciler, memo) if reconciler.settings.webhook_port else webhook_server.listen_nowhere
    )
    settings.admission.managed = None  # the chart or kustomize installs the configuration, with our choices


def _metrics_review(operator: OperatorSettings, memo: kopf.Memo) -> Callable[[str], int] | None:
    """Who may read /metrics (``metrics_server``): the API server's reviews of bearer tokens, on the operator's own
    credentials (the memo's ``metrics_review`` in tests); None when FINETUNE_OPERATOR_METRICS_AUTH is off."""
    if not operator.metrics_auth:
        return None
    review = memo.get("metrics_review")
    return review if callable(review) else TokenReviewer(*kube_reviews(load_client()))


@kopf.on.login(registry=WEBHOOK_REGISTRY)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Credentials as Kopf's default registry finds them (kubeconfig or the pod's service account): a registry of our
    own starts with none."""
    return kopf.login_via_client(**kwargs)


@kopf.on.resume(*FTJ)
@kopf.on.create(*FTJ)
@kopf.on.update(*FTJ)
@metrics.instrumented("reconcile")
def reconcile(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """Admit, create the children if missing, report Provisioning (or converge after a restart).

    Also on update (only ``runPolicy.suspend`` may change, the CEL rules hold the rest): Kopf decides
    "created" or "updated" from its diff-base annotation, which a delete + re-create under one name can
    leave behind from the old job, and an unfinished creation must not be dropped for that.
    """
    with _kopf_outcomes(retry):
        _reconciler(memo).reconcile(body)


@kopf.on.field(*FTJ, field="spec.runPolicy.suspend")
@metrics.instrumented("suspend")
def suspend_changed(body: kopf.Body, new: Any, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """Suspend or resume the RayJob."""
    with _kopf_outcomes(retry):
        _reconciler(memo).suspend_changed(body, bool(new))


@kopf.on.startup()
def start_resync(memo: kopf.Memo, **_: Any) -> None:
    """The safety net for lost watch events: every ``RESYNC_SECONDS`` each live job's children are checked and
    its RayJob mirrored again (``Reconciler.resync_all``). A thread of our own, not a Kopf timer: Kopf puts a
    finalizer on every object with a timer, and deleting a job must never wait for the operator."""
    reconciler, stop = _reconciler(memo), threading.Event()
    resync = metrics.instrumented("resync")(reconciler.resync_all)
    # Under leader election (``main``), only while the Lease is held: this Kopf may take a moment to stop.
    leading = memo.get("leading") or (lambda: True)

    def loop() -> None:
        # Rounds start every RESYNC_SECONDS, however long one takes: a stuck job is diagnosed within that period.
        started = time.monotonic()
        while not stop.wait(max(0.0, started + RESYNC_SECONDS - time.monotonic())):
            started = time.monotonic()
            if not leading():
                continue
            try:
                resync(reconciler.settings.namespaces)
            except Exception:  # a LIST that failed: log it, try again next round
                log.exception("resync round failed")

    memo["resync_stop"] = stop
    # Kopf's context (its settings) lives in context variables; its event queue does not reach this thread, so
    # Events posted from here (diagnoses, RayJobRecreated, phase changes it heals) go through the API (_event_sink).
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(loop,), name="finetune-resync", daemon=True).start()


@kopf.on.startup(registry=WEBHOOK_REGISTRY)
@kopf.on.startup()
def keep_webhook_certificate(memo: kopf.Memo, **_: Any) -> None:
    """Publish the operator's own webhook CA, then renew the certificate when due (``SelfSignedTLS.check``), in a
    thread that retries a failed publish every ``CERTIFICATE_CHECK_SECONDS``. Nothing to do on cert-manager's."""
    tls, stop = memo.get("webhook_tls"), threading.Event()
    if not isinstance(tls, SelfSignedTLS):
        return

    def loop() -> None:
        while True:
            try:
                tls.check()
                # Again every round: another replica's restart may have pruned this one's CA from the bundle.
                tls.publish(tls.bundle)
            except Exception:  # the API server refused or was unreachable: the current certificate is still valid
                log.exception("could not publish the webhook's CA; retrying in %ds", CERTIFICATE_CHECK_SECONDS)
            if stop.wait(CERTIFICATE_CHECK_SECONDS):
                return

    memo["webhook_tls_stop"] = stop
    threading.Thread(target=loop, name="finetune-webhook-tls", daemon=True).start()


@kopf.on.cleanup(registry=WEBHOOK_REGISTRY)
@kopf.on.cleanup()
def stop_threads(memo: kopf.Memo, **_: Any) -> None:
    """Stop the resync and certificate threads."""
    for key in ("resync_stop", "webhook_tls_stop"):
        stop = memo.get(key)
        if isinstance(stop, threading.Event):
            stop.set()


@kopf.on.validate(*FTJ, id=naming.WEBHOOK_PATH, operations=["CREATE", "UPDATE"], registry=WEBHOOK_REGISTRY)
@kopf.on.validate(*FTJ, id=naming.WEBHOOK_PATH, operations=["CREATE", "UPDATE"])
def validate(
    memo: kopf.Memo, operation: str | None = None, new: kopf.Body | None = None, old: kopf.Body | None = None, **_: Any
) -> None:
    """The admission webhook: at `kubectl apply`, refuse what the create handler would refuse, with the same lines
    (``admission.review``); on update, refuse any change but ``spec.runPolicy.suspend``."""
    lines = admission.review(operation or "", _raw(new), _raw(old), _reconciler(memo).settings)
    if lines:
        # 422 Unprocessable Entity, as for the API server's own validation; kubectl prints the message as it is.
        raise kopf.AdmissionError(admission.denial(lines), code=422)


def _raw(body: kopf.Body | None) -> dict[str, Any] | None:
    return None if body is None else {key: body[key] for key in body}


@kopf.on.event(*FTJ)
def forget(type: str | None, body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """Every event refreshes the job's series; a deleted job leaves the metrics. Not an on.delete handler: that would
    put a finalizer on every job, and deleting jobs (or their namespace) would hang whenever the operator is down."""
    if type == "DELETED":
        metrics.forget(meta.uid)
        metrics.JOB_SERIES.forget(meta.namespace, meta.name, meta.uid)
    elif memo.get("leading") is None or memo["leading"]():  # one that stepped down exports no job (``leader_elector``)
        metrics.observe_job(_raw(body) or {})


@kopf.on.event(
    RAYJOB_GROUP,
    RAYJOB_VERSION,
    RAYJOB_PLURAL,
    labels={naming.LABEL_MANAGED_BY: naming.MANAGED_BY, naming.LABEL_JOB: kopf.PRESENT},
)
@metrics.instrumented("rayjob-event")
def rayjob_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Mirror a RayJob's status into its FineTuneJob; recreate it when deleted under a live job."""
    rayjob = {key: body[key] for key in body}
    try:
        _reconciler(memo).rayjob_changed(type, rayjob)
    except (ApiFailure, Retry, Refused) as exc:
        # Kopf does not retry event handlers; the resync round will (a refusal is in the job's status already).
        logger.warning("could not mirror RayJob %s (retried within %ds): %s", rayjob["metadata"].get("name"), RESYNC_SECONDS, exc)


def _run_kopf(alive: liveness.KopfAlive, **options: Any) -> None:
    """``kopf.run(**options)``, ``alive`` following it (``liveness``): our /healthz instead of Kopf's, which answered
    the probe handlers' results to anyone and kept every connection an hour."""

    async def operate() -> None:
        alive.attach(asyncio.get_running_loop())
        try:
            await kopf.operator(ready_flag=alive.ready, **options)
        finally:
            alive.detach()

    with contextlib.suppress(asyncio.CancelledError):  # as kopf.run
        asyncio.run(operate())


def _run_replicated(settings: OperatorSettings, alive: liveness.KopfAlive) -> None:
    kube = Kube(load_client())
    identity = settings.leader_election_identity or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    scope: dict[str, Any] = {"clusterwide": not settings.namespaces, "namespaces": settings.namespaces}

    def run_kopf(memo: kopf.Memo, stop: threading.Event) -> None:
        kopf.run(standalone=True, stop_flag=stop, memo=memo, **scope)

    elector, stop = leader_elector(settings, kube, identity, run_kopf), threading.Event()
    campaign = threading.Thread(target=elector.run, args=(stop,), name="finetune-election", daemon=True)
    campaign.start()
    try:  # until SIGTERM: then the campaign steps down (the reconciling Kopf stops) and releases the Lease
        _run_kopf(alive, registry=WEBHOOK_REGISTRY, standalone=True, memo=kopf.Memo(settings=settings), **scope)
    finally:
        stop.set()
        campaign.join()


def main(argv: list[str] | None = None) -> None:
    """``python -m finetune_operator.handlers``: Kopf with namespaces, liveness and logging from the settings."""
    parser = argparse.ArgumentParser(prog="python -m finetune_operator.handlers", description="Run the FineTuneJob operator.")
    parser.add_argument(
        "--liveness", default=LIVENESS, metavar="URL", help=f"liveness endpoint, empty for none (default: {LIVENESS})"
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", action="append", default=[], metavar="NS", help="watch NS (repeatable)")
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    args = parser.parse_args(argv)
    alive = liveness.KopfAlive()
    try:
        settings = OperatorSettings.from_env()
        if args.namespace or args.all_namespaces:  # the arguments, as for `kopf run`, win over the variable
            settings = settings.replace(namespaces=tuple(args.namespace))
        where = liveness.endpoint(args.liveness) if args.liveness else None
    except (SettingsError, liveness.LivenessError) as exc:
        raise SystemExit(f"finetune-operator: {exc}") from exc
    logging.basicConfig(level=settings.log_level_number, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = None if where is None else liveness.serve(where, alive)
    except liveness.LivenessError as exc:
        raise SystemExit(f"finetune-operator: {exc}") from exc
    try:
        if settings.leader_election:
            _run_replicated(settings, alive)
        else:
            memo = kopf.Memo(settings=settings)
            _run_kopf(alive, standalone=True, clusterwide=not settings.namespaces, namespaces=settings.namespaces, memo=memo)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()
