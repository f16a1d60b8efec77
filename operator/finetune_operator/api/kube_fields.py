"""The Kubernetes objects a job passes through as written (``pods.KubeObject``: volume sources, affinity), checked
against what core/v1 declares: ``unknown_fields``.

Why: the FineTuneJob CRD keeps these objects as they are (``x-kubernetes-preserve-unknown-fields``), but the RayJob the
operator writes them into has KubeRay's structural schema, and the API server prunes any key it does not declare,
without a word. ``claim_name`` for ``claimName``, or ``required_during_scheduling_ignored_during_execution`` in a node
affinity, validated locally and vanished on the cluster: the volume had no claim, the job ran with no placement rule.

The schemas are KubeRay's own PodSpec ones (its RayJob CRD, vendored in tests/data/kuberay-v1.7.0), extracted to
``kube_schemas.json`` by ``scripts/sync_crd.py`` (``extract``), which checks that the committed file has not drifted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import Any, Final

__all__ = ["SCHEMA_FILE", "extract", "undeclared", "unknown_fields"]

SCHEMA_FILE: Final = "kube_schemas.json"


def _slim(schema: dict[str, Any]) -> dict[str, Any]:
    """The parts of an OpenAPI schema that say which keys exist (no descriptions, formats or bounds)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _slim(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _slim(value)
        elif key in ("type", "x-kubernetes-preserve-unknown-fields"):
            out[key] = value
    return out


def extract(rayjob_crd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"volume": {source: schema}, "affinity": {part: schema}}`` from KubeRay's RayJob CRD (its head pod's spec)."""
    (version,) = [v for v in rayjob_crd["spec"]["versions"] if v.get("storage")]
    cluster = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rayClusterSpec"]
    pod = cluster["properties"]["headGroupSpec"]["properties"]["template"]["properties"]["spec"]["properties"]
    volume = pod["volumes"]["items"]["properties"]
    affinity = pod["affinity"]["properties"]
    return {
        "volume": {name: _slim(schema) for name, schema in sorted(volume.items()) if name != "name"},
        "affinity": {name: _slim(schema) for name, schema in sorted(affinity.items())},
    }


@cache
def _schemas() -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text())
    return loaded


def undeclared(obj: Any, schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, str, list[str]]]:
    """(path, key, the keys declared there) of every key in ``obj`` that ``schema`` does not declare (what the API
    server prunes); a free map (``additionalProperties``) or a preserved object accepts any key."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from undeclared(item, schema.get("items") or {}, f"{path}[{i}]")
        return
    if not isinstance(obj, dict):
        return
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    for key, value in obj.items():
        child = f"{path}.{key}" if path else str(key)
        if props is not None and key in props:
            yield from undeclared(value, props[key], child)
        elif isinstance(extra, dict):
            yield from undeclared(value, extra, child)
        elif props is not None:
            yield child, str(key), sorted(props)


def unknown_fields(kind: str, name: str, value: Any) -> list[tuple[str, str]]:
    """(field, message) for each key of ``value`` (the ``name`` part of a ``kind``: ``volume`` or ``affinity``) that
    core/v1 does not declare; [] when all are declared, or when there is no schema for it (nothing to judge by)."""
    schema = _schemas().get(kind, {}).get(name)
    if schema is None:
        return []
    problems = []
    for path, key, declared in undeclared(value, schema, name):
        camel = _camel(key)
        if camel != key and camel in declared:
            hint = f"write it as {camel!r} (manifests use the camelCase field names)"
        else:
            shown = ", ".join(declared) if len(declared) <= 12 else ", ".join(declared[:12]) + ", …"
            hint = f"accepted fields: {shown}"
        problems.append((path, f"unknown field {key[:64]!r}, which the API server would drop without a word; {hint}"))
    return problems


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)
