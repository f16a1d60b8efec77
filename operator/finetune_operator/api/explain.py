"""``finetune explain``: documentation of a FineTuneJob field, read from the generated CRD schema.

Reading the CRD (rather than the pydantic models) shows exactly what the API server enforces:
type, default, allowed values, bounds, required sub-fields and the field's description. A path that goes past
what the schema describes (into ``metadata``, a map's keys, a Kubernetes object kept as written, a leaf) is told
what it reached instead; paths are echoed shortened (``fields.quote``), since they are the user's.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from finetune_operator.api.crd import build_crd
from finetune_operator.api.fields import quote

ACCEPTED_PATHS = "accepted: field names separated by single dots, e.g. spec.hyperparameters.epochs"
# The CRD declares metadata as a bare object: the API server owns it, the same ObjectMeta in every kind.
_OBJECT_META = "Kubernetes' standard ObjectMeta (name, namespace, labels, annotations, ...), the same in every resource"
# "… (core/v1 ConfigMapVolumeSource)." in the descriptions of the objects the operator passes to the pods as written.
_CORE_TYPE = re.compile(r"\((core/v1 \w+)\)")


class UnknownFieldError(KeyError):
    """A field path that is malformed or does not exist; the message (one line) says what is there instead."""

    def __str__(self) -> str:
        return str(self.args[0])


def _root_schema() -> dict[str, Any]:
    schema: dict[str, Any] = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _type_name(schema: dict[str, Any]) -> str:
    kind = schema.get("type", "object")
    if kind == "array":
        return f"[]{_type_name(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map[string]{_type_name(schema['additionalProperties'])}"
    return str(kind)


def resolve(path: str) -> tuple[str, dict[str, Any]]:
    """``spec.hyperparameters.learningRate`` → (canonical path, schema). Case-insensitive, `[]` ignored."""
    schema = _root_schema()
    parts = path.replace("[]", "").split(".") if path else []
    if "" in parts:
        raise UnknownFieldError(f"{quote(path)} is not a field path: it has an empty segment; {ACCEPTED_PATHS}")
    if parts and parts[0].lower() in ("finetunejob", "ftj", "finetunejobs"):
        parts = parts[1:]
    walked: list[str] = []
    for part in parts:
        while schema.get("type") == "array":
            schema = schema.get("items", {})
        props: dict[str, Any] = schema.get("properties", {})
        match = next((k for k in props if k.lower() == part.lower()), None)
        if match is None:
            raise UnknownFieldError(_no_field(part, ".".join(walked), schema))
        walked.append(match)
        schema = props[match]
    return ".".join(walked), schema


def _no_field(part: str, where: str, schema: dict[str, Any]) -> str:
    """Why ``part`` is not a field of ``where``: the fields that are, or what ``where`` is when it has none."""
    props: dict[str, Any] = schema.get("properties", {})
    if props:
        return f"field {quote(part)} does not exist in {where or 'FineTuneJob'}; fields there: {', '.join(props)}"
    if where == "metadata":
        # kubectl knows ObjectMeta's fields: pointed at the one asked for when it reads as a field name.
        named = f"metadata.{part}" if re.fullmatch(r"[A-Za-z]\w{0,60}", part) else "metadata"
        return f"metadata is {_OBJECT_META}, documented by `kubectl explain pods.{named}`"
    if "additionalProperties" in schema:
        return (
            f"{where} is a map ({_type_name(schema)}) with free-form keys, not fields: {quote(part)} would be a key; "
            f"`finetune explain {where}` describes its values"
        )
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        found = _CORE_TYPE.search(schema.get("description", ""))
        kubectl = f"; documented by `kubectl explain pods.spec.{where.removeprefix('spec.runtime.pod.')}`"
        return (
            f"{where} is Kubernetes' {found.group(1) if found else 'object'}, passed to the pods as written: "
            f"finetune does not describe its fields{kubectl if where.startswith('spec.runtime.pod.') else ''}"
        )
    return f"{where} is a leaf of type {_type_name(schema)}: it has no fields, so no {quote(part)}"


def _constraints(schema: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "enum" in schema:
        values = schema["enum"]
        shown = ", ".join(map(str, values)) if len(values) <= 12 else f"{len(values)} values (see `finetune models`)"
        lines.append(f"ALLOWED:     {shown}")
    bounds = []
    if "minimum" in schema:
        bounds.append(f"{'>' if schema.get('exclusiveMinimum') else '>='} {schema['minimum']}")
    if "maximum" in schema:
        bounds.append(f"{'<' if schema.get('exclusiveMaximum') else '<='} {schema['maximum']}")
    for key, label in (
        ("minItems", "items >="),
        ("maxItems", "items <="),
        ("minLength", "length >="),
        ("maxLength", "length <="),
    ):
        if key in schema:
            bounds.append(f"{label} {schema[key]}")
    if bounds:
        lines.append(f"RANGE:       {', '.join(bounds)}")
    if "pattern" in schema:
        lines.append(f"PATTERN:     {schema['pattern']}")
    if "default" in schema:
        lines.append(f"DEFAULT:     {schema['default']}")
    return lines


def explain(path: str = "") -> str:
    """The text ``finetune explain PATH`` prints."""
    canonical, schema = resolve(path)
    field_name = canonical.rsplit(".", 1)[-1] if canonical else "FineTuneJob"
    lines = [
        "GROUP:       finetune.dev",
        "KIND:        FineTuneJob",
        "VERSION:     v1alpha1",
        "",
        f"FIELD:       {field_name} <{_type_name(schema)}>" if canonical else "RESOURCE:    FineTuneJob <object>",
    ]
    if canonical:
        lines.append(f"PATH:        {canonical}")
    lines.extend(_constraints(schema))
    lines += ["", "DESCRIPTION:"]
    about = schema.get("description") or (
        f"{_OBJECT_META}, documented by `kubectl explain pods.metadata`." if canonical == "metadata" else "(no description)"
    )
    lines += textwrap.wrap(about, 100, initial_indent="  ", subsequent_indent="  ")
    target = schema.get("items", schema) if schema.get("type") == "array" else schema
    props: dict[str, Any] = target.get("properties", {})
    if props:
        required = set(target.get("required", []))
        lines += ["", "FIELDS:"]
        for name, sub in props.items():
            flag = " -required-" if name in required else ""
            lines.append(f"  {name}\t<{_type_name(sub)}>{flag}")
            text = sub.get("description") or ""
            if text:
                lines += textwrap.wrap(text, 96, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"
