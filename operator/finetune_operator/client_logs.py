"""Where a FineTuneJob's trainer output is, reading it, and the job's Events: the pod side of ``FineTuneJobClient``.

The trainer runs as the Ray job's driver, so its output is what KubeRay's submitter prints (``ray job logs
--follow``): in ``K8sJobMode`` (what the operator renders) the pod of the submitter Job, named after the RayJob;
in ``SidecarMode`` the ``ray-job-submitter`` container of the head pod; in ``HTTPMode`` there is no submitter and
the head pod's log is the closest there is. ``log_source`` picks whichever exists, in that order. The pods go
when the job ends (``shutdownAfterJobFinishes`` and the TTL), so "gone" is a normal answer, said plainly. A followed
log silent for ``FOLLOW_IDLE_S`` is asked for again from its last line (kubelet timestamps place it), so that a dead
connection cannot hang ``logs -f`` and a quiet job still follows.
"""

from __future__ import annotations

import codecs
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import kubernetes.client
import urllib3
from kubernetes.client.exceptions import ApiException

from finetune_operator.api.v1alpha1 import TERMINAL_PHASES
from finetune_operator.api.versions import KIND
from finetune_operator.client_errors import ApiError, LogsUnavailable, at, unreachable
from finetune_operator.security import SUBMITTER_CONTAINER

JOB_NAME_LABELS: Final = ("batch.kubernetes.io/job-name", "job-name")  # the second: clusters before Kubernetes 1.27


@dataclass(frozen=True)
class LogSource:
    """The pod (and container) holding the trainer's output; ``role``: ``submitter`` or ``head``."""

    namespace: str
    pod: str
    container: str | None
    role: str

    def kubectl(self) -> str:
        container = f" -c {self.container}" if self.container else ""
        return f"kubectl logs -n {self.namespace} {self.pod}{container}"


@dataclass(frozen=True)
class Event:
    """One Kubernetes Event about a job (what ``kubectl describe`` lists)."""

    type: str
    reason: str
    message: str
    time: str
    count: int


def _listed(core: kubernetes.client.CoreV1Api, what: str, fn: Any, namespace: str, **selector: str) -> Any:
    """One LIST (``fn``: a CoreV1Api list call) as plain JSON; its failure as an ApiError naming ``what``."""
    try:
        found = fn(namespace, _request_timeout=(5.0, 30.0), **selector)
    except ApiException as exc:
        raise ApiError(f"{what}: HTTP {exc.status} {exc.reason}", exc.status) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise unreachable(what, exc, core.api_client.configuration.host) from None
    except ValueError as exc:  # the library's reader (JSON, then typed models) refused the answer: a proxy's page, say
        detail = (str(exc).splitlines() or [""])[0][:200]
        raise ApiError(f"{what}: the answer is not a list the API server would send ({detail})", None) from None
    return core.api_client.sanitize_for_serialization(found)  # untyped


def _pods(core: kubernetes.client.CoreV1Api, namespace: str, selector: str) -> list[dict[str, Any]]:
    plain = _listed(core, f"list pods {namespace}/{selector}", core.list_namespaced_pod, namespace, label_selector=selector)
    items = [dict(p) for p in (plain or {}).get("items") or [] if not (p.get("metadata") or {}).get("deletionTimestamp")]
    # The newest first: a retried submitter (backoffLimit) leaves the old attempts' pods behind.
    return sorted(items, key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""), reverse=True)


def _containers(pod: Mapping[str, Any]) -> list[str]:
    return [str(c.get("name")) for c in (pod.get("spec") or {}).get("containers") or []]


def log_source(core: kubernetes.client.CoreV1Api, namespace: str, rayjob: str, cluster: str | None) -> LogSource | None:
    """The submitter Job's pod, else the head pod's submitter sidecar, else the head pod; None when no pod is there."""
    for label in JOB_NAME_LABELS:
        pods = _pods(core, namespace, f"{label}={rayjob}")
        if pods:
            names = _containers(pods[0])
            container = SUBMITTER_CONTAINER if SUBMITTER_CONTAINER in names else (names[0] if names else None)
            return LogSource(namespace, str(pods[0]["metadata"]["name"]), container, "submitter")
    if cluster:
        pods = _pods(core, namespace, f"ray.io/cluster={cluster},ray.io/node-type=head")
        if pods:
            names = _containers(pods[0])
            sidecar = SUBMITTER_CONTAINER in names
            container = SUBMITTER_CONTAINER if sidecar else (names[0] if names else None)
            return LogSource(namespace, str(pods[0]["metadata"]["name"]), container, "submitter" if sidecar else "head")
    return None


FOLLOW_IDLE_S: Final = 300.0
"""A followed log silent this long is asked for again from its last line: a connection that died without a FIN (a node,
a NAT or a proxy gone) hung ``logs -f`` for ever, and a job quiet for a whole epoch costs one request per this."""
_RESUME_MARGIN_S: Final = 60  # sinceSeconds is counted on the node's clock from its now: what the line took to arrive
_STAMPED = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) ")


class _Silent(Exception):
    """No byte came within the read timeout."""


