"""Typed failures of the operator's work, shared by the API layer (``k8s``), the reconcile rules and the handlers.

Pure (no Kubernetes client), so that ``reconcile`` can name them without importing the client, and the
handlers alone decide what Kopf does about each: retry later (``Retry``, ``ApiFailure`` that may heal) or
give up (``Refused``, and API answers that retrying cannot change).
"""

from __future__ import annotations


class ApiFailure(Exception):
    """A Kubernetes API request failed; ``status`` is the HTTP status (None: no answer at all).

    The message names the request and the object (``create RayJob ns/name: HTTP 403 Forbidden: …``).
    """

    def __init__(self, what: str, status: int | None, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.status = status


class Retry(Exception):
    """Nothing is wrong with the job, but it cannot go on yet (e.g. a dying predecessor's child): try again later."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class Refused(Exception):
    """The job can never run as written; its status already says why (Failed, ``Validated=False``)."""
