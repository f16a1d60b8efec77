"""Kopf handlers of the FineTuneJob operator: thin glue between watch events and the pure modules.

Run it with::

    kopf run -m finetune_operator.handlers --standalone --all-namespaces \\
        --liveness=http://0.0.0.0:8081/healthz            # or --namespace=NS (repeatable)
    python -m finetune_operator.handlers                   # the same, namespaces from FINETUNE_OPERATOR_NAMESPACES

The chart probes ``/healthz`` on 8081; Prometheus scrapes ``/metrics`` on ``FINETUNE_OPERATOR_METRICS_PORT``.

What reacts to what:
- FineTuneJob created, or found at start-up (``reconcile``): validate (``rayjob.check_spec``); an invalid
  job gets phase Failed, ``Validated=False`` with ``finetune validate``'s words, a Warning Event and
  ``kopf.PermanentError``. A valid one gets its children (``rayjob.build_children``), created idempotently
  (deterministic names; 409 reads the existing object), then phase Provisioning and ``rayJobName``.
- ``spec.runPolicy.suspend`` changed (``suspend_changed``): the RayJob's ``spec.suspend`` follows. With a
  Kueue ``queueName``, Kueue holds the RayJob suspended until admission (phase Pending, reason Queued);
  the operator then never un-suspends it on its own, only when the user flips the flag.
- A RayJob of ours changed (``rayjob_event``): ``status.map_status`` mirrors it into the parent's status
  subresource, with an Event on every phase change. A resync timer does the same every minute, so a
  missed watch event or failed patch heals itself (watch-event handlers are not retried by Kopf).
- **A RayJob deleted under a live FineTuneJob is recreated** (Warning Event ``RayJobRecreated``). Training
  resumes from the last checkpoint by construction (the run is named after the job), so recreating costs
  at most an epoch, whereas failing would throw away the run over what is usually a mistaken
  ``kubectl delete``; to stop a job, suspend or delete the FineTuneJob. Finished jobs are left alone, so
  KubeRay's clean-up or a user tidying up never resurrects them.
- FineTuneJob deleted: the children go with their owner references; the finalizer only forgets metrics.

Handlers return None: Kopf writes nothing into the status (its progress lives in ``finetune.dev/*``
annotations, since the structural schema would prune ``status.kopf``); status is written by merge
patches on the status subresource. API failures become ``kopf.TemporaryError`` naming the object.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import kopf

from finetune_operator import metrics, naming
from finetune_operator.api import timestamps
from finetune_operator.api.v1alpha1 import FineTuneJob, ObjectMeta
from finetune_operator.api.versions import GROUP, KIND, PLURAL, VERSION
from finetune_operator.k8s import ApiFailure, Kube
from finetune_operator.kubeclient import load_client
from finetune_operator.rayjob import build_children, check_spec
from finetune_operator.settings import OperatorSettings, SettingsError
from finetune_operator.status import TERMINAL_PHASES, failed_status, map_status, phase_event, provisioning_status

FTJ: Final = (GROUP, VERSION, PLURAL)
RAYJOBS: Final = ("ray.io", "v1", "rayjobs")
FINALIZER: Final = "finetune.dev/finalizer"
LIVENESS: Final = "http://0.0.0.0:8081/healthz"
RESYNC_SECONDS: Final = 60.0
EVENT_MESSAGE_MAX: Final = 1000
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """What every handler needs, kept in Kopf's memo (tests put their own there before start-up)."""

    settings: OperatorSettings
    kube: Kube


def _ctx(memo: Any) -> Context:
    ctx = memo.get("ctx")
    if not isinstance(ctx, Context):
        raise kopf.PermanentError("the operator was not configured (the startup handler did not run)")
    return ctx


def _meta(obj: Mapping[str, Any]) -> tuple[str, str, str | None]:
    meta = obj["metadata"]
    return meta["namespace"], meta["name"], meta.get("uid")