def log_lines(core: kubernetes.client.CoreV1Api, source: LogSource, *, follow: bool = False) -> Iterator[str]:
    """The source's log, line by line (without newlines); with ``follow`` until the container ends."""
    if not follow:  # a log read at once must come within the timeout
        try:
            yield from _read(core, source, {"_request_timeout": (5.0, 60.0)})
        except _Silent as exc:
            raise ApiError(f"{_what(source)}: the stream broke: {exc}", None) from None
        return
    # Followed, a log may be quiet for a whole epoch (an hour on ImageNet): past FOLLOW_IDLE_S without a byte the
    # connection may as well be dead, so it is asked for again from the last line shown. Timestamps place the lines.
    position = _Position()
    since: int | None = None
    while True:
        query: dict[str, Any] = {"follow": True, "timestamps": True, "_request_timeout": (5.0, FOLLOW_IDLE_S)}
        if since is not None:
            query["since_seconds"] = since
        try:
            for line in _read(core, source, query):
                shown = position.admit(line)
                if shown is not None:
                    yield shown
            return
        except _Silent:
            since = position.resume()
            if since is None and position.shown:
                raise ApiError(
                    f"{_what(source)}: no output for {FOLLOW_IDLE_S:g}s, and no timestamps to resume from without "
                    "showing lines twice; follow it again",
                    None,
                ) from None


class _Position:
    """Where a followed log is: the timestamp of the last line shown and how many shown lines carry it, so that a
    second request, which sends the lines of the last whole second again (sinceSeconds), shows none of them twice."""

    def __init__(self) -> None:
        self.last: tuple[datetime, int] | None = None
        self.at_last = 0  # lines shown with the timestamp ``last``
        self.skip = 0  # of those, how many the current request has still to send again
        self.showing = True  # whether the last stamped line was shown: a line without a stamp goes with it
        self.shown = False
        self.received = time.monotonic()

    def admit(self, line: str) -> str | None:
        """``line`` without its timestamp when it is to be shown, None when it was shown already."""
        self.received = time.monotonic()
        match = _STAMPED.match(line)
        if match is None:  # a kubelet stamps every line; a server that does not leaves nothing to resume from
            self.shown = self.shown or self.showing
            return line if self.showing else None
        date, fraction, zone = match.groups()
        # Nanoseconds apart, and 'Z' spelt out: Python 3.10's fromisoformat reads neither.
        key = (datetime.fromisoformat(date + ("+00:00" if zone == "Z" else zone)), int((fraction or "").ljust(9, "0")))
        if self.last is not None and (key < self.last or (key == self.last and self.skip > 0)):
            self.skip -= key == self.last
            self.showing = False
            return None
        if key == self.last:
            self.at_last += 1
        else:
            self.last, self.at_last, self.skip = key, 1, 0
        self.showing = self.shown = True
        return line[match.end() :]

    def resume(self) -> int | None:
        """sinceSeconds for the next request (None: from the start), which reaches back past the last line shown."""
        self.skip = self.at_last
        if self.last is None:
            return None
        return int(time.monotonic() - self.received) + _RESUME_MARGIN_S


def _what(source: LogSource) -> str:
    return f"read log of pod {source.namespace}/{source.pod}"


def _read(core: kubernetes.client.CoreV1Api, source: LogSource, query: dict[str, Any]) -> Iterator[str]:
    """One request for the log, line by line; _Silent when no byte comes within its read timeout."""
    if source.container:
        query["container"] = source.container
    try:
        response: Any = core.read_namespaced_pod_log(source.pod, source.namespace, _preload_content=False, **query)
    except ApiException as exc:
        if exc.status in (400, 404):  # 400: the container has not started; 404: the pod went meanwhile
            raise LogsUnavailable(f"the log of pod {source.namespace}/{source.pod} cannot be read now: {exc.reason}") from None
        raise ApiError(f"{_what(source)}: HTTP {exc.status} {exc.reason}", exc.status) from None
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise _Silent(exc) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise unreachable(_what(source), exc, core.api_client.configuration.host) from None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    try:
        for chunk in response.stream(8192):
            pending += decoder.decode(chunk)
            *lines, pending = pending.split("\n")
            yield from lines
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending
    except urllib3.exceptions.ReadTimeoutError as exc:  # silent past the read timeout: a partial line is kept for later
        raise _Silent(exc) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:  # cut mid-stream
        if pending:
            yield pending
        raise ApiError(f"{_what(source)}: the stream broke: {exc}", None) from None
    finally:
        response.release_conn()


def events_of(core: kubernetes.client.CoreV1Api, namespace: str, name: str) -> list[Event]:
    """The Events about FineTuneJob ``name``, oldest first."""
    selector = f"involvedObject.kind={KIND},involvedObject.name={name}"
    plain = _listed(core, f"list events {namespace}/{name}", core.list_namespaced_event, namespace, field_selector=selector)
    events = []
    for item in (plain or {}).get("items") or []:
        when = item.get("lastTimestamp") or item.get("eventTime") or item.get("firstTimestamp") or ""
        count = int(item.get("count") or 1)
        events.append(
            Event(str(item.get("type") or ""), str(item.get("reason") or ""), str(item.get("message") or ""), str(when), count)
        )
    return sorted(events, key=lambda e: e.time)


def logs_gone_reason(obj: Mapping[str, Any]) -> str:
    """Why no pod holds a job's output, and where its results are instead."""
    phase = str(at(obj, "status", "phase") or "")
    if phase in TERMINAL_PHASES:
        where = at(obj, "status", "artifacts", "modelCardUri") or at(obj, "status", "artifacts", "modelUri")
        output = at(obj, "spec", "output", "uri")
        ns, name = at(obj, "metadata", "namespace"), at(obj, "metadata", "name")
        results = where or (f"{output}/{ns}/{name}/" if output else "the job's output.uri")
        return (
            f"the job is {phase} and KubeRay has deleted its Ray pods (shutdownAfterJobFinishes, the TTL); "
            f"its per-epoch log (metrics.jsonl) and model card are under {results}; "
            f"status.message: {at(obj, 'status', 'message') or '-'}"
        )
    return f"the job is {phase or 'new'}: its Ray pods are not running yet; try again once it is Running"
