"""Dotted overrides of a manifest (``finetune submit --set spec.hyperparameters.learningRate=0.01``): pure.

An override names a wire path (camelCase, as in the YAML) and a value read as a YAML scalar or flow value
(``0.01`` a number, ``true`` a boolean, ``[onnx]`` a list, ``'10'`` a string). It is applied to the parsed
document *before* validation, so an overridden job is validated exactly like the file: an unknown field or
a bad value gets the usual one line naming the field path, and a sweep script sees its mistake at once.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

import yaml

_PATH: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# metadata.name and metadata.namespace may be overridden too (a sweep names each job); nothing else outside spec.
_ROOTS: Final = ("spec", "metadata")
EXAMPLE: Final = "spec.hyperparameters.learningRate=0.01"


class OverrideError(ValueError):
    """A ``--set`` that cannot be applied; ``lines`` holds one message per bad override."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def parse_override(text: str) -> tuple[str, Any]:
    """``(path, value)`` of one ``PATH=VALUE``; OverrideError naming what is accepted otherwise."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path:
        raise OverrideError([f"--set: {text!r} is not PATH=VALUE; e.g. {EXAMPLE}"])
    if not _PATH.match(path) or path.split(".")[0] not in _ROOTS:
        raise OverrideError(
            [f"--set: {path!r} is not a field path; use dotted camelCase names under spec or metadata, e.g. {EXAMPLE}"]
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise OverrideError([f"--set {path}: {raw!r} is not a YAML value; quote text, e.g. {path}='{raw}'"]) from None
    return path, value


def apply_overrides(document: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``document`` with every override applied (all mistakes reported at once)."""
    result: dict[str, Any] = copy.deepcopy(dict(document))
    problems: list[str] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except OverrideError as exc:
            problems += exc.lines
            continue
        keys = path.split(".")
        node: Any = result
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                problems.append(f"--set {path}: {where} holds {child!r}, not an object; set {where} itself instead")
                break
            node = child
        else:
            node[keys[-1]] = value
    if problems:
        raise OverrideError(problems)
    return result
