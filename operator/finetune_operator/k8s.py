"""The operator's Kubernetes API calls: create-or-get children, read and patch RayJobs and FineTuneJob status,
list a stuck job's pods and Warning Events.

A thin synchronous layer over the official client (Kopf runs sync handlers in its thread pool), speaking
plain dicts. Every failure is raised as ``ApiFailure`` naming the object (``kind namespace/name``) and
chained to the client's exception; the handlers decide what Kopf should do about it.

Custom resources are patched with ``application/merge-patch+json``: the client's default for a dict
body is a strategic merge patch, which the API server refuses (415) for custom resources.
"""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Final

import kubernetes.client
import urllib3
from kubernetes.client.exceptions import ApiException

from finetune_operator.api.versions import (
    GROUP,
    KIND,
    KUEUE_GROUP,
    KUEUE_VERSION,
    PLURAL,
    RAYJOB_GROUP,
    RAYJOB_KIND,
    RAYJOB_PLURAL,
    RAYJOB_VERSION,
    VERSION,
    WORKLOAD_KIND,
    WORKLOAD_PLURAL,
)
from finetune_operator.certificates import bundle_contains, merge_bundle
from finetune_operator.failures import ApiFailure

MERGE_PATCH: Final = "application/merge-patch+json"
JSON_PATCH: Final = "application/json-patch+json"
TIMEOUT: Final = (5.0, 30.0)  # connect, read: a handler must not hang on a dead connection
LEASE_TIMEOUT: Final = (2.0, 4.0)
_CORE: Final = {"ServiceAccount": "service_account", "ConfigMap": "config_map"}
_RBAC: Final = {"Role": "role", "RoleBinding": "role_binding"}
_NETWORKING: Final = {"NetworkPolicy": "network_policy"}
_CUSTOM: Final = {
    RAYJOB_KIND: (RAYJOB_GROUP, RAYJOB_VERSION, RAYJOB_PLURAL),
    KIND: (GROUP, VERSION, PLURAL),
    WORKLOAD_KIND: (KUEUE_GROUP, KUEUE_VERSION, WORKLOAD_PLURAL),
}


