"""An in-memory stand-in for ``finetune_operator.k8s.Kube``: the reconcile rules' unit tests run against it.

It keeps objects by (kind, namespace, name), answers a second create (or a stale Lease update) with HTTP 409,
merge-patches (``None`` deletes a key), records every call, and raises an injected ``ApiFailure`` for a
chosen (verb, kind). It proves the rules; the emulator (integration tier) proves the HTTP conversation.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

from finetune_operator.failures import ApiFailure

Key = tuple[str, str, str]


def merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _event_fields(event: Mapping[str, Any]) -> dict[str, Any]:
    """An Event's fields a field selector may name, as the API server offers them (``type``, ``involvedObject.name``)."""
    about = {f"involvedObject.{k}": v for k, v in (event.get("involvedObject") or {}).items() if isinstance(v, str)}
    return {**{k: v for k, v in event.items() if isinstance(v, str)}, **about}


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []  # (verb, kind, name)
        self.event_selectors: list[str] = []  # the field selector of each Event LIST
        self.faults: dict[tuple[str, str], ApiFailure] = {}
        self._uids = itertools.count(1)
        self._versions = itertools.count(1)

    # ---- test helpers
    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Store ``obj`` as if someone else had created it (a uid is added when missing)."""
        stored = copy.deepcopy(dict(obj))
        stored["metadata"].setdefault("uid", f"fake-uid-{next(self._uids)}")
        stored["metadata"]["resourceVersion"] = str(next(self._versions))
        meta = stored["metadata"]
        self.objects[(stored["kind"], meta["namespace"], meta["name"])] = stored
        return stored

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace, name))

    def count(self, verb: str, kind: str | None = None) -> int:
        return sum(1 for v, k, _ in self.calls if v == verb and (kind is None or k == kind))

    def _call(self, verb: str, kind: str, name: str) -> None:
        self.calls.append((verb, kind, name))
        fault = self.faults.get((verb, kind))
        if fault is not None:
            raise fault

    # ---- the KubeApi protocol
    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("read", kind, name)
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]:
        self._call("list", "FineTuneJob", namespace or "*")
        found = [o for (kind, ns, _), o in self.objects.items() if kind == "FineTuneJob" and namespace in (None, ns)]
        return copy.deepcopy(found)

    def list_labelled(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        self._call("list", kind, selector)
        wanted = dict(term.split("=", 1) for term in selector.split(","))
        found = [
            o
            for (k, ns, _), o in self.objects.items()
            if k == kind and ns == namespace and wanted.items() <= (o["metadata"].get("labels") or {}).items()
        ]
        return copy.deepcopy(found)

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        self._call("list", "Pod", namespace)
        return self._select("Pod", namespace, label_selector, lambda obj: obj["metadata"].get("labels") or {})

    def list_events(self, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        self._call("list", "Event", namespace)
        self.event_selectors.append(field_selector)
        return self._select("Event", namespace, field_selector, _event_fields)

    def _select(self, kind: str, namespace: str, selector: str, fields: Any) -> list[dict[str, Any]]:
        """Objects of ``kind`` in ``namespace`` matching every ``key=value`` of ``selector`` (labels, or top fields)."""
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        found = [
            o
            for (k, ns, _), o in self.objects.items()
            if k == kind and ns == namespace and all(fields(o).get(key) == value for key, value in wanted.items())
        ]
        return copy.deepcopy(found)

    def create_or_get(self, obj: Mapping[str, Any], *, read_back: bool = True) -> tuple[dict[str, Any] | None, bool]:
        meta = obj["metadata"]
        self._call("create", obj["kind"], meta["name"])
        key = (obj["kind"], meta["namespace"], meta["name"])
        if key in self.objects:
            return (copy.deepcopy(self.objects[key]), False) if read_back else (None, False)
        return copy.deepcopy(self.put(obj)), True

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        self._call("patch", kind, name)
        key = (kind, namespace, name)
        if key not in self.objects:
            raise ApiFailure(f"patch {kind} {namespace}/{name}", 404, "HTTP 404 Not Found")
        return self._write(key, patch)

    def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any], *, resource_version: str | None = None
    ) -> dict[str, Any]:
        self._call("patch_status", kind, name)
        key = (kind, namespace, name)
        if key not in self.objects:
            raise ApiFailure(f"patch {kind} {namespace}/{name} status", 404, "HTTP 404 Not Found")
        if resource_version is not None and resource_version != self.objects[key]["metadata"]["resourceVersion"]:
            what = f"patch {kind} {namespace}/{name} status"
            raise ApiFailure(what, 409, "HTTP 409 Conflict: the object has been modified", kind=kind, verb="patch")
        return self._write(key, {"status": dict(status)})

    def _write(self, key: Key, patch: Mapping[str, Any]) -> dict[str, Any]:
        updated = merge(copy.deepcopy(self.objects[key]), patch)  # never mutate what a caller may still hold
        updated["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[key] = updated
        return copy.deepcopy(updated)

    # ---- the leadership.LeaseApi protocol
    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.read("Lease", namespace, name)

    def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        self._call("create", "Lease", name)
        if ("Lease", namespace, name) in self.objects:
            raise ApiFailure(f"create Lease {namespace}/{name}", 409, "HTTP 409 Conflict: already exists")
        return copy.deepcopy(self.put({**body, "metadata": {**body["metadata"], "namespace": namespace}}))

    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A PUT: refused (409) unless ``body`` carries the stored resourceVersion, as the API server does."""
        self._call("update", "Lease", name)
        stored = self.objects.get(("Lease", namespace, name))
        if stored is None:
            raise ApiFailure(f"update Lease {namespace}/{name}", 404, "HTTP 404 Not Found")
        if body["metadata"].get("resourceVersion") != stored["metadata"]["resourceVersion"]:
            raise ApiFailure(f"update Lease {namespace}/{name}", 409, "HTTP 409 Conflict: the object has been modified")
        return copy.deepcopy(self.put({**body, "metadata": {**body["metadata"], "namespace": namespace}}))


class Events(list[tuple[str, str, str]]):
    """An event sink (``status_writer.EventSink``) that keeps (type, reason, message) of every Event."""

    def __call__(self, obj: Any, type_: str, reason: str, message: str) -> None:
        self.append((type_, reason, message))

    @property
    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self]