def _event(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    try:
        kopf.event(kopf.Body(cast(kopf.RawBody, dict(obj))), type=type_, reason=reason, message=message[:EVENT_MESSAGE_MAX])
    except LookupError:  # called outside a running operator (tests, scripts): Kopf has no event queue
        log.info("event %s %s on %s: %s", type_, reason, obj["metadata"].get("name"), message)


def kopf_error(exc: ApiFailure) -> kopf.TemporaryError | kopf.PermanentError:
    """What Kopf should do about a failed request: 400/404/422 never get better by retrying; the rest may."""
    if exc.status in (400, 422):
        return kopf.PermanentError(str(exc))
    delay = 30.0 if exc.status in (401, 403) else 10.0  # RBAC is fixed by people, slowly
    return kopf.TemporaryError(str(exc), delay=delay)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Kopf's settings and our context: settings from the environment, an API client, the metrics port."""
    ctx = memo.get("ctx")
    if not isinstance(ctx, Context):
        try:
            operator = memo.get("settings") or OperatorSettings.from_env()
        except SettingsError as exc:
            raise kopf.PermanentError(f"bad operator settings: {exc}") from exc
        ctx = Context(settings=operator, kube=Kube(load_client()))
        memo["ctx"] = ctx
    logging.getLogger("finetune_operator").setLevel(ctx.settings.log_level_number)
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="finetune.dev", key="last-handled-configuration"
    )
    # Watch only our RayJobs, server-side: a cluster may run thousands of other people's.
    settings.watching.label_selectors[RAYJOBS[0], RAYJOBS[2]] = (
        f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY},{naming.LABEL_JOB}"
    )
    # Reconnect watches every few minutes rather than trusting one stream forever behind load balancers.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    if metrics.serve(ctx.settings.metrics_port):
        log.info("serving Prometheus metrics on :%d/metrics", ctx.settings.metrics_port)


@kopf.on.probe(id="jobs")
def jobs_probe(**_: Any) -> int:
    return metrics.job_count()


# ------------------------------------------------------------------------------------ FineTuneJob
@kopf.on.resume(*FTJ)
@kopf.on.create(*FTJ)
@metrics.instrumented("reconcile")
def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Validate, create the children if missing, report Provisioning (or mirror the RayJob after a restart)."""
    ctx = _ctx(memo)
    job_body = _plain(body)
    ns, name, uid = _meta(job_body)
    status = job_body.get("status") or {}
    if status.get("phase") in TERMINAL_PHASES:
        metrics.record_phase(uid, status["phase"])
        return
    spec, errors = check_spec(job_body.get("spec"), ctx.settings)
    try:
        if spec is None:
            _write_status(
                ctx,
                job_body,
                failed_status("InvalidSpec", errors, job_body["metadata"].get("generation"), timestamps.now(), status),
            )
            _event(job_body, "Warning", "InvalidSpec", "; ".join(errors))
            raise kopf.PermanentError(f"{KIND} {ns}/{name} is invalid: " + "; ".join(errors))
        job = FineTuneJob(metadata=ObjectMeta(name=name, namespace=ns, uid=uid), spec=spec)
        rayjob, created = _ensure_children(ctx, job, known=bool(status.get("rayJobName")))
        if created:
            _event(job_body, "Normal", "RayJobCreated", f"created RayJob {rayjob['metadata']['name']}")
        first = provisioning_status(rayjob["metadata"]["name"], job_body["metadata"].get("generation"), timestamps.now(), status)
        _sync(ctx, job_body, rayjob, first)
    except ApiFailure as exc:
        raise kopf_error(exc) from exc


@kopf.on.field(*FTJ, field="spec.runPolicy.suspend")
@metrics.instrumented("suspend")
def suspend_changed(body: kopf.Body, new: Any, memo: kopf.Memo, **_: Any) -> None:
    """Suspend or resume the RayJob (idempotent; a missing RayJob is reconcile's or the timer's business)."""
    ctx = _ctx(memo)
    ns, name, _uid = _meta(body)
    if (body.get("status") or {}).get("phase") in TERMINAL_PHASES:
        return
    wanted, rayjob_name = bool(new), naming.rayjob_name(name)
    try:
        rayjob = ctx.kube.read("RayJob", ns, rayjob_name)
        if rayjob is None or bool((rayjob.get("spec") or {}).get("suspend")) == wanted:
            return
        ctx.kube.patch("RayJob", ns, rayjob_name, {"spec": {"suspend": wanted}})
    except ApiFailure as exc:
        raise kopf_error(exc) from exc
    verb = "suspending" if wanted else "resuming from the last checkpoint"
    _event(
        _plain(body),
        "Normal",
        "Suspend" if wanted else "Resume",
        f"{verb}: RayJob {rayjob_name} spec.suspend={str(wanted).lower()}",
    )


@kopf.timer(*FTJ, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
@metrics.instrumented("resync")
def resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Safety net for lost watch events: mirror the RayJob again, or recreate it if it is gone."""
    ctx = _ctx(memo)
    job_body = _plain(body)
    ns, _name, _uid = _meta(job_body)
    status = job_body.get("status") or {}
    if status.get("phase") in TERMINAL_PHASES or not status.get("rayJobName"):
        return
    try:
        rayjob = ctx.kube.read("RayJob", ns, status["rayJobName"])
        if rayjob is None:
            _rayjob_gone(ctx, job_body)
        else:
            _sync(ctx, job_body, rayjob)
    except ApiFailure as exc:
        raise kopf_error(exc) from exc


