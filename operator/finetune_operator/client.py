"""``FineTuneJobClient``: FineTuneJobs from Python (pipelines, CI, notebooks) without kubectl or hand-built dicts.

This module owns the user-facing client and its typed errors. It needs only the kubernetes client and the API
models (no torch, no Ray, no Kopf). What it does that raw calls do not: the body is the wire format (camelCase,
``apiVersion``; ``model_dump()`` gives snake_case keys the API server prunes); a bad job is refused here with the
lines ``finetune validate`` prints; ``wait`` follows a watch (re-listing after a dropped watch or an expired
resourceVersion, so no transition is lost) and raises ``JobFailed`` with the failure's message as soon as the
job fails, where ``kubectl wait --for=condition=Succeeded`` would block until its timeout. Logs and events live
in ``client_logs`` and credentials in ``client_auth`` (the same client, split to keep modules short).
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import kubernetes.client
import kubernetes.config
import urllib3
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from finetune_operator import naming
from finetune_operator.api.errors import format_errors
from finetune_operator.api.overrides import OverrideError, apply_overrides
from finetune_operator.api.v1alpha1 import Artifacts, FineTuneJob, FineTuneJobStatus, ObjectMeta
from finetune_operator.api.validate import ManifestError, decode_manifest, iter_documents, read_manifest, validate_document
from finetune_operator.api.versions import API_VERSION, GROUP, KIND, PLURAL, VERSION
from finetune_operator.client_auth import load_api_client
from finetune_operator.client_errors import (
    AccessDenied,
    ApiError,
    ClientError,
    Invalid,
    JobFailed,
    JobNotFound,
    LogsUnavailable,
    Timeout,
    at,
    mapping_at,
    unreachable,
)
from finetune_operator.client_logs import Event, LogSource, events_of, log_lines, log_source, logs_gone_reason
from finetune_operator.client_watch import DENIED, Backoff, denied, follow

__all__ = [
    "AccessDenied",
    "ApiError",
    "ClientError",
    "Event",
    "FineTuneJobClient",
    "Invalid",
    "JobFailed",
    "JobNotFound",
    "LogsUnavailable",
    "Timeout",
    "job_body",
    "logs_gone_reason",
]

FIELD_MANAGER: Final = "finetune-client"
TERMINAL: Final = ("Succeeded", "Failed")
_MERGE: Final = "application/merge-patch+json"
_APPLY: Final = "application/apply-patch+yaml"
REQUEST_TIMEOUT: Final = (5.0, 30.0)  # (connect, read) seconds of one request


def _own_cluster(name: str, obj: Mapping[str, Any]) -> tuple[str, str | None]:
    """(RayJob name, Ray cluster name) whose pods hold job ``name``'s output: the RayJob the operator makes under the
    job's own name, never one its status names (the job's trainer may write the status, and a name written there
    showed another job's pods), and a cluster only when KubeRay named it after that RayJob."""
    rayjob = naming.rayjob_name(name)
    cluster = at(obj, "status", "rayClusterName")
    return rayjob, cluster if isinstance(cluster, str) and cluster.startswith(f"{rayjob}-") else None


def _api_detail(exc: ApiException) -> tuple[str, list[str]]:
    """The API server's message and, for a 422, one line per cause (``field: message``)."""
    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = str(body.get("message") or exc.reason or f"HTTP {exc.status}")
    details = body.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    # Whatever a proxy or a webhook put there: only causes that are objects are read.
    causes = [c for c in causes if isinstance(c, dict)] if isinstance(causes, list) else []
    lines = [f"{c.get('field')}: {c.get('message')}" if c.get("field") else str(c.get("message")) for c in causes]
    return message, lines or [message]


def _answer(what: str, data: bytes) -> dict[str, Any]:
    """The JSON object an API server answered ``what`` with; ApiError saying what came instead (a proxy's page)."""
    try:
        answer = json.loads(data)
        shown = "" if isinstance(answer, dict) else f"not an object ({str(answer)[:80]!r})"
    except (ValueError, RecursionError):  # not JSON, not UTF-8, cut short, or nested past Python's recursion limit
        answer, shown = None, f"not JSON ({bytes(data[:80])!r})"
    if shown:
        hint = "is the kubeconfig's server a Kubernetes API server, or a proxy's page in the way?"
        raise ApiError(f"{what}: the answer is {shown}; {hint}", None)
    return dict(answer)


