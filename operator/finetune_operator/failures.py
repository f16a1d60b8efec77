"""Typed failures of the operator's work, shared by the API layer (``k8s``), the reconcile rules and the handlers.

Pure (no Kubernetes client), so that ``reconcile`` can name them without importing the client, and the
handlers alone decide what Kopf does about each: retry later (``Retry``, ``ApiFailure`` that may heal) or
give up (``Refused``, and API answers that retrying cannot change). ``api_failure_verdict`` says what a
failed call means for the job's status, ``retry_delay`` how long to back off.
"""

from __future__ import annotations

from finetune_operator.api.versions import KUBERAY_VERSION, RAYJOB_API_VERSION, RAYJOB_KIND, RAYJOB_PLURAL

RETRY_CAP_SECONDS = 600.0


class ApiFailure(Exception):
    """A Kubernetes API request failed; ``status`` is the HTTP status (None: no answer at all).

    The message names the request and the object (``create RayJob ns/name: HTTP 403 Forbidden: …``);
    ``kind`` is the object's kind and ``verb`` the request (create, read, patch), ``detail`` the API's words,
    ``retry_after`` the seconds a 429 (or 503) asked the client to wait.
    """

    def __init__(
        self,
        what: str,
        status: int | None,
        detail: str,
        *,
        kind: str | None = None,
        verb: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{what}: {detail}")
        self.status = status
        self.detail = detail
        self.kind = kind
        self.verb = verb
        self.retry_after = retry_after


class Retry(Exception):
    """Nothing is wrong with the job, but it cannot go on yet (e.g. a dying predecessor's child): try again later."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class Refused(Exception):
    """The job can never run as written; its status already says why (phase Failed and a condition)."""


class Conflict(Exception):
    """A child's name is taken by an object this job must not adopt; ``reason`` is the condition's reason
    (``NameCollision``: another job's child; ``ChildConflict``: an object no FineTuneJob owns)."""

    def __init__(self, reason: str, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.kind = kind
        """The kind of the child whose name is taken (``RayJob``, ``ConfigMap``, ...), when known."""


def api_failure_verdict(exc: ApiFailure) -> tuple[str, str, bool] | None:
    """(condition reason, message, permanent?) for a failed API call, or None to retry quietly.

    People must act on these, so the status says so: KubeRay missing (its API is not served), RBAC that
    forbids a call, a policy (an admission webhook) that rejects a child, or a webhook that does not answer (a 500
    that lasts as long as the webhook is down). 400/422 never heal by retrying: the job fails. A 409, a 429 and
    other server errors are the API's own trouble: back off without a word.
    """
    what = f"{exc.verb or 'call'} {exc.kind or 'object'}"
    if exc.status in (403, 404) and ("is being terminated" in exc.detail or 'namespaces "' in exc.detail):
        return None  # the namespace is going (or gone): nothing to tell anyone, its jobs go with it
    if exc.status == 403 and "exceeded quota" in exc.detail:
        return "QuotaExceeded", f"the namespace's ResourceQuota refused to {what}: {exc.detail}", False
    if exc.status == 404 and exc.kind == RAYJOB_KIND and exc.verb == "create":
        message = (
            f"KubeRay is not installed: the API server does not serve {RAYJOB_API_VERSION} {RAYJOB_PLURAL} "
            f"({exc.detail}); install KubeRay {KUBERAY_VERSION}, the job starts once it is there"
        )
        return "KubeRayNotInstalled", message, False
    if exc.status == 403:
        if "admission webhook" in exc.detail or "denied the request" in exc.detail:
            return "RejectedByPolicy", f"a cluster policy refused to {what}: {exc.detail}", False
        return "Forbidden", f"the operator is not allowed to {what} ({exc.detail}); grant it in the operator's RBAC", False
    if exc.status == 500 and "failed calling webhook" in exc.detail:  # failurePolicy Fail, the webhook down: not passing
        return (
            "WebhookUnavailable",
            f"an admission webhook did not answer, so the API server refused to {what}: {exc.detail}",
            False,
        )
    if exc.status in (400, 422):
        return "RejectedByAPI", f"the API server refused to {what}: {exc.detail}", True
    return None


def retry_delay(attempt: int, failure: BaseException) -> float:
    """Seconds before Kopf retries a handler after ``failure`` on its ``attempt``-th retry (0 first).

    Exponential from a base that fits the cause, capped at ``RETRY_CAP_SECONDS``: 1,000 stuck jobs must not
    hammer the API server. A ``Retry-After`` from the server wins when it asks for longer.
    """
    base = 10.0
    if isinstance(failure, Retry):
        base = failure.delay
    elif isinstance(failure, ApiFailure) and (failure.status in (401, 403) or api_failure_verdict(failure) is not None):
        base = 30.0  # people fix RBAC, policies and installations slowly
    delay = min(RETRY_CAP_SECONDS, base * 2.0 ** max(0, attempt))
    if isinstance(failure, ApiFailure) and failure.retry_after is not None:
        delay = max(delay, min(RETRY_CAP_SECONDS, failure.retry_after))
    return delay