@kopf.on.delete(*FTJ)
def forget(meta: kopf.Meta, **_: Any) -> None:
    """Children are deleted by the garbage collector through their owner references; only metrics remain."""
    metrics.forget(meta.uid)


# ----------------------------------------------------------------------------------------- RayJob
@kopf.on.event(*RAYJOBS, labels={naming.LABEL_MANAGED_BY: naming.MANAGED_BY, naming.LABEL_JOB: kopf.PRESENT})
@metrics.instrumented("rayjob-event")
def rayjob_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Mirror a RayJob's status into its FineTuneJob; recreate it when deleted under a live job."""
    ctx = _ctx(memo)
    rayjob = _plain(body)
    ns, rayjob_name, _uid = _meta(rayjob)
    owner = _controller(rayjob)
    if owner is None:
        return
    try:
        parent = ctx.kube.read(KIND, ns, owner["name"])
        if parent is None or parent["metadata"].get("uid") != owner.get("uid") or parent["metadata"].get("deletionTimestamp"):
            return  # the job is gone or going: its children go too
        if not (parent.get("status") or {}).get("rayJobName"):
            # The create handler is still on it and mirrors the RayJob itself when done; writing
            # Provisioning from here too would race it and announce the same transition twice.
            return
        if type == "DELETED":
            _rayjob_gone(ctx, parent)
        else:
            _sync(ctx, parent, rayjob)
    except ApiFailure as exc:
        # Kopf does not retry event handlers; the resync timer will.
        logger.warning("could not mirror RayJob %s/%s (retried within %ds): %s", ns, rayjob_name, RESYNC_SECONDS, exc)


