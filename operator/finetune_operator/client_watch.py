"""Following one FineTuneJob until a predicate holds: the read-then-watch loop behind ``FineTuneJobClient.wait``.

Each round reads the job, then watches it from that read's resourceVersion; a watch that ends (dropped, 410
Expired, timed out server-side) starts a new round, so no transition in between is missed. What this module adds
to the loop: an API server that refuses the credentials (401) or the request (403) ends the wait at once (retrying
cannot change that answer), and a failing read or a watch that ends without delivering anything waits a growing,
jittered, capped back-off before the next round (``Backoff``), so a broken API server or proxy is not hammered in a
tight loop; a watch that delivered events resets it.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import kubernetes.client
import kubernetes.watch
import urllib3
from kubernetes.client.exceptions import ApiException

from finetune_operator.api.versions import GROUP, KIND, PLURAL, VERSION
from finetune_operator.client_errors import AccessDenied, ApiError, JobNotFound, at

WATCH_SECONDS: Final = 60  # one watch request at most this long: a silently dead connection is noticed
HEALTHY_SECONDS: Final = 5.0  # a watch open this long did not "fail at once", even if nothing changed meanwhile
DENIED: Final = (401, 403)


@dataclass
class Backoff:
    """Delays between failed rounds: ``base`` doubling up to ``cap``, each drawn in [half, all] of that ("equal
    jitter": clients that failed together do not retry together); ``reset`` after a round that worked."""

    base: float = 0.25
    cap: float = 10.0
    rng: Callable[[], float] = field(default=random.random)
    failures: int = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2.0**self.failures)
        self.failures = min(self.failures + 1, 32)  # 2**32 * base is past any cap: no float overflow on long outages
        return ceiling * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.failures = 0


def denied(what: str, exc: ApiException) -> AccessDenied:
    """The one-line error of a 401/403 (credentials refused, or RBAC): the request named, the API's words, what to check."""
    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        body = {}
    said = str(body.get("message") or "") if isinstance(body, dict) else ""
    hint = "the credentials were refused: log in again or fix the kubeconfig" if exc.status == 401 else "ask for RBAC access"
    return AccessDenied(f"{what}: HTTP {exc.status} {exc.reason}: {said or exc.reason}; not retried ({hint})", exc.status)


def follow(
    custom: kubernetes.client.CustomObjectsApi,
    read: Callable[[], dict[str, Any]],
    name: str,
    ns: str,
    timeout: float,
    done: Callable[[Mapping[str, Any]], bool],
    *,
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict[str, Any] | None, bool]:
    """(the last object seen, whether ``done`` holds for it) once ``done`` holds or ``timeout`` seconds have passed.

    ``read`` is the client's GET of the job (JobNotFound when there is none, AccessDenied on 401/403, ApiError else).
    """
    deadline = time.monotonic() + timeout
    backoff = backoff or Backoff()
    last: dict[str, Any] | None = None
    watch_module: Any = kubernetes.watch  # untyped
    followed: list[str] = []  # the uid of the job first seen: a job of the same name made since is another job

    def same_job(obj: Mapping[str, Any]) -> dict[str, Any]:
        uid = str(at(obj, "metadata", "uid") or "")
        if not followed:
            followed.append(uid)
        elif uid and uid != followed[0]:
            # Deleted and made again while no watch saw it (a dropped connection, a 410): its end is not this job's.
            raise JobNotFound(f"{KIND} {ns}/{name} was deleted (a new {KIND} of that name exists now)")
        return dict(obj)

    def pause() -> None:
        sleep(min(backoff.next(), max(0.0, deadline - time.monotonic())))

    while True:
        try:
            last = same_job(read())
        except AccessDenied:
            raise
        except ApiError:  # the API server is away: retry after the back-off
            if time.monotonic() >= deadline:
                return last, False
            pause()
            continue
        if done(last):
            return last, True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return last, False
        rv = str(at(last, "metadata", "resourceVersion") or "")
        seconds = max(1, min(WATCH_SECONDS, int(remaining + 0.999)))
        # The server ends the watch after ``seconds``; a silent one (a proxy that holds it) is given up 2 s later, so
        # --timeout is kept within 2 s (it was 10).
        watch: Any = watch_module.Watch()
        started, delivered = time.monotonic(), 0
        try:
            for event in watch.stream(
                custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                field_selector=f"metadata.name={name}", resource_version=rv, timeout_seconds=seconds,
                allow_watch_bookmarks=True, _request_timeout=(5.0, seconds + 2.0),
            ):  # fmt: skip
                # Only a change of the job counts as delivered: a line that is not JSON (None here), a BOOKMARK or
                # a type no API server sends, then the end, was watched again at once, dozens of times a second.
                kind, obj = at(event, "type"), at(event, "object")
                if kind == "DELETED":
                    raise JobNotFound(f"{KIND} {ns}/{name} was deleted")
                if kind in ("ADDED", "MODIFIED") and isinstance(obj, dict):
                    delivered += 1
                    last = same_job(obj)
                    if done(obj):
                        return obj, True
                if time.monotonic() >= deadline:
                    break
        except ApiException as exc:
            if exc.status in DENIED:
                raise denied(f"watch {KIND} {ns}/{name}", exc) from None
            # 410 Expired, a 5xx: read again and watch from there
        except (urllib3.exceptions.HTTPError, OSError, ValueError, KeyError, TypeError):
            # A dropped connection, or an ERROR event the watch library cannot take apart (no code, no reason: it
            # indexes them): read again and watch from there.
            pass
        finally:
            watch.stop()
        if delivered or time.monotonic() - started >= HEALTHY_SECONDS:
            backoff.reset()
        elif time.monotonic() < deadline:
            pause()  # the watch failed at once: do not re-read and re-watch in a tight loop
