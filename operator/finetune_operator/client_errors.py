"""The typed errors of ``FineTuneJobClient`` (``finetune_operator.client``), in a leaf so that its helpers share them,
and ``at``, how they all read a field of an object the API server sent (which may be of any shape).

Every error carries a one-line message meant for a person; the ``finetune`` cluster verbs map each to an exit code.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from finetune_operator.api.v1alpha1 import FineTuneJob
from finetune_operator.api.versions import KIND


def at(obj: Any, *path: str) -> Any:
    """``obj[path[0]][path[1]]...``, None where a key is missing or a step is no object: a server's (or a proxy's, or a
    newer operator's) object may hold a string where an object belongs, and showing it must not fail."""
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def mapping_at(obj: Any, *path: str) -> Mapping[str, Any]:
    """``at(obj, *path)`` when it is an object, else an empty one."""
    found = at(obj, *path)
    return found if isinstance(found, Mapping) else {}


class ClientError(Exception):
    """Any failure of the client; the message is one line meant for a person."""


class JobNotFound(ClientError):
    """No FineTuneJob of that name (or it was deleted while waited for)."""


class Invalid(ClientError):
    """The job was refused (here, by the API server or its admission webhook); ``lines``: one per problem."""

    def __init__(self, label: str, lines: list[str]) -> None:
        super().__init__(f"{label}: invalid: " + "; ".join(lines))
        self.label = label
        self.lines = lines


class JobFailed(ClientError):
    """The job ended Failed; ``reason`` and ``message`` are its Failed condition's, ``job`` the final object."""

    def __init__(self, job: FineTuneJob) -> None:
        failed = next((c for c in (job.status.conditions if job.status else []) if c.type == "Failed"), None)
        self.job = job
        self.reason = failed.reason if failed else "Failed"
        self.message = (failed.message if failed else None) or (job.status.message if job.status else "") or ""
        super().__init__(f"{KIND} {job.metadata.namespace}/{job.metadata.name} failed ({self.reason}): {self.message}")


class Timeout(ClientError):
    """The job did not reach the phases waited for in time; ``job`` is its last known state (None: never read)."""

    def __init__(self, message: str, job: FineTuneJob | None) -> None:
        super().__init__(message)
        self.job = job


class ApiError(ClientError):
    """The API server refused a request for another reason (RBAC, unreachable); ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class AccessDenied(ApiError):
    """The API server refused the credentials (401) or this user may not do it (403): retrying cannot help."""


def unreachable(what: str, exc: BaseException, host: str) -> ApiError:
    """The one line of a request that got no answer from ``host``: a TLS failure said as one, with what to check
    (urllib3's nested repr of MaxRetryError, SSLError and SSLCertVerificationError said neither), else urllib3's words."""
    reason = getattr(exc, "reason", None) or exc  # MaxRetryError carries the cause
    for cause in (reason, *getattr(reason, "args", ())):
        if isinstance(cause, ssl.SSLError):
            return ApiError(
                f"{what}: TLS with the API server {host} failed ({cause}); check the kubeconfig's certificate-authority "
                "(or certificate-authority-data) for that cluster, and its server URL",
                None,
            )
    return ApiError(f"{what}: the API server cannot be reached: {exc}", None)


class LogsUnavailable(ClientError):
    """The trainer's output cannot be read: its pods are not there (yet, or any more); the message says where to look."""
