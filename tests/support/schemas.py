"""Validation of Kubernetes objects against OpenAPI v3 (structural) schemas taken from CRDs.

Two checks, because plain JSON Schema is not what the API server does: ``schema_errors`` catches wrong
types, enums and missing required fields; ``undeclared_fields`` catches keys the schema does not
declare, which the API server would silently prune (a misspelt ``shutdownAfterJobFinish`` passes
the first check and is lost).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
# Vendored with their source, version and licence (tests/data/kuberay-v1.7.0/README.md).
KUBERAY_SCHEMAS = REPO / "tests" / "data" / "kuberay-v1.7.0"
# The chart's ServiceMonitor is checked against the Prometheus Operator's own CRD (its README says which release).
PROMETHEUS_OPERATOR_SCHEMAS = REPO / "tests" / "data" / "prometheus-operator-v0.93.0"


def crd_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema: dict[str, Any] = entry["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


def load_crd_schema(path: Path, version: str) -> dict[str, Any]:
    # The C loader: KubeRay's CRDs are large (4 s with the pure-Python loader, 0.4 s with this one).
    return crd_schema(yaml.load(path.read_text(), Loader=yaml.CSafeLoader), version)


def kuberay_schema(plural: str = "rayjobs") -> dict[str, Any]:
    return load_crd_schema(KUBERAY_SCHEMAS / f"ray.io_{plural}.yaml", "v1")


def servicemonitor_schema() -> dict[str, Any]:
    return load_crd_schema(PROMETHEUS_OPERATOR_SCHEMAS / "monitoring.coreos.com_servicemonitors.yaml", "v1")


def to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 → JSON Schema draft 4 (which also has boolean exclusive bounds)."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def schema_errors(obj: Any, schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(to_jsonschema(schema))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(obj)]


def undeclared_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in ``obj`` that the schema does not declare (what the API server would prune)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or not isinstance(obj, dict | list):
        return []
    found: list[str] = []
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            found += undeclared_fields(item, schema.get("items", {}), f"{path}[{i}]")
        return found
    props = schema.get("properties")
    extra = schema.get("additionalProperties")
    for key, value in obj.items():
        child = f"{path}.{key}" if path else key
        if props is not None and key in props:
            found += undeclared_fields(value, props[key], child)
        elif isinstance(extra, dict):
            found += undeclared_fields(value, extra, child)
        elif props is not None or (schema.get("type") == "object" and extra is None and "properties" in schema):
            found.append(child)
        elif props is None and extra is None and schema.get("type") == "object":
            # metadata-like objects with no declared properties keep everything
            continue
    return found


def strict_errors(obj: Any, schema: dict[str, Any]) -> list[str]:
    """Both checks together: schema errors, then undeclared (prunable) fields."""
    return schema_errors(obj, schema) + [
        f"{p}: field not declared in the schema (would be pruned)" for p in undeclared_fields(obj, schema)
    ]
