"""Turns pydantic validation errors into one-line messages a user can act on.

Each line names the field path as written in YAML (``spec.model.name``), quotes the bad value and says
what would be accepted. The same text is printed by ``finetune validate``, put in the operator's
``Validated=False`` condition and raised by the trainer, so a mistake reads the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from finetune_operator.api.catalog import suggest
from finetune_operator.api.fields import PATTERN_MEANINGS, quote, shorten

_MISSING = object()


def _path(loc: Sequence[int | str], extra: str | None = None, map_keys: frozenset[int] = frozenset()) -> str:
    parts: list[str] = []
    for position, item in enumerate(loc):
        if isinstance(item, int) and parts:
            parts[-1] = f"{parts[-1]}[{item}]"
        elif isinstance(item, int):
            parts.append(f"[{item}]")
        elif position in map_keys and parts:
            # A map key such as nvidia.com/gpu.product: its dots must not read as nesting.
            parts[-1] = f"{parts[-1]}[{quote(item, 64)}]"
        else:
            parts.append(shorten(item, 64))
    if extra:
        parts.extend(extra.split("."))
    return ".".join(parts) or "(document)"


def _field(model: type[BaseModel], item: str) -> Any:
    return next((f for name, f in model.model_fields.items() if item in (name, f.alias)), None)


def _is_map(annotation: Any) -> bool:
    return get_origin(annotation) is dict or any(_is_map(arg) for arg in get_args(annotation))


def _map_keys(root: type[BaseModel], loc: Sequence[int | str], offset: int) -> frozenset[int]:
    """Positions in ``loc`` (shifted by ``offset``) that are keys of a map field, such as nodeSelector's."""
    keys: set[int] = set()
    current: Any = root
    key_next = False
    for position, item in enumerate(loc):
        if isinstance(item, int):
            continue
        if key_next:
            keys.add(position + offset)
            key_next = False
            continue
        field = _field(current, item) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            break
        key_next = _is_map(field.annotation)
        current = _unwrap(field.annotation)
    return frozenset(keys)


def _model_at(root: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class that the location points into (to list the fields it accepts)."""
    current: Any = root
    for item in loc:
        if isinstance(item, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = _field(current, item)
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Optional[X], list[X], dict[str, X], Annotated[X, ...] → X when X is a model."""
    for arg in (annotation, *get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        if get_origin(arg) is not None or get_args(arg):
            inner = _unwrap(arg) if arg is not annotation else None
            if inner is not None:
                return inner
    return None


def _wire_name(model: type[BaseModel], name: str) -> str | None:
    """The camelCase alias of a field written by its Python name (``learning_rate`` → ``learningRate``)."""
    field = model.model_fields.get(name)
    return field.alias if field is not None and field.alias not in (None, name) else None


def _accepted_fields(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


_BOUND_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})
_BOUND_SIGNS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def _range(root: type[BaseModel], within: Sequence[int | str]) -> str:
    """The bounds of the number field at ``within`` ("> 0 and ≤ 10"); empty when it has none there (a list item)."""
    parent = _model_at(root, within[:-1])
    field = _field(parent, str(within[-1])) if parent is not None and within else None
    if field is None:
        return ""
    bounds = [f"{sign} {getattr(m, attr)}" for m in field.metadata for attr, sign in _BOUND_SIGNS if hasattr(m, attr)]
    return " and ".join(bounds)


def _message(root: type[BaseModel], error: Any, prefix: Sequence[str] = ()) -> str:
    within: tuple[int | str, ...] = tuple(error["loc"])  # relative to root: what _model_at walks
    loc = (*prefix, *within)
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    value = error.get("input", _MISSING)

    subject = ""
    if loc and loc[-1] == "[key]":  # pydantic's marker for a bad map key: report it on the map, naming the key
        loc, within, subject = loc[:-2], within[:-2], "key "
    map_keys = _map_keys(root, within, len(prefix))
    if kind == "finetune":
        return f"{_path(loc, ctx.get('field'), map_keys)}: {subject}{ctx['detail']}"
    path = _path(loc, map_keys=map_keys)
    if kind == "extra_forbidden":
        parent = _model_at(root, within[:-1])
        name = str(within[-1])[:200]  # a hostile key may be a megabyte long: neither quoted nor matched whole
        if parent is None:
            return f"{path}: unknown field"
        accepted = _accepted_fields(parent)
        wire = _wire_name(parent, name)
        if wire is not None:
            # populate-by-name would take it in Python, but the CRD declares only the camelCase key: the API server prunes it.
            return f"{path}: unknown field {name!r}; write it as {wire!r} (manifests use the camelCase field names)"
        hint = suggest(name, accepted, n=1)
        did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
        return f"{path}: unknown field {quote(name, 64)}; {did_you_mean}accepted fields: {', '.join(accepted)}"
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "literal_error":
        return f"{path}: {quote(value)} is not accepted; expected one of {ctx.get('expected', '')}"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern"))
        meaning = PATTERN_MEANINGS.get(pattern, "a value matching " + pattern)
        return f"{path}: {subject}{quote(value)} has the wrong form; expected {meaning}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: expected an object (key: value mapping), got {quote(value)}"
    if kind == "list_type":
        return f"{path}: expected a list, got {quote(value)}"
    bounds = _range(root, within) if kind in _BOUND_ERRORS else ""
    if isinstance(value, float) and math.isnan(value) and bounds:
        # NaN fails whichever bound is checked first: "should be less than or equal to 10" alone misleads.
        return f"{path}: nan is not a number; accepted: {bounds}"
    # Bounds, types and lengths: pydantic's own text ("Input should be greater than 0") is precise; a bound broken
    # is followed by the whole range when there is another bound ("; accepted: > 0 and ≤ 10").
    shown = "" if value is _MISSING else f"{subject}{quote(value)}: "
    text = str(error["msg"])
    text = text[0].lower() + text[1:] if text else text
    whole = f"; accepted: {bounds}" if " and " in bounds else ""
    return f"{path}: {shown}{text.replace('input should', 'should')}{whole}"


def format_errors(error: ValidationError, root: type[BaseModel], prefix: Sequence[str] = ()) -> list[str]:
    """One actionable line per error, each starting with the field path."""
    lines: list[str] = []
    for raw in error.errors(include_url=False):
        message = _message(root, raw, prefix)
        if message not in lines:
            lines.append(message)
    return lines