# ---------------------------------------------------------------------------------------- helpers
def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Kopf body view as the plain dict it wraps (nested values are already plain)."""
    return {key: body[key] for key in body}


def _controller(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return dict(ref)
    return None


def _ensure_children(ctx: Context, job: FineTuneJob, *, known: bool = False) -> tuple[dict[str, Any], bool]:
    """Create what is missing, in dependency order; (the RayJob, whether it was created now).

    ``known``: the job was handled before (a restart), so look for its RayJob first: it is created last,
    so when it exists the rest does too, and one GET replaces five conflicting POSTs per job.
    """
    children = build_children(job, ctx.settings)
    meta = children.rayjob["metadata"]
    rayjob = ctx.kube.read("RayJob", meta["namespace"], meta["name"]) if known else None
    created = False
    if rayjob is None:
        for obj in children.all():
            is_rayjob = obj is children.rayjob
            existing, made = ctx.kube.create_or_get(obj, read_back=is_rayjob)
            if is_rayjob and existing is not None:
                rayjob, created = existing, made
    assert rayjob is not None  # create_or_get reads the RayJob back
    if not created:
        owner = _controller(rayjob)
        if owner is not None and owner.get("uid") != job.metadata.uid:
            # A RayJob of an earlier FineTuneJob of the same name, not yet garbage-collected.
            what = f"RayJob {meta['namespace']}/{meta['name']}"
            raise kopf.TemporaryError(f"{what} still belongs to a deleted {KIND}", delay=5)
        wanted, actual = job.spec.run_policy.suspend, bool((rayjob.get("spec") or {}).get("suspend"))
        # With a Kueue queue, Kueue suspends the RayJob until admission: never un-suspend it behind its back.
        if wanted != actual and (wanted or not job.spec.runtime.queue_name):
            rayjob = ctx.kube.patch("RayJob", meta["namespace"], meta["name"], {"spec": {"suspend": wanted}})
    return rayjob, created


def _rayjob_gone(ctx: Context, parent: dict[str, Any]) -> None:
    """The RayJob of a live job vanished: recreate it (see the module docstring for why)."""
    status = parent.get("status") or {}
    if status.get("phase") in TERMINAL_PHASES or not status.get("rayJobName"):
        return
    ns, name, uid = _meta(parent)
    spec, _errors = check_spec(parent.get("spec"), ctx.settings)
    if spec is None:
        return
    rayjob, created = _ensure_children(ctx, FineTuneJob(metadata=ObjectMeta(name=name, namespace=ns, uid=uid), spec=spec))
    if created:
        message = f"RayJob {rayjob['metadata']['name']} was deleted while the job was {status.get('phase')}; recreated it, training resumes from the last checkpoint"
        _event(parent, "Warning", "RayJobRecreated", message)
    _sync(ctx, parent, rayjob)


def _sync(ctx: Context, parent: dict[str, Any], rayjob: Mapping[str, Any], first: Mapping[str, Any] | None = None) -> None:
    """Write ``first`` plus whatever the RayJob's status changes, in one status patch."""
    current = dict(parent.get("status") or {})
    patch = dict(first or {})
    merged = {**current, **patch}
    run_policy = (parent.get("spec") or {}).get("runPolicy") or {}
    mirrored = map_status(
        rayjob.get("status"),
        merged,
        parent["metadata"].get("generation"),
        timestamps.now(),
        suspend=bool(run_policy.get("suspend")),
        rayjob_suspend=(rayjob.get("spec") or {}).get("suspend"),
    )
    _write_status(ctx, parent, {**patch, **mirrored})


def _write_status(ctx: Context, parent: dict[str, Any], patch: Mapping[str, Any]) -> None:
    ns, name, uid = _meta(parent)
    current = parent.get("status") or {}
    if not patch:
        metrics.record_phase(uid, current.get("phase"))
        return
    ctx.kube.patch_status(KIND, ns, name, patch)
    old, new = current.get("phase"), patch.get("phase", current.get("phase"))
    announced = phase_event(old, new, str(patch.get("message") or current.get("message") or ""))
    if announced is not None:
        _event(parent, *announced)
    metrics.record_phase(uid, new)


def main(argv: list[str] | None = None) -> None:
    """``python -m finetune_operator.handlers``: Kopf with namespaces, liveness and logging from the settings."""
    parser = argparse.ArgumentParser(prog="python -m finetune_operator.handlers", description="Run the FineTuneJob operator.")
    parser.add_argument("--liveness", default=LIVENESS, metavar="URL", help=f"liveness endpoint (default: {LIVENESS})")
    args = parser.parse_args(argv)
    try:
        settings = OperatorSettings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"finetune-operator: {exc}") from exc
    logging.basicConfig(level=settings.log_level_number, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(settings=settings),
    )


if __name__ == "__main__":
    main()
