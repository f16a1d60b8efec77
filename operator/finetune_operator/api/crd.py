"""Generates the FineTuneJob CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 schema. The
conversion inlines ``$ref``, drops ``title``, turns ``anyOf [X, null]`` into ``nullable``, numeric
``exclusiveMinimum`` into the boolean form, ``const`` into ``enum``, and never puts
``additionalProperties`` beside ``properties``. On top it adds what only Kubernetes can do at
admission: the model-name enum, list-map keys, and CEL rules (``x-kubernetes-validations``) for
immutability and the cross-field rules that need no catalogue.

``finetune crd`` prints the result; ``manifests/base/crd.yaml`` and the chart hold committed copies,
and a test fails when they drift from what this module generates.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from finetune_operator.api import catalog, versions
from finetune_operator.api.v1alpha1 import (
    DatasetSpec,
    FineTuneJobSpec,
    FineTuneJobStatus,
    HyperparametersSpec,
    ResourcesSpec,
    RunPolicySpec,
    StrategySpec,
)

# propertyNames (the length bounds of constrained map keys) has no structural form either: pydantic checks keys.
_DROP = {"title", "examples", "$defs", "propertyNames"}
IMMUTABLE_MESSAGE = "is immutable after creation; only spec.runPolicy.suspend may change"


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        # A property's own description wins over the referenced model's docstring.
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: Any) -> Any:
    """JSON Schema (already ref-free) → Kubernetes structural OpenAPI v3."""
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    any_of = node.get("anyOf")
    if any_of is not None:
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) == 1 and len(any_of) == 2:
            inner = _structural(non_null[0])
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            merged = {**inner, **_structural(rest), "nullable": True}
            if merged.get("default", 0) is None:
                del merged["default"]
            return merged
        raise ValueError(f"cannot express anyOf {any_of!r} structurally")
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _structural(prop) for name, prop in value.items()}
        elif key == "additionalProperties":
            if value is False or "properties" in node:
                continue  # unknown fields are pruned by the structural schema anyway
            out[key] = _structural(value)
        elif key == "patternProperties":
            # pydantic's form of a map whose keys have a pattern (nodeSelector's label keys). A structural schema has no
            # key constraints: the values' schema becomes additionalProperties, and pydantic alone checks the keys.
            (values,) = value.values()
            out["additionalProperties"] = _structural(values)
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "default" and value is None:
            continue
        elif key == "description" and isinstance(value, str):
            out[key] = " ".join(value.split())  # docstrings wrapped at the line length read as one line
        else:
            out[key] = _structural(value)
    if "properties" in out:
        out["type"] = "object"
    return out


def _literal(value: Any) -> str:
    """A Python default as a CEL literal."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _cel_value(root: str, path: list[str], default: Any) -> str:
    """A CEL expression for a field that may be absent: ``(has(a.b) && has(a.b.c) ? a.b.c : default)``."""
    guards = [f"has({root}.{'.'.join(path[: i + 1])})" for i in range(len(path))]
    return f"({' && '.join(guards)} ? {root}.{'.'.join(path)} : {_literal(default)})"


def _default(model: type[BaseModel], field: str) -> Any:
    """The pydantic default of ``model.field``: the CEL rules read it from here, never repeat it."""
    return model.model_fields[field].default


def _wire(model: type[BaseModel], field: str) -> str:
    return model.model_fields[field].alias or field


def _spec_rules() -> list[dict[str, str]]:
    """Cross-field rules checked at admission (the pydantic validators check them too, with more context)."""
    # An absent batch size is the trainer's choice, always a multiple of the workers: 0 passes the rule.
    assert _default(HyperparametersSpec, "batch_size") is None
    batch = _cel_value("self", ["hyperparameters", _wire(HyperparametersSpec, "batch_size")], 0)
    pods = _cel_value("self", ["resources", _wire(ResourcesSpec, "workers")], _default(ResourcesSpec, "workers"))
    gpus = _cel_value("self", ["resources", _wire(ResourcesSpec, "gpus_per_worker")], _default(ResourcesSpec, "gpus_per_worker"))
    # ResourcesSpec.train_workers: one data-parallel process per GPU (CEL has no max()).
    workers = f"({gpus} > 0 ? {pods} * {gpus} : {pods})"
    jpeg = _cel_value("self", ["dataset", _wire(DatasetSpec, "jpeg_decode")], _default(DatasetSpec, "jpeg_decode"))
    optional_sections = [
        name for name, field in FineTuneJobSpec.model_fields.items() if not field.is_required() and name != "run_policy"
    ]
    presence = " && ".join(
        f"has(self.{FineTuneJobSpec.model_fields[n].alias}) == has(oldSelf.{FineTuneJobSpec.model_fields[n].alias})"
        for n in optional_sections
    )
    run_policy = " && ".join(
        f"{_cel_value('self', ['runPolicy', f.alias or n], _default_or_sentinel(f.default))}"
        f" == {_cel_value('oldSelf', ['runPolicy', f.alias or n], _default_or_sentinel(f.default))}"
        for n, f in RunPolicySpec.model_fields.items()
        if n != "suspend"
    )
    return [
        {
            "rule": f"{batch} % {workers} == 0",
            "message": "hyperparameters.batchSize must be divisible by resources.workers (times gpusPerWorker on GPUs)",
            "fieldPath": ".hyperparameters.batchSize",
        },
        {
            # Spans two sections (dataset, resources), so it lives here, not in _SECTION_RULES: without it only the
            # webhook refused a CPU-only job that decodes on the GPU, and the trainer failed it after scheduling.
            "rule": f"{jpeg} != 'gpu' || {gpus} > 0",
            "message": "dataset.jpegDecode gpu needs GPUs (resources.gpusPerWorker >= 1); use jpegDecode cpu or add GPUs",
            "fieldPath": ".dataset.jpegDecode",
        },
        {
            "rule": presence,
            "message": "spec sections cannot be added or removed after creation; only spec.runPolicy.suspend may change",
        },
        {"rule": run_policy, "message": f"spec.runPolicy (except suspend) {IMMUTABLE_MESSAGE}", "fieldPath": ".runPolicy"},
    ]


