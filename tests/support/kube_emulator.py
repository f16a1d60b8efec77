"""An in-process Kubernetes API server for the operator's tests, built on kmock's KubernetesEmulator.

This module owns the emulator: the resources it serves, the object store with the API-server semantics
that Kopf and the operator rely on, the HTTP handler, the thread that serves it on 127.0.0.1, and the
synchronous helpers the tests use (CRUD shortcuts, polling, kubeconfig, ``kubernetes`` client, request
counts). ``tests/support/kopf_runner.py`` runs a Kopf operator against it.

kmock 0.8 gives the HTTP server, API discovery, request recording and user-defined reactions
(``emu.kmock['patch', kmock.resource('v1/configmaps')] << 500`` still injects faults and wins over the
emulation). What it lacks or gets wrong is done here: ``GET /api/v1/namespaces`` answers 500 in kmock's
URL parser; objects get no ``resourceVersion``/``uid``/``creationTimestamp``/``generation``; lists carry
no real ``resourceVersion`` and watches ignore ``?resourceVersion=`` (events between list and watch are
lost); PUT is 404; ``/status`` is not separated from the rest of the object; JSON-patch ``test`` failures
are 500 instead of 422; ``labelSelector``/``fieldSelector`` are ignored; there is no optimistic concurrency
and no owner-reference garbage collection.

As the real API server does, it refuses strategic-merge patches on custom resources (415) and answers a
watch from a compacted resourceVersion with an ERROR "410 Expired" event.

What it still does not emulate (keep the real-cluster e2e suite for these): admission (schema validation,
defaulting, pruning, CEL rules), authentication and RBAC, server-side apply (a merge patch that creates, without
managedFields or conflicts), strategic-merge semantics for
lists of built-in types (treated as a merge patch), ``dryRun``, foreground deletion (treated as
background), periodic watch bookmarks, and controllers (no pods are ever started for a RayJob).
kmock records every request and (with ``mirror_objects``) every object version in memory: fine for
tests, to be switched off (``mirror_objects=False``) or kept short in long benchmarks.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import pathlib
import random
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml
from kmock._internal import parsing as _kmock_parsing
from kmock._internal import rendering as _kmock_rendering

if TYPE_CHECKING:
    import kubernetes.client

__all__ = [
    "DEFAULT_RESOURCES",
    "PODS",
    "WORKLOADS",
    "ApiError",
    "EmulatorHandler",
    "KubeEmulator",
    "ObjectStore",
    "ResourceSpec",
    "wait_for",
]

T = TypeVar("T")
Body = dict[str, Any]

ALL_VERBS: Final = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"})
MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"
JSON_PATCH: Final = "application/json-patch+json"
APPLY_PATCH: Final = "application/apply-patch+yaml"

# metadata fields that only the server writes: a client's value is ignored on create and update.
_SYSTEM_METADATA: Final = (
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
)
_NAME_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# The API server's generateName alphabet: no vowels, no look-alike digits.
_GENERATE_ALPHABET: Final = "bcdfghjklmnpqrstvwxz2456789"


# --------------------------------------------------------------------------------------------------
# Resources


@dataclasses.dataclass(frozen=True)
class ResourceSpec:
    """One served resource, as the discovery API describes it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: frozenset[str] = frozenset()
    singular: str = ""
    short_names: frozenset[str] = frozenset()
    # metadata.generation exists for custom resources and for objects with a spec; not for ConfigMaps & co.
    has_generation: bool = True
    # Served from a CRD: the real API server refuses strategic-merge patches for these (415).
    custom: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """``group/version/plural`` (``v1/configmaps`` for the core group): the canonical reference."""
        return f"{self.api_version}/{self.plural}"

    @property
    def qualified_plural(self) -> str:
        """How the API server names the resource in its error messages: ``finetunejobs.finetune.dev``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def names(self) -> set[str]:
        singular = self.singular or self.kind.lower()
        return {
            self.key,
            self.plural,
            self.kind,
            singular,
            self.qualified_plural,
            f"{self.plural}.{self.version}.{self.group}" if self.group else f"{self.plural}.{self.version}",
            *self.short_names,
        }


def _custom(group: str, version: str, plural: str, kind: str, *, short_names: Iterable[str] = ()) -> ResourceSpec:
    return ResourceSpec(
        group, version, plural, kind, subresources=frozenset({"status"}), short_names=frozenset(short_names), custom=True
    )


FINETUNEJOBS: Final = _custom("finetune.dev", "v1alpha1", "finetunejobs", "FineTuneJob", short_names=["ftj"])
RAYJOBS: Final = _custom("ray.io", "v1", "rayjobs", "RayJob")
RAYCLUSTERS: Final = _custom("ray.io", "v1", "rayclusters", "RayCluster")
NAMESPACES: Final = ResourceSpec(
    "",
    "v1",
    "namespaces",
    "Namespace",
    namespaced=False,
    subresources=frozenset({"status"}),
    has_generation=False,
    short_names=frozenset({"ns"}),
)
# Served by default, though no controller starts pods here: tests seed a stuck Ray cluster's pods (the operator lists
# them) and give a pod its log with ``emu.set_pod_log`` (GET .../pods/NAME/log answers that text).
PODS: Final = ResourceSpec(
    "", "v1", "pods", "Pod", subresources=frozenset({"status", "log"}), has_generation=False, short_names=frozenset({"po"})
)
# Kueue's Workload: not served by default (a cluster without Kueue answers 404); Kueue tests add it.
WORKLOADS: Final = ResourceSpec(
    "kueue.x-k8s.io", "v1beta2", "workloads", "Workload", subresources=frozenset({"status"}), custom=True
)
CRDS: Final = ResourceSpec(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
    namespaced=False, subresources=frozenset({"status"}), short_names=frozenset({"crd", "crds"}),
)  # fmt: skip

DEFAULT_RESOURCES: Final[tuple[ResourceSpec, ...]] = (
    FINETUNEJOBS,
    RAYJOBS,
    RAYCLUSTERS,
    ResourceSpec("", "v1", "configmaps", "ConfigMap", has_generation=False, short_names=frozenset({"cm"})),
    ResourceSpec("", "v1", "secrets", "Secret", has_generation=False),
    ResourceSpec("", "v1", "events", "Event", has_generation=False, short_names=frozenset({"ev"})),
    PODS,
    NAMESPACES,
    ResourceSpec("", "v1", "serviceaccounts", "ServiceAccount", has_generation=False, short_names=frozenset({"sa"})),
    ResourceSpec("rbac.authorization.k8s.io", "v1", "roles", "Role", has_generation=False),
    ResourceSpec("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", has_generation=False),
    ResourceSpec("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short_names=frozenset({"netpol"})),
    CRDS,
    # Kopf itself needs no leases (it peers through KopfPeering objects, and tests run it standalone);
    # they are served for leader election or anything else in the operator that may want them.
    ResourceSpec("coordination.k8s.io", "v1", "leases", "Lease", has_generation=False),
)


def crd_for(spec: ResourceSpec) -> Body:
    """A minimal CustomResourceDefinition object for a custom resource (enough for discovery & Kopf)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": spec.qualified_plural},
        "spec": {
            "group": spec.group,
            "scope": "Namespaced" if spec.namespaced else "Cluster",
            "names": {
                "plural": spec.plural,
                "singular": spec.singular or spec.kind.lower(),
                "kind": spec.kind,
                "listKind": f"{spec.kind}List",
                "shortNames": sorted(spec.short_names),
            },
            "versions": [
                {
                    "name": spec.version,
                    "served": True,
                    "storage": True,
                    "subresources": {sub: {} for sub in sorted(spec.subresources)},
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }


def _specs_from_crd(crd: Mapping[str, Any]) -> list[ResourceSpec]:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    result = []
    for version in spec.get("versions") or []:
        if version.get("served", True):
            result.append(
                ResourceSpec(
                    group=spec.get("group", ""),
                    version=version["name"],
                    plural=names["plural"],
                    kind=names["kind"],
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    subresources=frozenset((version.get("subresources") or {}).keys()),
                    singular=names.get("singular", ""),
                    short_names=frozenset(names.get("shortNames") or ()),
                    custom=True,
                )
            )
    return result


# --------------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """An API failure with the ``Status`` body the real API server would send."""

    def __init__(self, code: int, reason: str, message: str, *, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    def status(self) -> Body:
        body: Body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _details(spec: ResourceSpec, name: str) -> dict[str, str]:
    return {"name": name, "group": spec.group, "kind": spec.plural}


def _not_found(spec: ResourceSpec, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{spec.qualified_plural} "{name}" not found', details=_details(spec, name))


def _already_exists(spec: ResourceSpec, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{spec.qualified_plural} "{name}" already exists', details=_details(spec, name))


def _conflict(spec: ResourceSpec, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {spec.qualified_plural} "{name}": '
        "the object has been modified; please apply your changes to the latest version and try again",
        details=_details(spec, name),
    )


def _invalid(spec: ResourceSpec, name: str, field: str, message: str) -> ApiError:
    kind = f"{spec.kind}.{spec.group}" if spec.group else spec.kind
    return ApiError(
        422,
        "Invalid",
        f'{kind} "{name}" is invalid: {field}: {message}',
        details={**_details(spec, name), "kind": spec.kind, "causes": [{"field": field, "message": message}]},
    )


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# --------------------------------------------------------------------------------------------------
# Selectors


@dataclasses.dataclass(frozen=True)
class _Requirement:
    """One term of a label selector (``a=b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``, ``a``, ``!a``)."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op in ("=", "in"):
            return self.key in labels and labels[self.key] in self.values
        # "!=" and "notin" also match objects without the label, as in Kubernetes.
        return labels.get(self.key) not in self.values


_LABEL_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_LABEL_VALUE = r"[-A-Za-z0-9_.]*"
_EQUALITY_RE: Final = re.compile(rf"^({_LABEL_KEY})\s*(==|=|!=)\s*({_LABEL_VALUE})$")
_SET_RE: Final = re.compile(rf"^({_LABEL_KEY})\s+(in|notin)\s*\(([^)]*)\)$")
_EXISTS_RE: Final = re.compile(rf"^(!?)\s*({_LABEL_KEY})$")


def _split_terms(selector: str) -> list[str]:
    # Commas separate terms except inside "in (a,b)" sets.
    terms: list[str] = []
    current: list[str] = []
    depth = 0
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    terms.append("".join(current).strip())
    return [term for term in terms if term]


def parse_label_selector(selector: str | None) -> tuple[_Requirement, ...]:
    """Parse a ``labelSelector`` query value; malformed ones are a 400, as in Kubernetes."""
    requirements = []
    for term in _split_terms(selector or ""):
        if match := _EQUALITY_RE.match(term):
            key, op, value = match.groups()
            requirements.append(_Requirement(key, "!=" if op == "!=" else "=", frozenset({value})))
        elif match := _SET_RE.match(term):
            key, op, values = match.groups()
            requirements.append(_Requirement(key, op, frozenset(v.strip() for v in values.split(",") if v.strip())))
        elif match := _EXISTS_RE.match(term):
            negation, key = match.groups()
            requirements.append(_Requirement(key, "!exists" if negation else "exists"))
        else:
            raise _bad_request(f"unable to parse requirement: {term!r}")
    return tuple(requirements)


@dataclasses.dataclass(frozen=True)
class _FieldRequirement:
    path: tuple[str, ...]
    value: str
    negated: bool

    def matches(self, obj: Mapping[str, Any]) -> bool:
        current: Any = obj
        for part in self.path:
            current = current.get(part) if isinstance(current, Mapping) else None
        actual = "" if current is None else str(current)
        return (actual == self.value) != self.negated


def parse_field_selector(selector: str | None) -> tuple[_FieldRequirement, ...]:
    """Parse a ``fieldSelector``: ``path=value``/``path!=value`` terms over any dotted field path."""
    requirements = []
    for term in _split_terms(selector or ""):
        match = re.match(r"^([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)$", term)
        if not match:
            raise _bad_request(f"invalid field selector: {term!r}")
        path, op, value = match.groups()
        requirements.append(_FieldRequirement(tuple(path.split(".")), value.strip(), op == "!="))
    return tuple(requirements)


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


# --------------------------------------------------------------------------------------------------
# Patching


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, ``None`` deletes a key, lists are replaced."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _apply_patch(spec: ResourceSpec, name: str, obj: Body, patch: Any, content_type: str) -> Body:
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == JSON_PATCH:
        if not isinstance(patch, list):
            raise _bad_request("a JSON patch must be a list of operations")
        try:
            result = jsonpatch.apply_patch(obj, patch, in_place=False)
        except jsonpatch.JsonPatchTestFailed as e:
            # Kopf relies on this: its finalizer patches test metadata.resourceVersion and expect 422.
            raise _invalid(spec, name, "test", str(e)) from e
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
            raise _invalid(spec, name, "patch", str(e)) from e
        if not isinstance(result, dict):
            raise _invalid(spec, name, "patch", "the patched object is not an object")
        return result
    # Server-side apply is approximated by a merge patch (no managedFields, no conflicts): enough for a client
    # that applies a whole object it owns.
    if media_type in (MERGE_PATCH, STRATEGIC_MERGE_PATCH, APPLY_PATCH, "application/json", ""):
        if media_type == STRATEGIC_MERGE_PATCH and spec.custom:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: "
                f"{JSON_PATCH}, {MERGE_PATCH}, {APPLY_PATCH}",
            )
        if not isinstance(patch, Mapping):
            raise _bad_request("a merge patch must be a JSON object")
        result = merge_patch(obj, patch)
        assert isinstance(result, dict)
        return result
    raise ApiError(415, "UnsupportedMediaType", f"the emulator does not support the patch type {content_type!r}")


# --------------------------------------------------------------------------------------------------
# The object store


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


ObjectKey = tuple[str | None, str]  # (namespace, name); namespace is None for cluster-scoped objects


@dataclasses.dataclass(frozen=True)
class _Change:
    rv: int
    type: str
    obj: Body
    old: Body | None


@dataclasses.dataclass(eq=False)
class _Watcher:
    """One open watch request: its filters and the queue in the serving event loop."""

    spec: ResourceSpec
    namespace: str | None
    labels: tuple[_Requirement, ...]
    fields: tuple[_FieldRequirement, ...]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Body | None] = dataclasses.field(default_factory=asyncio.Queue)

    def selects(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj.get("metadata", {}).get("namespace") != self.namespace:
            return False
        labels = _labels(obj)
        return all(r.matches(labels) for r in self.labels) and all(f.matches(obj) for f in self.fields)

    def translate(self, change: _Change) -> Body | None:
        # As the API server's watch cache does: an object entering the selection is ADDED for this
        # watcher, one leaving it is DELETED, even if the underlying change was a modification.
        new_in = self.selects(change.obj)
        if change.type != "MODIFIED":
            return {"type": change.type, "object": change.obj} if new_in else None
        old_in = self.selects(change.old)
        if new_in:
            return {"type": "MODIFIED" if old_in else "ADDED", "object": change.obj}
        return {"type": "DELETED", "object": change.obj} if old_in else None

    def push(self, event: Body | None) -> bool:
        # Always through call_soon_threadsafe, even from the loop's own thread: it keeps the order of
        # the events as committed (callbacks run FIFO), whichever thread committed them.
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody listens anymore
            return False
        return True


Listener = Callable[[ResourceSpec, str, Body], None]


class ObjectStore:
    """The emulator's state and API semantics, independent of HTTP; thread-safe.

    Stored objects are never mutated after they are committed (every write stores a fresh dict), so
    events and HTTP responses can share them; the public facade hands out deep copies.
    """

    def __init__(
        self,
        resources: Iterable[ResourceSpec] = DEFAULT_RESOURCES,
        *,
        strict_namespaces: bool = True,
        history_limit: int = 10_000,
    ) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._generation = 0  # bumped on every commit: lets waiters detect changes without polling
        self._rv = 0
        self._specs: dict[str, ResourceSpec] = {}
        self._objects: dict[str, dict[ObjectKey, Body]] = {}
        self._uids: dict[str, tuple[str, ObjectKey]] = {}
        self._history: dict[str, collections.deque[_Change]] = {}
        self._compacted: dict[str, int] = {}
        self._history_limit = history_limit
        self._watchers: set[_Watcher] = set()
        self._listeners: list[Listener] = []
        self._resource_listeners: list[Callable[[ResourceSpec], None]] = []
        self.strict_namespaces = strict_namespaces
        for spec in resources:
            self.add_resource(spec)

    # ---- resources

    def add_resource(self, spec: ResourceSpec) -> ResourceSpec:
        with self._lock:
            if spec.key in self._specs:
                return self._specs[spec.key]
            self._specs[spec.key] = spec
            self._objects[spec.key] = {}
            self._history[spec.key] = collections.deque()
            self._compacted[spec.key] = 0
            for listener in self._resource_listeners:
                listener(spec)
            return spec

    @property
    def resources(self) -> list[ResourceSpec]:
        with self._lock:
            return list(self._specs.values())

    def lookup(self, group: str, version: str, plural: str) -> ResourceSpec | None:
        return self._specs.get(f"{group}/{version}/{plural}" if group else f"{version}/{plural}")

    def resolve(self, ref: str | ResourceSpec) -> ResourceSpec:
        """Find a resource by ``group/version/plural``, plural, kind, singular, short name or ``plural.group``."""
        if isinstance(ref, ResourceSpec):
            ref = ref.key
        with self._lock:
            if ref in self._specs:
                return self._specs[ref]
            found = [spec for spec in self._specs.values() if ref in spec.names()]
        if len(found) == 1:
            return found[0]
        if not found:
            raise KeyError(f"the emulator serves no resource {ref!r}")
        raise KeyError(f"ambiguous resource {ref!r}: {sorted(spec.key for spec in found)}")

    def resolve_object(self, obj: Mapping[str, Any]) -> ResourceSpec:
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        with self._lock:
            for spec in self._specs.values():
                if spec.api_version == api_version and spec.kind == kind:
                    return spec
        raise KeyError(f"the emulator serves no resource for apiVersion={api_version!r} kind={kind!r}")

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(spec, event_type, object)`` after every committed change (under the lock)."""
        self._listeners.append(listener)

    def add_resource_listener(self, listener: Callable[[ResourceSpec], None]) -> None:
        with self._lock:
            self._resource_listeners.append(listener)
            for spec in self._specs.values():
                listener(spec)

    # ---- reading

    @property
    def resource_version(self) -> int:
        return self._rv

    def get(self, spec: ResourceSpec, namespace: str | None, name: str) -> Body:
        with self._lock:
            obj = self._objects[spec.key].get(self._key(spec, namespace, name))
        if obj is None:
            raise _not_found(spec, name)
        return obj

    def list(
        self,
        spec: ResourceSpec,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[Body], int]:
        """The matching objects (sorted by namespace & name, as etcd keys are) and the list's resourceVersion."""
        labels, fields = parse_label_selector(label_selector), parse_field_selector(field_selector)
        with self._lock:
            items = [
                obj
                for (ns, _), obj in sorted(self._objects[spec.key].items(), key=lambda item: (item[0][0] or "", item[0][1]))
                if (namespace is None or ns == namespace)
                and all(r.matches(_labels(obj)) for r in labels)
                and all(f.matches(obj) for f in fields)
            ]
            return items, self._rv

    def exists_uid(self, uid: str) -> bool:
        return uid in self._uids

    # ---- writing

    def create(self, spec: ResourceSpec, namespace: str | None, body: Any, *, keep_status: bool = False) -> Body:
        if not isinstance(body, Mapping):
            raise _bad_request("the request body must be a JSON object")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise _bad_request("metadata must be an object")
        for field, expected in (("apiVersion", spec.api_version), ("kind", spec.kind)):
            if body.get(field) not in (None, "", expected):
                raise _bad_request(f"the {field} of the object ({body.get(field)!r}) does not match the endpoint ({expected!r})")
        body_ns = metadata.get("namespace")
        with self._lock:
            ns: str | None = None
            if spec.namespaced:
                if namespace and body_ns and namespace != body_ns:
                    raise _bad_request("the namespace of the provided object does not match the namespace sent on the request")
                ns = namespace or body_ns
                if not ns:
                    raise _bad_request("a namespace is required for a namespaced resource")
                self._check_namespace_open(ns)
            name = metadata.get("name")
            if not name:
                prefix = metadata.get("generateName")
                if not prefix:
                    raise _invalid(spec, "", "metadata.name", "Required value: name or generateName is required")
                name = self._generate_name(spec, ns, prefix)
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise _invalid(
                    spec,
                    str(name),
                    "metadata.name",
                    "Invalid value: a lowercase RFC 1123 subdomain must consist of "
                    "lower case alphanumeric characters, '-' or '.'",
                )
            key = (ns, name)
            if key in self._objects[spec.key]:
                raise _already_exists(spec, name)

            new_meta = {k: copy.deepcopy(v) for k, v in metadata.items() if k not in (*_SYSTEM_METADATA, "namespace", "name")}
            new_meta = {"name": name, **({"namespace": ns} if ns is not None else {}), **new_meta}
            new_meta["uid"] = str(uuid.uuid4())
            new_meta["creationTimestamp"] = _now()
            if spec.has_generation:
                new_meta["generation"] = 1
            obj: Body = {"apiVersion": spec.api_version, "kind": spec.kind, "metadata": new_meta}
            obj.update({k: copy.deepcopy(v) for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")})
            if spec.has_status and not keep_status:
                obj.pop("status", None)  # as the API server does when status is a subresource
            # What the namespace lifecycle and apiextensions controllers would write right away:
            if spec.key == NAMESPACES.key:
                new_meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
                obj["spec"] = {"finalizers": ["kubernetes"]}
                obj["status"] = {"phase": "Active"}
            if spec.key == CRDS.key:
                crd_spec = obj.get("spec") or {}
                obj["status"] = {
                    "acceptedNames": copy.deepcopy(crd_spec.get("names") or {}),
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "lastTransitionTime": _now()},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "lastTransitionTime": _now()},
                    ],
                    "storedVersions": [v["name"] for v in crd_spec.get("versions") or [] if v.get("storage")],
                }
            self._commit(spec, key, "ADDED", obj, None)
            self._uids[new_meta["uid"]] = (spec.key, key)
            if spec.key == CRDS.key:
                for served in _specs_from_crd(obj):
                    self.add_resource(served)
            return obj

    def replace(self, spec: ResourceSpec, namespace: str | None, name: str, body: Any, *, subresource: str | None = None) -> Body:
        """PUT: replace the object (or only its status on ``subresource="status"``)."""
        if not isinstance(body, Mapping) or not isinstance(body.get("metadata", {}), Mapping):
            raise _bad_request("the request body must be a JSON object")
        body_name = body.get("metadata", {}).get("name")
        if body_name not in (None, name):
            raise _bad_request(f"the name of the object ({body_name}) does not match the name on the URL ({name})")
        with self._lock:
            old = self.get(spec, namespace, name)
            precondition = body.get("metadata", {}).get("resourceVersion")
            if precondition not in (None, "") and precondition != old["metadata"]["resourceVersion"]:
                raise _conflict(spec, name)
            # As the API server does, a PUT body's empty name/namespace default to the URL's.
            metadata = {"name": name, **({"namespace": namespace} if spec.namespaced else {}), **body.get("metadata", {})}
            return self._update(spec, old, {**body, "metadata": metadata}, subresource)

    def patch(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        content_type: str = MERGE_PATCH,
        subresource: str | None = None,
    ) -> Body:
        with self._lock:
            old = self.get(spec, namespace, name)
            candidate = _apply_patch(spec, name, copy.deepcopy(old), patch, content_type)
            # A resourceVersion put into the object by the patch is a precondition, as in Kubernetes.
            if candidate.get("metadata", {}).get("resourceVersion") != old["metadata"]["resourceVersion"]:
                raise _conflict(spec, name)
            return self._update(spec, old, candidate, subresource)

    def delete(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        name: str,
        *,
        options: Mapping[str, Any] | None = None,
        propagation_policy: str | None = None,
    ) -> Body:
        """Delete now, or mark for deletion while finalizers remain; returns the last state."""
        options = options or {}
        policy = propagation_policy or options.get("propagationPolicy") or "Background"
        with self._lock:
            obj = self.get(spec, namespace, name)
            preconditions = options.get("preconditions") or {}
            if preconditions.get("uid") not in (None, obj["metadata"]["uid"]):
                raise _conflict(spec, name)
            if preconditions.get("resourceVersion") not in (None, obj["metadata"]["resourceVersion"]):
                raise _conflict(spec, name)
            key = self._key(spec, namespace, name)
            is_namespace = spec.key == NAMESPACES.key
            if obj["metadata"].get("finalizers") or (is_namespace and self._namespace_has_content(name)):
                if not obj["metadata"].get("deletionTimestamp"):
                    marked = copy.deepcopy(obj)
                    marked["metadata"]["deletionTimestamp"] = _now()
                    marked["metadata"]["deletionGracePeriodSeconds"] = 0
                    if is_namespace:
                        marked["status"] = {"phase": "Terminating"}
                    obj = self._commit(spec, key, "MODIFIED", marked, obj)
                if is_namespace:
                    self._empty_namespace(name)  # may finalize the namespace itself on its last object
                    current = self._objects[spec.key].get(key)
                    if current is None:
                        return obj
                    if not self._namespace_has_content(name) and not current["metadata"].get("finalizers"):
                        return self._remove(spec, key, current, policy)
                return self._objects[spec.key].get(key, obj)
            return self._remove(spec, key, obj, policy)

    def delete_collection(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[Body]:
        with self._lock:
            items, _ = self.list(spec, namespace, label_selector=label_selector, field_selector=field_selector)
            deleted = []
            for item in items:
                item_ns, item_name = item["metadata"].get("namespace"), item["metadata"]["name"]
                if self._key(spec, item_ns, item_name) in self._objects[spec.key]:  # not collected meanwhile
                    deleted.append(self.delete(spec, item_ns, item_name))
            return deleted

    # ---- watching

    def subscribe(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        *,
        label_selector: str | None,
        field_selector: str | None,
        since: str | None,
        send_initial_events: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[_Watcher, builtins.list[Body]]:
        """Register a watcher and compute its first events, atomically: nothing committed in between is lost.

        Without a resourceVersion (or with "0"), the watch starts with a synthetic ADDED for every
        existing object; with one, it replays the retained changes newer than it (or answers an ERROR
        "410 Expired" event if they were compacted, which makes Kopf re-list).
        """
        watcher = _Watcher(spec, namespace, parse_label_selector(label_selector), parse_field_selector(field_selector), loop)
        with self._lock:
            initial: list[Body] = []
            if since in (None, "", "0"):
                items, rv = self.list(spec, namespace, label_selector=label_selector, field_selector=field_selector)
                initial = [{"type": "ADDED", "object": obj} for obj in items]
                if send_initial_events:
                    initial.append(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": spec.api_version,
                                "kind": spec.kind,
                                "metadata": {"resourceVersion": str(rv), "annotations": {"k8s.io/initial-events-end": "true"}},
                            },
                        }
                    )
            else:
                try:
                    since_rv = int(str(since))
                except ValueError:
                    raise _bad_request(f"invalid resource version: {since!r}") from None
                if since_rv < self._compacted[spec.key]:
                    expired = ApiError(410, "Expired", f"too old resource version: {since_rv} ({self._compacted[spec.key]})")
                    return watcher, [{"type": "ERROR", "object": expired.status()}]
                for change in self._history[spec.key]:
                    if change.rv > since_rv and (event := watcher.translate(change)) is not None:
                        initial.append(event)
            self._watchers.add(watcher)
            return watcher, initial

    def unsubscribe(self, watcher: _Watcher) -> None:
        with self._lock:
            self._watchers.discard(watcher)

    def close_watches(self) -> None:
        """End every open watch stream (the emulator is stopping)."""
        with self._lock:
            for watcher in self._watchers:
                watcher.push(None)
            self._watchers.clear()

    def watch_count(self, spec: ResourceSpec | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watchers if spec is None or w.spec.key == spec.key)

    # ---- waiting

    def wait_until(self, predicate: Callable[[], T | None], timeout: float, *, interval: float = 0.05, message: str = "") -> T:
        """Re-evaluate ``predicate`` after every change (and every ``interval``) until it is truthy.

        The predicate runs outside the lock, so it may read the store or even call the emulator over
        HTTP. An ``AssertionError`` or a 404 ``ApiError`` from it counts as "not yet".
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                seen = self._generation
            done, last = _attempt(predicate)
            if done:
                return cast(T, last)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{message or 'condition'} not met within {timeout} s; last result: {last!r}")
            with self._changed:
                if self._generation == seen:
                    self._changed.wait(min(remaining, interval))

    # ---- internals (all called with the lock held)

    def _key(self, spec: ResourceSpec, namespace: str | None, name: str) -> ObjectKey:
        return (namespace if spec.namespaced else None, name)

    def _generate_name(self, spec: ResourceSpec, ns: str | None, prefix: str) -> str:
        while True:
            name = prefix + "".join(random.choice(_GENERATE_ALPHABET) for _ in range(5))
            if (ns, name) not in self._objects[spec.key]:
                return name

    def _check_namespace_open(self, ns: str) -> None:
        if not self.strict_namespaces:
            return
        namespace = self._objects[NAMESPACES.key].get((None, ns)) if NAMESPACES.key in self._objects else None
        if namespace is None:
            raise _not_found(NAMESPACES, ns)
        if namespace["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f"unable to create new content in namespace {ns} because it is being terminated",
                details={"name": ns, "kind": "namespaces"},
            )

    def _namespace_has_content(self, ns: str) -> bool:
        return any(
            key[0] == ns for spec_key, objects in self._objects.items() if self._specs[spec_key].namespaced for key in objects
        )

    def _empty_namespace(self, ns: str) -> None:
        for spec_key, objects in list(self._objects.items()):
            spec = self._specs[spec_key]
            if spec.namespaced:
                for key in [k for k in objects if k[0] == ns]:
                    if key in objects:  # an earlier deletion may have collected it already
                        self.delete(spec, ns, key[1])

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _commit(self, spec: ResourceSpec, key: ObjectKey, event_type: str, obj: Body, old: Body | None) -> Body:
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        if event_type == "DELETED":
            self._objects[spec.key].pop(key, None)
        else:
            self._objects[spec.key][key] = obj
        self._record(spec, _Change(self._rv, event_type, obj, old))
        return obj

    def _record(self, spec: ResourceSpec, change: _Change) -> None:
        history = self._history[spec.key]
        history.append(change)
        while len(history) > self._history_limit:
            self._compacted[spec.key] = history.popleft().rv
        for watcher in list(self._watchers):
            if watcher.spec.key == spec.key and (event := watcher.translate(change)) is not None and not watcher.push(event):
                self._watchers.discard(watcher)
        for listener in self._listeners:
            listener(spec, change.type, change.obj)
        self._generation += 1
        self._changed.notify_all()

    def _update(self, spec: ResourceSpec, old: Body, candidate: Body, subresource: str | None) -> Body:
        name = old["metadata"]["name"]
        if subresource not in (None, "status") or (subresource == "status" and not spec.has_status):
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({spec.qualified_plural}/{subresource})"
            )
        if subresource == "status":
            # Only .status changes through /status; everything else in the request is ignored.
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = copy.deepcopy(candidate["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(candidate)
            if spec.has_status:  # .status changes only through /status, as in the API server
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            new_meta = new.get("metadata")
            if not isinstance(new_meta, dict):
                raise _invalid(spec, name, "metadata", "Required value")
            if new_meta.get("name") != name or new_meta.get("namespace") != old["metadata"].get("namespace"):
                raise _invalid(spec, name, "metadata.name", "Invalid value: field is immutable")
            for field in _SYSTEM_METADATA:
                if field in old["metadata"]:
                    new_meta[field] = old["metadata"][field]
                else:
                    new_meta.pop(field, None)
            if old["metadata"].get("deletionTimestamp"):
                added = set(new_meta.get("finalizers") or ()) - set(old["metadata"].get("finalizers") or ())
                if added:
                    raise _invalid(
                        spec,
                        name,
                        "metadata.finalizers",
                        "Forbidden: no new finalizers can be added if the object is being deleted",
                    )
            if not new_meta.get("finalizers"):
                new_meta.pop("finalizers", None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if spec.has_generation and self._generation_part(spec, new) != self._generation_part(spec, old):
            new["metadata"]["generation"] = old["metadata"].get("generation", 0) + 1

        # A no-op write changes nothing, not even resourceVersion, and sends no event (Kopf relies on it).
        if new == old:
            return old
        key = self._key(spec, old["metadata"].get("namespace"), name)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            if spec.key == NAMESPACES.key and self._namespace_has_content(name):
                return self._commit(spec, key, "MODIFIED", new, old)
            return self._remove(spec, key, new)
        return self._commit(spec, key, "MODIFIED", new, old)

    @staticmethod
    def _generation_part(spec: ResourceSpec, obj: Mapping[str, Any]) -> dict[str, Any]:
        # Everything but metadata (and status when it is a subresource) counts as the spec.
        skipped = {"apiVersion", "kind", "metadata", *(("status",) if spec.has_status else ())}
        return {k: v for k, v in obj.items() if k not in skipped}

    def _remove(self, spec: ResourceSpec, key: ObjectKey, obj: Body, policy: str = "Background") -> Body:
        final = self._commit(spec, key, "DELETED", copy.deepcopy(obj), None)
        uid = final["metadata"]["uid"]
        self._uids.pop(uid, None)
        self._collect_dependents(uid, orphan=policy == "Orphan")
        namespace = key[0]
        if spec.namespaced and namespace is not None:
            ns_obj = self._objects[NAMESPACES.key].get((None, namespace)) if NAMESPACES.key in self._objects else None
            terminating = (
                ns_obj is not None and ns_obj["metadata"].get("deletionTimestamp") and not ns_obj["metadata"].get("finalizers")
            )
            if ns_obj is not None and terminating and not self._namespace_has_content(namespace):
                self._remove(NAMESPACES, (None, namespace), ns_obj)
        return final

    def _collect_dependents(self, owner_uid: str, *, orphan: bool) -> None:
        # The garbage collector, run synchronously: dependents whose owners are all gone are deleted
        # (recursively, honouring their finalizers); with the Orphan policy they only lose the reference.
        for spec_key, objects in list(self._objects.items()):
            spec = self._specs[spec_key]
            for key, obj in list(objects.items()):
                refs = obj["metadata"].get("ownerReferences") or []
                if not any(ref.get("uid") == owner_uid for ref in refs) or key not in objects:
                    continue
                if orphan:
                    remaining = [ref for ref in refs if ref.get("uid") != owner_uid]
                    self._update(spec, obj, merge_patch(obj, {"metadata": {"ownerReferences": remaining or None}}), None)
                elif not any(self.exists_uid(ref.get("uid", "")) for ref in refs):
                    current = objects.get(key)
                    if current is not None and not current["metadata"].get("deletionTimestamp"):
                        self.delete(spec, key[0], key[1])


# --------------------------------------------------------------------------------------------------
# HTTP: kmock's emulator with the store behind it


# kmock 0.8 parses /api/v1/namespaces[/name] as "namespace <name>" and fails on the bare list URL
# (ValueError → HTTP 500). Namespaces are a resource; these URLs are theirs. Patched once, narrowly:
# only those URLs parse differently; everything else goes to kmock's parser unchanged.
_NAMESPACE_URL: Final = re.compile(r"^/api/(?P<version>v1)/namespaces(?:/(?P<name>[^/]+)(?:/(?P<sub>status|finalize))?)?/?$")
_kmock_parse_path = _kmock_parsing.parse_path


def _parse_path(path: str) -> _kmock_parsing.ParsedPath:
    if match := _NAMESPACE_URL.match(path):
        return _kmock_parsing.ParsedPath(
            group="", version=match["version"], plural="namespaces", name=match["name"], subresource=match["sub"]
        )
    return _kmock_parse_path(path)


if getattr(_kmock_parsing.parse_path, "__module__", "") != __name__:
    _kmock_parsing.parse_path = _parse_path


def _is_true(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def _verb(request: kmock.Request) -> str:
    resource = request.resource
    if resource is None or resource.plural is None:
        return "discovery"
    method = str(request.method.value).upper() if request.method is not None else ""
    if method == "GET":
        if request.name is not None:
            return "get"
        return "watch" if _is_true(request.params.get("watch")) else "list"
    if method == "DELETE" and request.name is None:
        return "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())


@attrs.define(kw_only=True, eq=False)
class EmulatorHandler(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with an :class:`ObjectStore` serving every resource URL.

    kmock keeps: the discovery endpoints, request recording, user reactions (they take precedence, so
    faults can be injected), and ``objects`` — a read-only mirror of the store with full history.
    """

    store: ObjectStore
    mirror_objects: bool = True
    # (namespace, pod, container or None) -> the text GET .../pods/NAME/log answers; None: any container.
    pod_logs: dict[tuple[str, str, str | None], str] = attrs.field(factory=dict)
    _counts: collections.Counter[tuple[str, str]] = attrs.field(factory=collections.Counter, init=False)
    _counts_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    # By bearer token too: tests give each operator replica a token of its own to tell their requests apart.
    _token_counts: collections.Counter[tuple[str, str, str]] = attrs.field(factory=collections.Counter, init=False)
    # TokenReview and SubjectAccessReview (what an authenticating server such as the operator's /metrics asks):
    # bearer token -> the user it is (``username``, ``uid``, ``groups``), and the (user, non-resource path, verb)
    # allowed. A review of anything else says no, as the API server does for an unknown token.
    tokens: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    allowed: set[tuple[str, str, str]] = attrs.field(factory=set)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Just above kmock's own fallbacks (which stay for the discovery URLs), below any user reaction.
        (self.fallback**1)[self._is_resource_url] << self._serve_resource
        self.store.add_resource_listener(self._declare)
        if self.mirror_objects:
            self.store.add_listener(self._mirror)

    # ---- kmock integration

    def _declare(self, spec: ResourceSpec) -> None:
        # Discovery must list verbs, or Kopf treats the resource as non-watchable and skips it.
        self.resources[kmock.resource(spec.group, spec.version, spec.plural)] = kmock.ResourceInfo(
            kind=spec.kind,
            singular=spec.singular or spec.kind.lower(),
            namespaced=spec.namespaced,
            verbs=set(ALL_VERBS),
            shortnames=set(spec.short_names),
            subresources=set(spec.subresources),
        )

    def _mirror(self, spec: ResourceSpec, event_type: str, obj: Body) -> None:
        meta = obj["metadata"]
        key = (kmock.resource(spec.group, spec.version, spec.plural), meta.get("namespace"), meta["name"])
        objects = self._objects
        if event_type == "DELETED":
            if key in objects:
                objects[key].delete()
        elif key in objects:
            if objects[key].deleted:
                objects[key].create(copy.deepcopy(obj))
            else:
                objects[key].history.append(copy.deepcopy(obj))
        else:
            objects[key] = copy.deepcopy(obj)

    async def _handle(self, request: kmock.Request) -> Any:
        token = str(request.headers.get("Authorization") or "").removeprefix("Bearer ")
        with self._counts_lock:
            self._counts[_verb(request), self._count_key(request)] += 1
            self._token_counts[token, _verb(request), self._count_key(request)] += 1
        # Skip KubernetesEmulator._handle: it mutates kmock's own object dicts before any reaction runs
        # (with none of the semantics above); the store does that work in _serve_resource instead.
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    @staticmethod
    def _count_key(request: kmock.Request) -> str:
        resource = request.resource
        if resource is None or resource.plural is None:
            return ""
        key = (
            f"{resource.group}/{resource.version}/{resource.plural}"
            if resource.group
            else f"{resource.version}/{resource.plural}"
        )
        return f"{key}/{request.subresource}" if request.subresource else key

    def request_counts(self) -> collections.Counter[tuple[str, str]]:
        with self._counts_lock:
            return collections.Counter(self._counts)

    def token_counts(self, token: str) -> collections.Counter[tuple[str, str]]:
        with self._counts_lock:
            return collections.Counter({(verb, key): n for (who, verb, key), n in self._token_counts.items() if who == token})

    def reset_request_counts(self) -> None:
        with self._counts_lock:
            self._counts.clear()
            self._token_counts.clear()

    async def _serve_version(self, request: kmock.Request) -> Any:
        # kmock names the core group's version "/v1"; the API server (and clients' discovery) say "v1".
        result = await super()._serve_version(request)
        if isinstance(result, dict) and str(result.get("groupVersion", "")).startswith("/"):
            result["groupVersion"] = result["groupVersion"][1:]
        return result

    @staticmethod
    def _is_resource_url(request: kmock.Request) -> bool:
        return request.resource is not None and request.resource.plural is not None

    # ---- serving

    def _serve_resource(self, request: kmock.Request) -> _kmock_rendering.Response:
        # kmock's Response keeps the status of the last reply in the (shared) reaction, so every reply
        # here states its status explicitly; and it runs synchronously, so no other request interleaves.
        try:
            status, payload = self._dispatch(request)
        except ApiError as e:
            status, payload = e.code, e.status()
        return _kmock_rendering.Response(status=status, payload=payload)

    def _review(self, plural: str, body: Any) -> tuple[int, Any]:
        spec = (body or {}).get("spec") or {}
        if plural == "tokenreviews":
            user = self.tokens.get(str(spec.get("token", "")))
            status: dict[str, Any] = {"authenticated": True, "user": user} if user else {"authenticated": False}
            return 201, {**body, "status": status}
        attributes = spec.get("nonResourceAttributes") or {}
        allowed = (spec.get("user"), attributes.get("path"), attributes.get("verb")) in self.allowed
        return 201, {**body, "status": {"allowed": allowed}}

    def _dispatch(self, request: kmock.Request) -> tuple[int, Any]:
        resource = request.resource
        assert resource is not None and resource.plural is not None
        reviews = {("authentication.k8s.io", "tokenreviews"), ("authorization.k8s.io", "subjectaccessreviews")}
        if (resource.group, resource.plural) in reviews and request.method is not None:
            if request.method.value.upper() != "POST":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            return self._review(resource.plural, request.data)
        spec = self.store.lookup(resource.group or "", resource.version or "", resource.plural)
        if spec is None or (request.namespace is not None and not spec.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name, namespace, sub = request.name, request.namespace, request.subresource
        if sub is not None and sub not in spec.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if spec.namespaced and name is not None and namespace is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        params = request.params
        method = request.method.value.upper() if request.method is not None else ""
        if method == "GET" and name is None:
            if _is_true(params.get("watch")):
                return 200, self._watch(request, spec, namespace)
            return 200, self._list(spec, namespace, params)
        if method == "GET" and name is not None and sub == "log":
            return 200, self._pod_log(spec, namespace or "", name, params.get("container"))
        if method == "GET" and name is not None:
            return 200, self.store.get(spec, namespace, name)
        if method == "POST" and name is None:
            return 201, self.store.create(spec, namespace, request.data)
        if method == "PUT" and name is not None:
            return 200, self.store.replace(spec, namespace, name, request.data, subresource=sub)
        if method == "PATCH" and name is not None:
            content_type = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
            if content_type.split(";")[0].strip().lower() == APPLY_PATCH:
                return self._server_side_apply(spec, namespace, name, request)
            return 200, self.store.patch(spec, namespace, name, request.data, content_type=content_type, subresource=sub)
        if method == "DELETE" and name is not None:
            options = request.data if isinstance(request.data, Mapping) else {}
            return 200, self.store.delete(
                spec, namespace, name, options=options, propagation_policy=params.get("propagationPolicy")
            )
        if method == "DELETE" and name is None:
            items = self.store.delete_collection(
                spec, namespace, label_selector=params.get("labelSelector"), field_selector=params.get("fieldSelector")
            )
            return 200, {"apiVersion": spec.api_version, "kind": f"{spec.kind}List", "metadata": {}, "items": items}
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource ({method})")

    def _pod_log(self, spec: ResourceSpec, namespace: str, name: str, container: str | None) -> bytes:
        pod = self.store.get(spec, namespace, name)  # 404 for a pod that is not there, as the API server
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        if container is None and len(containers) > 1:
            raise _bad_request(f"a container name must be specified for pod {name}, choose one of: {containers}")
        if container is not None and container not in containers:
            raise _bad_request(f"container {container} is not valid for pod {name}")
        text = self.pod_logs.get((namespace, name, container), self.pod_logs.get((namespace, name, None), ""))
        return text.encode()

    def _server_side_apply(self, spec: ResourceSpec, namespace: str | None, name: str, request: kmock.Request) -> tuple[int, Any]:
        """Create when absent, else a merge patch; fieldManager is required, as on the API server."""
        if not request.params.get("fieldManager"):
            raise _bad_request("PatchOptions.meta.k8s.io is invalid: fieldManager: Required value: is required for apply patch")
        body = request.data if isinstance(request.data, Mapping) else yaml.safe_load(request.text or "{}")
        try:
            self.store.get(spec, namespace, name)
        except ApiError as e:
            if e.code != 404:
                raise
            return 201, self.store.create(spec, namespace, body)
        return 200, self.store.patch(spec, namespace, name, body, content_type=APPLY_PATCH)

    def _list(self, spec: ResourceSpec, namespace: str | None, params: Mapping[str, str]) -> Body:
        items, rv = self.store.list(
            spec, namespace, label_selector=params.get("labelSelector"), field_selector=params.get("fieldSelector")
        )
        metadata: Body = {"resourceVersion": str(rv)}
        # Pagination: "continue" carries the last returned key and the first page's resourceVersion.
        if token := params.get("continue"):
            try:
                last_ns, last_name, rv_text = json.loads(token)
            except (ValueError, TypeError):
                raise ApiError(410, "Expired", "the provided continue parameter is invalid") from None
            start = (last_ns or "", last_name)
            items = [o for o in items if (o["metadata"].get("namespace") or "", o["metadata"]["name"]) > start]
            metadata["resourceVersion"] = rv_text
        limit = int(params.get("limit") or 0)
        if limit > 0 and len(items) > limit:
            items = items[:limit]
            last = items[-1]["metadata"]
            metadata["continue"] = json.dumps([last.get("namespace"), last["name"], metadata["resourceVersion"]])
        return {"apiVersion": spec.api_version, "kind": f"{spec.kind}List", "metadata": metadata, "items": items}

    def _watch(self, request: kmock.Request, spec: ResourceSpec, namespace: str | None) -> AsyncIterator[Any]:
        params = request.params
        # Subscribing here, synchronously and before the stream starts, makes list+watch gapless.
        watcher, initial = self.store.subscribe(
            spec,
            namespace,
            label_selector=params.get("labelSelector"),
            field_selector=params.get("fieldSelector"),
            since=params.get("resourceVersion"),
            send_initial_events=_is_true(params.get("sendInitialEvents")),
            loop=asyncio.get_running_loop(),
        )
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        return self._stream_events(request, watcher, initial, timeout)

    async def _stream_events(
        self, request: kmock.Request, watcher: _Watcher, initial: list[Body], timeout: float | None
    ) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        try:
            yield b""  # sends the headers now, as the API server does, even if no event comes for a while
            for first in initial:
                yield first
                if first["type"] == "ERROR":
                    return
            while True:
                wait = 1.0 if deadline is None else min(1.0, deadline - loop.time())
                if wait <= 0:
                    return  # timeoutSeconds elapsed: the server closes the stream
                try:
                    event: Body | None = await asyncio.wait_for(watcher.queue.get(), timeout=wait)
                except asyncio.TimeoutError:
                    # Nothing to write means no write error either: notice gone clients by their transport.
                    raw = request._raw_request
                    transport = raw.transport if raw is not None else None
                    if transport is None or transport.is_closing():
                        return
                    continue
                if event is None:
                    return
                yield event
        finally:
            self.store.unsubscribe(watcher)


# --------------------------------------------------------------------------------------------------
# Polling


def _attempt(predicate: Callable[[], object]) -> tuple[bool, object]:
    """One evaluation: (True, value) when truthy; else (False, the value or the "not yet" error).

    An ``AssertionError`` or a 404 ``ApiError`` means "not yet"; any other error propagates.
    """
    try:
        value = predicate()
    except AssertionError as e:
        return False, e
    except ApiError as e:
        if e.code != 404:
            raise
        return False, e
    return bool(value), value


def wait_for(predicate: Callable[[], T | None], timeout: float = 10.0, *, interval: float = 0.02, message: str = "") -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    An ``AssertionError`` (so ``lambda: check(...)`` helpers with asserts work) or a 404 ``ApiError``
    counts as "not yet". On timeout, raises ``TimeoutError`` with the last result or error.
    """
    deadline = time.monotonic() + timeout
    while True:
        done, last = _attempt(predicate)
        if done:
            return cast(T, last)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message or 'condition'} not met within {timeout} s; last result: {last!r}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------
# The facade: a running emulator with synchronous helpers


class KubeEmulator:
    """A Kubernetes API emulator served over HTTP on 127.0.0.1 from a background thread.

    Use as a context manager (``with KubeEmulator() as emu: ...``) or ``start()``/``stop()``. The CRUD
    helpers act directly on the store (no HTTP), are thread-safe, and return deep copies; resources are
    named by ``group/version/plural``, plural, kind, short name or ``plural.group``. Namespaced calls
    take the namespace before the name, and ``None`` for cluster-scoped objects.
    """

    def __init__(
        self,
        resources: Iterable[ResourceSpec] = DEFAULT_RESOURCES,
        *,
        namespaces: Iterable[str] = ("default", "kube-system"),
        strict_namespaces: bool = True,
        preload_crds: bool = True,
        history_limit: int = 10_000,
        mirror_objects: bool = True,
        port: int | None = None,
    ) -> None:
        self.store = ObjectStore(resources, strict_namespaces=strict_namespaces, history_limit=history_limit)
        self.kmock = EmulatorHandler(store=self.store, mirror_objects=mirror_objects)
        self._port = port
        self._url: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        for namespace in namespaces:
            self.add_namespace(namespace)
        if preload_crds:
            for spec in self.store.resources:
                if spec.custom:
                    self.store.create(CRDS, None, crd_for(spec))

    # ---- lifecycle

    def start(self, timeout: float = 10.0) -> KubeEmulator:
        if self._thread is not None:
            raise RuntimeError("the emulator is already started")
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._failure is not None:
            raise RuntimeError(f"the emulator did not start: {self._failure!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already gone
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the emulator's server thread did not stop in time")
        self._thread = None
        if self._failure is not None:
            raise RuntimeError("the emulator's server failed") from self._failure

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to the test thread by start()/stop()
            self._failure = e
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.kmock, kmock.Server(self.kmock, port=self._port) as server:
            self._url = str(server.url).rstrip("/")
            self._started.set()
            await self._stop.wait()
            # Open watches would hold the server's shutdown until their clients go: end them first.
            self.store.close_watches()
            await asyncio.sleep(0.01)

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the emulator is not started")
        return self._url

    # ---- CRUD helpers (direct, thread-safe, deep copies)

    def resource(self, ref: str | ResourceSpec) -> ResourceSpec:
        return self.store.resolve(ref)

    def add_resource(self, spec: ResourceSpec, *, with_crd: bool | None = None) -> ResourceSpec:
        """Serve one more resource (a CRD object is created for custom ones unless ``with_crd=False``)."""
        self.store.add_resource(spec)
        if with_crd if with_crd is not None else spec.custom:
            with contextlib.suppress(ApiError):
                self.store.create(CRDS, None, crd_for(spec))
        return spec

    def add_namespace(self, name: str, *, labels: Mapping[str, str] | None = None) -> Body:
        """Create a namespace, or return the existing one."""
        with contextlib.suppress(ApiError):
            self.store.create(NAMESPACES, None, {"metadata": {"name": name, "labels": dict(labels or {})}})
        return self.get(NAMESPACES, None, name)

    def create(self, obj: Mapping[str, Any], *, namespace: str | None = None, keep_status: bool = False) -> Body:
        """Create from a full manifest (apiVersion & kind pick the resource); ``keep_status`` seeds .status."""
        spec = self.store.resolve_object(obj)
        ns = namespace or obj.get("metadata", {}).get("namespace") or ("default" if spec.namespaced else None)
        return copy.deepcopy(self.store.create(spec, ns, obj, keep_status=keep_status))

    def get(self, resource: str | ResourceSpec, namespace: str | None, name: str) -> Body:
        """The object, or ``ApiError`` 404."""
        return copy.deepcopy(self.store.get(self.store.resolve(resource), namespace, name))

    def find(self, resource: str | ResourceSpec, namespace: str | None, name: str) -> Body | None:
        """The object, or ``None`` if absent."""
        try:
            return self.get(resource, namespace, name)
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    def list(
        self,
        resource: str | ResourceSpec,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Body]:
        items, _ = self.store.list(
            self.store.resolve(resource), namespace, label_selector=label_selector, field_selector=field_selector
        )
        return copy.deepcopy(items)

    def replace(self, obj: Mapping[str, Any], *, subresource: str | None = None) -> Body:
        """PUT semantics (a ``metadata.resourceVersion`` in ``obj`` is a precondition)."""
        spec = self.store.resolve_object(obj)
        meta = obj.get("metadata", {})
        ns = meta.get("namespace") or ("default" if spec.namespaced else None)
        return copy.deepcopy(self.store.replace(spec, ns, meta["name"], obj, subresource=subresource))

    def patch(
        self,
        resource: str | ResourceSpec,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        subresource: str | None = None,
    ) -> Body:
        """A merge patch (a mapping) or a JSON patch (a list of operations)."""
        content_type = JSON_PATCH if isinstance(patch, Sequence) else MERGE_PATCH
        spec = self.store.resolve(resource)
        return copy.deepcopy(self.store.patch(spec, namespace, name, patch, content_type=content_type, subresource=subresource))

    def patch_status(self, resource: str | ResourceSpec, namespace: str | None, name: str, status: Mapping[str, Any]) -> Body:
        """Merge-patch ``.status`` through the status subresource (what a controller does)."""
        return self.patch(resource, namespace, name, {"status": dict(status)}, subresource="status")

    def delete(
        self, resource: str | ResourceSpec, namespace: str | None, name: str, *, propagation_policy: str | None = None
    ) -> Body:
        """Delete (or mark for deletion while finalizers remain); owners' dependents are collected."""
        spec = self.store.resolve(resource)
        return copy.deepcopy(self.store.delete(spec, namespace, name, propagation_policy=propagation_policy))

    def remove_finalizers(self, resource: str | ResourceSpec, namespace: str | None, name: str) -> Body | None:
        """Drop all finalizers (completing a pending deletion); ``None`` if the object is gone."""
        try:
            return self.patch(resource, namespace, name, {"metadata": {"finalizers": None}})
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    @property
    def resource_version(self) -> int:
        return self.store.resource_version

    def set_pod_log(self, namespace: str, pod: str, text: str, *, container: str | None = None) -> None:
        """What ``GET /api/v1/namespaces/NS/pods/POD/log`` answers (for ``container``; None: any container)."""
        self.kmock.pod_logs[namespace, pod, container] = text

    # ---- waiting

    def wait_until(self, predicate: Callable[[], T | None], timeout: float = 10.0, *, message: str = "") -> T:
        """Like :func:`wait_for`, but wakes up on every change in the emulator instead of sleeping."""
        return self.store.wait_until(predicate, timeout, message=message)

    def wait_for_object(
        self,
        resource: str | ResourceSpec,
        namespace: str | None,
        name: str,
        condition: Callable[[Body], Any] | None = None,
        *,
        timeout: float = 10.0,
    ) -> Body:
        """Wait until the object exists (and ``condition(obj)`` is truthy); return it."""

        def check() -> Body | None:
            obj = self.find(resource, namespace, name)
            return obj if obj is not None and (condition is None or condition(obj)) else None

        return self.wait_until(check, timeout, message=f"{resource} {namespace}/{name}")

    def wait_for_absence(self, resource: str | ResourceSpec, namespace: str | None, name: str, *, timeout: float = 10.0) -> None:
        self.wait_until(
            lambda: self.find(resource, namespace, name) is None, timeout, message=f"absence of {resource} {namespace}/{name}"
        )

    def watch_count(self, resource: str | ResourceSpec | None = None) -> int:
        """How many watch streams are open now (for one resource, or all)."""
        return self.store.watch_count(self.store.resolve(resource) if resource is not None else None)

    # ---- instrumentation

    def request_counts(
        self, resource: str | ResourceSpec | None = None, *, subresource: str | None = None
    ) -> collections.Counter[str]:
        """HTTP requests served so far per verb (get, list, watch, create, update, patch, delete,
        deletecollection, discovery), optionally only for one resource (and one subresource)."""
        key = None
        if resource is not None:
            key = self.store.resolve(resource).key
            key = f"{key}/{subresource}" if subresource else key
        result: collections.Counter[str] = collections.Counter()
        for (verb, res_key), count in self.kmock.request_counts().items():
            if key is None or res_key == key:
                result[verb] += count
        return result

    def requests_with_token(self, token: str) -> collections.Counter[tuple[str, str]]:
        """HTTP requests served so far that carried ``Authorization: Bearer <token>``, per (verb, group/version/plural)."""
        return self.kmock.token_counts(token)

    def reset_request_counts(self) -> None:
        self.kmock.reset_request_counts()

    @property
    def internal_errors(self) -> builtins.list[Exception]:
        """Unexpected exceptions inside the emulator (API errors like 404/409 are answers, not listed)."""
        return list(self.kmock.errors) if self.kmock.active else []

    # ---- clients

    def add_token(self, token: str, username: str, groups: Iterable[str] = ()) -> None:
        """A bearer token the emulator's TokenReview says is ``username`` (in ``groups``)."""
        self.kmock.tokens[token] = {"username": username, "uid": f"uid-{username}", "groups": list(groups)}

    def allow(self, username: str, path: str, verb: str = "get") -> None:
        """Let the emulator's SubjectAccessReview allow ``username`` to ``verb`` the non-resource URL ``path``."""
        self.kmock.allowed.add((username, path, verb))

    def kubeconfig(self, *, namespace: str = "default") -> Body:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kube-emulator", "cluster": {"server": self.url}}],
            # A token only because some clients insist on a user; the emulator ignores authentication.
            "users": [{"name": "kube-emulator", "user": {"token": "kube-emulator"}}],
            "contexts": [
                {
                    "name": "kube-emulator",
                    "context": {"cluster": "kube-emulator", "user": "kube-emulator", "namespace": namespace},
                }
            ],
            "current-context": "kube-emulator",
        }

    def write_kubeconfig(self, path: str | pathlib.Path, *, namespace: str = "default") -> pathlib.Path:
        """Write a kubeconfig for the emulator (for ``KUBECONFIG=…``, kubectl, ``kubernetes.config``)."""
        path = pathlib.Path(path)
        path.write_text(yaml.safe_dump(self.kubeconfig(namespace=namespace), sort_keys=False))
        return path

    def kubernetes_configuration(self) -> kubernetes.client.Configuration:
        import kubernetes.client

        configuration = kubernetes.client.Configuration(host=self.url)
        configuration.api_key = {"authorization": "kube-emulator"}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        return configuration

    def kubernetes_client(self) -> kubernetes.client.ApiClient:
        """An ``ApiClient`` of the official client bound to the emulator; close it (``with`` works)."""
        import kubernetes.client

        return kubernetes.client.ApiClient(configuration=self.kubernetes_configuration())

    @contextlib.contextmanager
    def as_default_kubernetes_config(self) -> Iterator[kubernetes.client.Configuration]:
        """Make ``kubernetes.client.ApiClient()`` (no arguments) reach the emulator, then restore the default.

        For code under test that builds its own clients; it is process-wide, so not for parallel tests.
        """
        import kubernetes.client

        previous = getattr(kubernetes.client.Configuration, "_default", None)
        configuration = self.kubernetes_configuration()
        kubernetes.client.Configuration.set_default(configuration)
        try:
            yield configuration
        finally:
            kubernetes.client.Configuration.set_default(previous)