def _retry_after(exc: ApiException) -> float | None:
    """The seconds a 429/503 asked us to wait (``Retry-After``, in seconds; an HTTP date is ignored)."""
    headers: Any = exc.headers or {}
    raw = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def _detail(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        try:
            message = json.loads(exc.body or "{}").get("message")
        except (ValueError, AttributeError):
            message = None
        return f"HTTP {exc.status} {exc.reason}" + (f": {message}" if message else "")
    return f"API server unreachable: {exc}"


class Kube:
    """The calls the handlers make; one instance per operator (its client pools connections)."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(api_client)
        self.networking = kubernetes.client.NetworkingV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.coordination = kubernetes.client.CoordinationV1Api(api_client)
        self._deadline: float | None = None  # monotonic; see ``within``

    def within(self, seconds: float) -> Kube:
        """This client with every request bounded to end within ``seconds`` from now (total, not per read): a leader's
        fenced write (``leadership.Fenced``) must not land after its lease could have passed to another replica."""
        bounded = copy.copy(self)
        bounded._deadline = time.monotonic() + seconds
        return bounded

    def _timeout(self, what: str, kind: str, verb: str) -> Any:
        if self._deadline is None:
            return TIMEOUT
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise ApiFailure(what, None, "not sent: the leader's lease runs out before it could land", kind=kind, verb=verb)
        return min(left, sum(TIMEOUT))  # one number: urllib3's total timeout for the whole request

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        verb, kind = what.split()[:2]  # "create RayJob ns/name"
        timeout = self._timeout(what, kind, verb)
        try:
            return fn(*args, _request_timeout=timeout, **kwargs)
        except ApiException as exc:
            retry_after = _retry_after(exc)
            raise ApiFailure(what, exc.status, _detail(exc), kind=kind, verb=verb, retry_after=retry_after) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiFailure(what, None, _detail(exc), kind=kind, verb=verb) from exc

    def _plain(self, obj: Any) -> dict[str, Any]:
        client: Any = self.client  # sanitize_for_serialization is untyped
        plain = client.sanitize_for_serialization(obj)
        return dict(plain) if isinstance(plain, Mapping) else {}

    # ---- any child kind

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        what = f"create {kind} {ns}/{name}"
        if kind in _CORE:
            return self._plain(self._call(what, getattr(self.core, f"create_namespaced_{_CORE[kind]}"), ns, obj))
        if kind in _RBAC:
            return self._plain(self._call(what, getattr(self.rbac, f"create_namespaced_{_RBAC[kind]}"), ns, obj))
        if kind in _NETWORKING:
            fn = getattr(self.networking, f"create_namespaced_{_NETWORKING[kind]}")
            return self._plain(self._call(what, fn, ns, obj))
        group, version, plural = _CUSTOM[kind]
        return dict(self._call(what, self.custom.create_namespaced_custom_object, group, version, ns, plural, obj))

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        what = f"read {kind} {namespace}/{name}"
        try:
            if kind in _CORE:
                return self._plain(self._call(what, getattr(self.core, f"read_namespaced_{_CORE[kind]}"), name, namespace))
            if kind in _RBAC:
                return self._plain(self._call(what, getattr(self.rbac, f"read_namespaced_{_RBAC[kind]}"), name, namespace))
            if kind in _NETWORKING:
                fn = getattr(self.networking, f"read_namespaced_{_NETWORKING[kind]}")
                return self._plain(self._call(what, fn, name, namespace))
            group, version, plural = _CUSTOM[kind]
            return dict(self._call(what, self.custom.get_namespaced_custom_object, group, version, namespace, plural, name))
        except ApiFailure as exc:
            if exc.status == 404:
                return None
            raise

    def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]:
        """Every FineTuneJob in ``namespace`` (None: all namespaces), one LIST request."""
        group, version, plural = _CUSTOM[KIND]
        if namespace is None:
            found = self._call(f"list {KIND} (all namespaces)", self.custom.list_cluster_custom_object, group, version, plural)
        else:
            fn = self.custom.list_namespaced_custom_object
            found = self._call(f"list {KIND} {namespace}/*", fn, group, version, namespace, plural)
        return [dict(item) for item in found.get("items") or []]

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The pods in ``namespace`` matching ``label_selector``, one LIST request, as plain JSON."""
        fn = self.core.list_namespaced_pod
        return self._raw_list(f"list Pod {namespace}/*", fn, namespace, label_selector=label_selector)

    def list_events(self, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        """The core/v1 Events in ``namespace`` matching ``field_selector``, one LIST request, as plain JSON."""
        fn = self.core.list_namespaced_event
        return self._raw_list(f"list Event {namespace}/*", fn, namespace, field_selector=field_selector)

    def _raw_list(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        # Raw JSON rather than the client's models: no per-field deserialization cost, and an Event written through
        # events.k8s.io (KubeRay's recorder) can never fail the client's own checks of required fields. The body is
        # read inside _call, so that a connection dropped mid-body is an ApiFailure too.
        def fetch(*a: Any, **kw: Any) -> list[dict[str, Any]]:
            response = fn(*a, _preload_content=False, **kw)
            try:
                found = json.loads(response.data or b"{}")
            except ValueError:  # not JSON (a proxy's error page): nothing to read
                found = {}
            finally:
                response.release_conn()
            return [dict(item) for item in (found.get("items") or []) if isinstance(item, Mapping)]

        items: list[dict[str, Any]] = self._call(what, fetch, *args, **kwargs)
        return items

    def post_event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str, *, component: str) -> None:
        """Post a core/v1 Event about ``obj`` (a namespaced object), as Kopf's own ``kopf.event`` does."""
        meta = obj.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        about = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta.get("name"), "uid": meta.get("uid")}
        now = datetime.now(timezone.utc).isoformat()
        body = {
            "metadata": {"namespace": namespace, "generateName": f"{component}-event-"},
            "involvedObject": {**about, "namespace": namespace},
            "type": type_,
            "reason": reason,
            "message": message,
            "action": reason,
            "reportingComponent": component,
            "reportingInstance": component,
            "source": {"component": component},  # the "From" column of `kubectl describe`
            "firstTimestamp": now,
            "lastTimestamp": now,
            "eventTime": now,
            "count": 1,
        }
        self._call(f"create Event {namespace}/{meta.get('name')}", self.core.create_namespaced_event, namespace, body)

    def list_labelled(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        """The custom resources of ``kind`` in ``namespace`` matching the label ``selector``, one LIST request."""
        group, version, plural = _CUSTOM[kind]
        fn = self.custom.list_namespaced_custom_object
        found = self._call(f"list {kind} {namespace}/{selector}", fn, group, version, namespace, plural, label_selector=selector)
        return [dict(item) for item in found.get("items") or []]

    def create_or_get(self, obj: Mapping[str, Any], *, read_back: bool = True) -> tuple[dict[str, Any] | None, bool]:
        """(object, created?): an existing object of that name (HTTP 409) is read back (if asked), never duplicated."""
        try:
            return self.create(obj), True
        except ApiFailure as exc:
            if exc.status != 409:
                raise
        if not read_back:
            return None, False
        meta = obj["metadata"]
        existing = self.read(obj["kind"], meta["namespace"], meta["name"])
        if existing is None:  # deleted between our create and read: let Kopf retry
            raise ApiFailure(
                f"create {obj['kind']} {meta['namespace']}/{meta['name']}",
                409,
                "conflicts with an object being deleted",
                kind=obj["kind"],
                verb="create",
            )
        return existing, False

    # ---- custom resources

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch a custom resource's main resource (spec, metadata)."""
        group, version, plural = _CUSTOM[kind]
        fn = self.custom.patch_namespaced_custom_object
        what = f"patch {kind} {namespace}/{name}"
        return dict(self._call(what, fn, group, version, namespace, plural, name, dict(patch), _content_type=MERGE_PATCH))

    def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any], *, resource_version: str | None = None
    ) -> dict[str, Any]:
        """Merge-patch ``status`` through the status subresource (``None`` values delete keys).

        ``resource_version``: a precondition (HTTP 409 when the object changed since it was read), so that a
        decision taken on a stale read can never overwrite a newer status (e.g. turn Succeeded back to Running).
        """
        group, version, plural = _CUSTOM[kind]
        fn = self.custom.patch_namespaced_custom_object_status
        what = f"patch {kind} {namespace}/{name} status"
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return dict(self._call(what, fn, group, version, namespace, plural, name, body, _content_type=MERGE_PATCH))

    # ---- leader election (leadership.LeaseApi)

    def _lease_call(self, what: str, fn: Any, *args: Any) -> dict[str, Any]:
        # Short timeouts: a renewal that hangs must not outlast the renew deadline (leadership.Timing).
        try:
            return self._plain(fn(*args, _request_timeout=LEASE_TIMEOUT))
        except ApiException as exc:
            raise ApiFailure(what, exc.status, _detail(exc), kind="Lease", verb=what.split()[0]) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiFailure(what, None, _detail(exc), kind="Lease", verb=what.split()[0]) from exc

    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._lease_call(f"read Lease {namespace}/{name}", self.coordination.read_namespaced_lease, name, namespace)
        except ApiFailure as exc:
            if exc.status == 404:
                return None
            raise

    def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        what = f"create Lease {namespace}/{body['metadata']['name']}"
        return self._lease_call(what, self.coordination.create_namespaced_lease, namespace, dict(body))

    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT with the resourceVersion in ``body``: HTTP 409 when another replica wrote since it was read."""
        what = f"update Lease {namespace}/{name}"
        return self._lease_call(what, self.coordination.replace_namespaced_lease, name, namespace, dict(body))

    # ---- the admission webhook's configuration (only when the operator makes its own certificate)

    def set_webhook_ca_bundle(self, configuration: str, webhook: str, bundle: bytes) -> None:
        """Put ``bundle`` (PEM) into the ``caBundle`` of webhook ``webhook`` in ValidatingWebhookConfiguration ``configuration``,
        keeping the other replicas' CAs (``certificates.merge_bundle``).

        Read, then a JSON patch that first tests the entry's name: a list changed in between is refused (422) rather
        than the wrong entry patched. Nothing is written when the bundle's CAs are there already.
        """
        api = kubernetes.client.AdmissionregistrationV1Api(self.client)
        kind = "ValidatingWebhookConfiguration"
        found = self._plain(self._call(f"read {kind} {configuration}", api.read_validating_webhook_configuration, configuration))
        names = [entry.get("name") for entry in found.get("webhooks") or []]
        if webhook not in names:
            detail = f"it has no webhook named {webhook!r} (it has {names}); install the chart's or manifests/base's"
            raise ApiFailure(f"patch {kind} {configuration}", 404, detail, kind=kind, verb="patch")
        index = names.index(webhook)
        current = base64.b64decode((found["webhooks"][index].get("clientConfig") or {}).get("caBundle") or "")
        if bundle_contains(current, bundle):
            return
        # Other replicas' CAs stay trusted beside ours: every replica serves the webhook with its own certificate.
        encoded = base64.b64encode(merge_bundle(bundle, current, datetime.now(timezone.utc))).decode()
        patch = [
            {"op": "test", "path": f"/webhooks/{index}/name", "value": webhook},
            {"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": encoded},
        ]
        fn = api.patch_validating_webhook_configuration
        self._call(f"patch {kind} {configuration}", fn, configuration, patch, _content_type=JSON_PATCH)