def _default_or_sentinel(default: Any) -> Any:
    # Absent and "the default" mean the same, so adding `runPolicy: {suspend: true}` later is no change.
    return -1 if default is None else default


_FORMAT = _cel_value("self", [_wire(DatasetSpec, "format")], _default(DatasetSpec, "format"))
_INGEST = _cel_value("self", [_wire(DatasetSpec, "ingest")], _default(DatasetSpec, "ingest"))
_JPEG = _cel_value("self", [_wire(DatasetSpec, "jpeg_decode")], _default(DatasetSpec, "jpeg_decode"))
_METHOD = _cel_value("self", [_wire(StrategySpec, "method")], _default(StrategySpec, "method"))
_SECTION_RULES: dict[str, list[dict[str, str]]] = {
    "model": [{"rule": "!(has(self.weights) && has(self.weightsUri))", "message": "set either weights or weightsUri, not both"}],
    "dataset": [
        {
            "rule": f"{_FORMAT} != 'imagefolder' || has(self.trainUri)",
            "message": "trainUri is required for format imagefolder",
        },
        {
            "rule": "!(has(self.validationUri) && has(self.validationSplit))",
            "message": "set either validationUri or validationSplit, not both",
        },
        {
            "rule": f"{_INGEST} != 'streaming' || {_FORMAT} == 'imagefolder'",
            "message": "ingest streaming applies to format imagefolder only",
        },
        {
            "rule": f"{_JPEG} != 'gpu' || {_INGEST} == 'streaming'",
            "message": "jpegDecode gpu needs ingest streaming",
        },
    ],
    "strategy": [
        {
            "rule": f"{_METHOD} != 'partial' || has(self.unfreezeBlocks)",
            "message": "unfreezeBlocks is required for method partial",
        }
    ],
}


def spec_schema() -> dict[str, Any]:
    raw = FineTuneJobSpec.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _structural(_resolve(raw, raw.get("$defs", {})))
    props = schema["properties"]
    props["model"]["properties"]["name"]["enum"] = catalog.model_names()
    for name, rules in _SECTION_RULES.items():
        props[name]["x-kubernetes-validations"] = [dict(rule) for rule in rules]
    for name in props:
        if name != "runPolicy":
            props[name].setdefault("x-kubernetes-validations", []).append(
                {"rule": "self == oldSelf", "message": f"spec.{name} {IMMUTABLE_MESSAGE}"}
            )
    schema["x-kubernetes-validations"] = _spec_rules()
    return schema


def status_schema() -> dict[str, Any]:
    raw = FineTuneJobStatus.model_json_schema(by_alias=True, mode="serialization")
    schema: dict[str, Any] = _structural(_resolve(raw, raw.get("$defs", {})))
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["items"]["required"] = ["type", "status"]
    return schema


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.strategy.method", "priority": 1},
    {"name": "Workers", "type": "integer", "jsonPath": ".spec.resources.workers", "priority": 1},
    {"name": "Epoch", "type": "integer", "jsonPath": ".status.progress.epoch", "priority": 1},
    {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent", "description": "percent of training done"},
    {"name": "ETA-Seconds", "type": "integer", "jsonPath": ".status.progress.etaSeconds", "priority": 1},
    {"name": "Val-Acc", "type": "number", "jsonPath": ".status.metrics.valAccuracy"},
    {"name": "Best-Acc", "type": "number", "jsonPath": ".status.metrics.bestValAccuracy", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{versions.PLURAL}.{versions.GROUP}",
            "labels": {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": versions.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": versions.KIND,
                "listKind": f"{versions.KIND}List",
                "plural": versions.PLURAL,
                "singular": versions.SINGULAR,
                "shortNames": list(versions.SHORT_NAMES),
                "categories": list(versions.CATEGORIES),
            },
            "versions": [
                {
                    "name": versions.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "FineTuneJob fine-tunes a pretrained torchvision model on your images, "
                            "data-parallel on a KubeRay cluster.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    header = "# Generated by `finetune crd` from finetune_operator.api; do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
