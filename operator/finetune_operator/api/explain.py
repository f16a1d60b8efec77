"""``finetune explain``: documentation of a FineTuneJob field, read from the generated CRD schema.

Reading the CRD (rather than the pydantic models) shows exactly what the API server enforces:
type, default, allowed values, bounds, required sub-fields and the field's description.
"""

from __future__ import annotations

import textwrap
from typing import Any

from finetune_operator.api.crd import build_crd


class UnknownFieldError(KeyError):
    """A field path that does not exist; the message lists the fields that do."""

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
    parts = [p for p in path.replace("[]", "").split(".") if p]
    if parts and parts[0].lower() in ("finetunejob", "ftj", "finetunejobs"):
        parts = parts[1:]
    walked: list[str] = []
    for part in parts:
        while schema.get("type") == "array":
            schema = schema.get("items", {})
        props: dict[str, Any] = schema.get("properties", {})
        match = next((k for k in props if k.lower() == part.lower()), None)
        if match is None:
            where = ".".join(walked) or "FineTuneJob"
            raise UnknownFieldError(
                f"field {part!r} does not exist in {where}; fields there: {', '.join(props) or '(none: a leaf)'}"
            )
        walked.append(match)
        schema = props[match]
    return ".".join(walked), schema


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
    lines += textwrap.wrap(schema.get("description", "(no description)"), 100, initial_indent="  ", subsequent_indent="  ")
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