def to_job(obj: Mapping[str, Any]) -> FineTuneJob:
    """The typed job of an object the API server returned (server-written metadata such as resourceVersion dropped;
    status fields of a newer operator are ignored, a status this version cannot read is left out: reading never fails)."""
    meta = {k: v for k, v in mapping_at(obj, "metadata").items() if k in ObjectMeta.model_fields}
    status: FineTuneJobStatus | None = None
    if found := mapping_at(obj, "status"):
        known = {field.alias or name for name, field in FineTuneJobStatus.model_fields.items()}
        try:
            status = FineTuneJobStatus.model_validate({k: v for k, v in found.items() if k in known})
        except ValidationError:
            status = None
    try:
        job = FineTuneJob.model_validate({"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": obj.get("spec")})
    except ValidationError as exc:  # a spec from a newer API version: say so in one line, not a traceback
        first = format_errors(exc, FineTuneJob)[0]
        raise ClientError(
            f"{KIND} {meta.get('namespace')}/{meta.get('name')}: this client cannot read its spec ({first}); "
            "upgrade finetune-operator"
        ) from None
    return job.model_copy(update={"status": status})


def phase_of(obj: Mapping[str, Any]) -> str:
    return str(at(obj, "status", "phase") or "")


def job_body(job: FineTuneJob | str | Path | Mapping[str, Any], *, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The wire object (camelCase, no status) of a model, a manifest path or a dict; Invalid when it is not a
    valid FineTuneJob (every problem, the lines ``finetune validate`` prints). ``overrides``: ``PATH=VALUE``."""
    if isinstance(job, FineTuneJob):
        document: Any = job.to_wire()
        label = f"{KIND}/{job.metadata.name}"
    elif isinstance(job, (str, Path)):
        label = str(job)
        try:
            text = decode_manifest(read_manifest(str(job)), label)
        except OSError as exc:
            raise Invalid(label, [f"cannot read: {exc.strerror or exc}"]) from None
        except ManifestError as exc:
            raise Invalid(exc.label, exc.lines) from None
        results = list(iter_documents(text, label))
        if len(results) != 1 or results[0].document is None:
            lines = [line for r in results for line in r.errors] or [f"expected one {KIND}, found {len(results)}"]
            raise Invalid(label, lines)
        document = results[0].document
    else:
        document, label = dict(job), "<dict>"
    try:
        document = apply_overrides(document, overrides)
    except OverrideError as exc:
        raise Invalid(label, exc.lines) from None
    result = validate_document(document, label)
    if not result.ok or result.job is None:
        raise Invalid(result.label, result.errors)
    wire = result.job.to_wire()
    wire.pop("status", None)
    return wire


class FineTuneJobClient:
    """Create, watch and manage FineTuneJobs. ``FineTuneJobClient()`` finds its credentials like kubectl does.

    ``namespace``: default namespace of every call (None: the kubeconfig context's, or the pod's own);
    ``context``: a kubeconfig context; ``api_client``: an already configured client (tests, custom auth).
    """

    def __init__(
        self,
        namespace: str | None = None,
        *,
        context: str | None = None,
        config_file: str | None = None,
        api_client: kubernetes.client.ApiClient | None = None,
    ) -> None:
        default = "default"
        if api_client is None:
            api_client, default = load_api_client(context=context, config_file=config_file)
        self.api_client = api_client
        self.namespace = namespace or default
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)

    # ---- plumbing

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One request; the JSON object it answers (read here: the library's own reader let a proxy's HTML page, a cut
        body or an answer that is no object through as a traceback); its failure as a typed error naming ``what``."""
        try:
            kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
            data = fn(*args, _preload_content=False, **kwargs).data
        except ApiException as exc:
            message, lines = _api_detail(exc)
            if exc.status == 404:
                raise JobNotFound(f"{what}: not found ({message})") from None
            refused = exc.status == 403 and ("admission webhook" in message or "denied the request" in message)
            if exc.status in (400, 422) or refused:
                raise Invalid(what, lines) from None
            if exc.status in DENIED:
                raise denied(what, exc) from None
            if 300 <= exc.status < 400:  # not followed (client_auth.RETRIES)
                where = (exc.headers or {}).get("Location") or "elsewhere"
                message = f"the server redirects to {where}; an API server does not: check the kubeconfig's server URL"
            raise ApiError(f"{what}: HTTP {exc.status} {exc.reason}: {message}", exc.status) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise unreachable(what, exc, self.api_client.configuration.host) from None
        return _answer(what, data)

    def _ns(self, namespace: str | None) -> str:
        return namespace or self.namespace

    def body(self, job: FineTuneJob | str | Path | Mapping[str, Any], *, overrides: Iterable[str] = ()) -> dict[str, Any]:
        """``job_body``: the wire object of a model, a manifest path or a dict; Invalid when it is not a valid job."""
        return job_body(job, overrides=overrides)

    # ---- create, apply, read

    def _placed(
        self, job: FineTuneJob | str | Path | Mapping[str, Any], namespace: str | None, overrides: Iterable[str]
    ) -> tuple[dict[str, Any], str, dict[str, Any]]:
        """(the wire body, its namespace, its metadata): the argument's namespace, else the manifest's, else ours."""
        wire = self.body(job, overrides=overrides)
        meta: dict[str, Any] = dict(wire["metadata"])
        ns = namespace or meta.get("namespace") or self.namespace
        meta["namespace"] = ns
        wire["metadata"] = meta
        return wire, ns, meta

    def create(
        self, job: FineTuneJob | str | Path | Mapping[str, Any], *, namespace: str | None = None, overrides: Iterable[str] = ()
    ) -> FineTuneJob:
        """Create the job (validated here first); the created object. Invalid, or ApiError 409 when the name is taken."""
        wire, ns, meta = self._placed(job, namespace, overrides)
        what = f"create {KIND} {ns}/{meta['name']}"
        return to_job(self._call(what, self.custom.create_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, wire))

    def apply(
        self,
        job: FineTuneJob | str | Path | Mapping[str, Any],
        *,
        namespace: str | None = None,
        field_manager: str = FIELD_MANAGER,
        force: bool = False,
        overrides: Iterable[str] = (),
    ) -> FineTuneJob:
        """Server-side apply (create or update the fields this manager owns) as ``field_manager``."""
        wire, ns, meta = self._placed(job, namespace, overrides)
        fn = self.custom.patch_namespaced_custom_object
        what = f"apply {KIND} {ns}/{meta['name']}"
        # The generated client maps only HTTP 200 to a body, and an apply that creates answers 201: _call reads it raw.
        kwargs: dict[str, Any] = {"field_manager": field_manager, "_content_type": _APPLY}
        if force:
            kwargs["force"] = True
        return to_job(self._call(what, fn, GROUP, VERSION, ns, PLURAL, meta["name"], wire, **kwargs))

    def get_object(self, name: str, namespace: str | None = None, *, seconds: float | None = None) -> dict[str, Any]:
        """The object as the API server returns it (metadata and status in full); ``seconds``: at most this long."""
        ns = self._ns(namespace)
        fn, timeout = self.custom.get_namespaced_custom_object, REQUEST_TIMEOUT
        if seconds is not None:
            timeout = (min(timeout[0], seconds), min(timeout[1], seconds))
        return self._call(f"get {KIND} {ns}/{name}", fn, GROUP, VERSION, ns, PLURAL, name, _request_timeout=timeout)

    def get(self, name: str, namespace: str | None = None) -> FineTuneJob:
        """The job, typed; JobNotFound when there is none."""
        return to_job(self.get_object(name, namespace))

    def list_objects(
        self,
        namespace: str | None = None,
        label_selector: str | None = None,
        phase: str | None = None,
        *,
        all_namespaces: bool = False,
    ) -> list[dict[str, Any]]:
        """The jobs as the API server returns them, optionally only those in ``phase``."""
        kwargs: dict[str, Any] = {"label_selector": label_selector} if label_selector else {}
        if all_namespaces:
            found = self._call(
                f"list {KIND} (all namespaces)", self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, **kwargs
            )
        else:
            ns = self._ns(namespace)
            fn = self.custom.list_namespaced_custom_object
            found = self._call(f"list {KIND} {ns}", fn, GROUP, VERSION, ns, PLURAL, **kwargs)
        items = found.get("items")
        items = [dict(item) for item in items if isinstance(item, dict)] if isinstance(items, list) else []
        return [item for item in items if phase is None or phase_of(item) == phase]

    def list(
        self,
        namespace: str | None = None,
        label_selector: str | None = None,
        phase: str | None = None,
        *,
        all_namespaces: bool = False,
    ) -> builtins.list[FineTuneJob]:
        """The jobs, typed (see ``list_objects``)."""
        objects = self.list_objects(namespace, all_namespaces=all_namespaces, label_selector=label_selector, phase=phase)
        return [to_job(obj) for obj in objects]

    def artifacts(self, name: str, namespace: str | None = None) -> Artifacts:
        """``status.artifacts`` (empty until the trainer has written them)."""
        job = self.get(name, namespace)
        return (job.status.artifacts if job.status else None) or Artifacts()

    # ---- change

    def _patch_spec(self, name: str, namespace: str | None, patch: Mapping[str, Any], verb: str) -> FineTuneJob:
        ns = self._ns(namespace)
        fn = self.custom.patch_namespaced_custom_object
        obj = self._call(f"{verb} {KIND} {ns}/{name}", fn, GROUP, VERSION, ns, PLURAL, name, dict(patch), _content_type=_MERGE)
        return to_job(obj)

    def suspend(self, name: str, namespace: str | None = None) -> FineTuneJob:
        """``spec.runPolicy.suspend: true``: the Ray cluster goes; the job resumes from its last checkpoint later."""
        return self._patch_spec(name, namespace, {"spec": {"runPolicy": {"suspend": True}}}, "suspend")

    def resume(self, name: str, namespace: str | None = None) -> FineTuneJob:
        """``spec.runPolicy.suspend: false``."""
        return self._patch_spec(name, namespace, {"spec": {"runPolicy": {"suspend": False}}}, "resume")

    def delete(self, name: str, wait: bool = False, *, namespace: str | None = None, timeout: float = 300.0) -> None:
        """Delete the job (its RayJob and other children go with it); ``wait``: until it is gone (Timeout otherwise)."""
        ns = self._ns(namespace)
        fn = self.custom.delete_namespaced_custom_object
        self._call(f"delete {KIND} {ns}/{name}", fn, GROUP, VERSION, ns, PLURAL, name, propagation_policy="Foreground")
        if wait:
            try:
                self._follow(name, ns, timeout, lambda obj: False)
            except JobNotFound:
                return
            raise Timeout(f"{KIND} {ns}/{name} was not gone after {timeout:g}s (a finalizer holds it?)", None)

    # ---- logs and events

    def log_source(self, name: str, namespace: str | None = None) -> LogSource | None:
        """The pod holding the trainer's output now (KubeRay's submitter, else the head), None when it is gone."""
        ns = self._ns(namespace)
        return log_source(self.core, ns, *_own_cluster(name, self.get_object(name, ns)))

    def logs(self, name: str, follow: bool = False, *, namespace: str | None = None) -> Iterator[str]:
        """The trainer's output, line by line; ``follow``: until it ends. LogsUnavailable (saying where the results
        are instead) when no pod holds it: not started yet, or deleted by KubeRay after the job."""
        ns = self._ns(namespace)
        obj = self.get_object(name, ns)
        source = log_source(self.core, ns, *_own_cluster(name, obj))
        if source is None:
            raise LogsUnavailable(f"{KIND} {ns}/{name}: {logs_gone_reason(obj)}")
        return log_lines(self.core, source, follow=follow)

    def events(self, name: str, namespace: str | None = None) -> builtins.list[Event]:
        """The job's Events, oldest first (phase changes, refusals, what the operator did)."""
        return events_of(self.core, self._ns(namespace), name)

    # ---- wait

    def wait(
        self,
        name: str,
        timeout: float = 3600.0,
        for_phases: Iterable[str] = TERMINAL,
        *,
        namespace: str | None = None,
        raise_on_failure: bool = True,
    ) -> FineTuneJob:
        """The job once its phase is one of ``for_phases``. Raises JobFailed as soon as it fails (unless
        ``raise_on_failure`` is False and Failed is waited for), Timeout after ``timeout`` seconds, JobNotFound
        when it does not exist or is deleted meanwhile. Follows a watch; a dropped one is resumed from a fresh read."""
        wanted = set(for_phases)
        ns = self._ns(namespace)

        def done(obj: Mapping[str, Any]) -> bool:
            phase = phase_of(obj)
            return phase in wanted or (phase == "Failed" and raise_on_failure)

        obj = self._follow(name, ns, timeout, done)
        job = to_job(obj)
        if phase_of(obj) == "Failed" and raise_on_failure:
            raise JobFailed(job)
        return job

    def _follow(self, name: str, ns: str, timeout: float, done: Any) -> dict[str, Any]:
        """Read, then watch until ``done(obj)`` (``client_watch.follow``); Timeout after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        # A read never outlasts the wait by more than the 2 s a watch may (a silent server held the first one 30 s).
        read = lambda: self.get_object(name, ns, seconds=max(1.0, deadline - time.monotonic() + 2.0))  # noqa: E731
        last, reached = follow(self.custom, read, name, ns, timeout, done, backoff=Backoff())
        if reached and last is not None:
            return last
        try:
            job = to_job(last) if last is not None else None
        except ClientError:  # an object this client cannot type (a server off the CRD's schema): the timeout still holds
            job = None
        phase = phase_of(last) if last is not None else "unknown"
        raise Timeout(f"{KIND} {ns}/{name}: still {phase or 'without a phase'} after {timeout:g}s", job)
