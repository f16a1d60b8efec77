"""YAML read, and JSON written, as ``kubectl apply -f`` does it: what the API server gets from a manifest.

kubectl reads a manifest with sigs.k8s.io/yaml: go-yaml v2 decodes each document into Go values, Go's
encoding/json writes them, and that JSON is what the cluster validates. PyYAML differs from go-yaml in
small ways that change what a manifest means (``name: y`` is a boolean there, ``epochs: 1e3`` the integer
1000, ``created: 2024-01-02`` the text as written), so a manifest valid here would be refused there, or the
other way round. This module owns the two halves: ``LOADER`` (a safe PyYAML loader resolving plain scalars
by go-yaml v2's rules) and ``as_sent`` (the document as kubectl's JSON carries it, with what it cannot carry).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, Final

import yaml

from finetune_operator.api.fields import quote

_TAG: Final = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL, _MERGE = (_TAG + kind for kind in ("str", "int", "float", "bool", "null", "merge"))
# go-yaml v2's table of words: YAML 1.1 booleans (y and n included, which PyYAML reads as text), nulls, NaN, infinities.
_WORDS: Final[dict[str, tuple[str, Any]]] = {
    **{w: (_BOOL, True) for w in ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")},
    **{w: (_BOOL, False) for w in ("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")},
    **{w: (_NULL, None) for w in ("", "~", "null", "Null", "NULL")},
    **{w: (_FLOAT, math.nan) for w in (".nan", ".NaN", ".NAN")},
    **{s + w: (_FLOAT, math.inf) for s in ("", "+") for w in (".inf", ".Inf", ".INF")},
    **{"-" + w: (_FLOAT, -math.inf) for w in (".inf", ".Inf", ".INF")},
}
# Go's strconv.ParseInt(s, 0, 64) syntax (0x, 0o, 0b in either case; a leading 0 is octal), underscores already removed.
_GO_INT = re.compile(
    r"(?P<sign>[-+]?)(?:0[xX](?P<x>[0-9a-fA-F]+)|0[oO](?P<o>[0-7]+)|0[bB](?P<b>[01]+)|(?P<z>0[0-7]*)|(?P<d>[1-9][0-9]*))"
)
_BASES: Final = {"x": 16, "o": 8, "b": 2, "z": 8, "d": 10}
_GO_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")  # go-yaml's yamlStyleFloat
_DOT_FLOAT = re.compile(r"\.[0-9]+(?:[eE][-+]?[0-9]+)?")  # what Go's ParseFloat reads of a scalar starting with '.'


def _number(text: str) -> int | float | None:
    """A plain scalar as go-yaml v2 reads a number: int64 or uint64, else a finite float64; None when it is text."""
    if text[:1] == ".":
        value = float(text) if _DOT_FLOAT.fullmatch(text) else math.inf
        return value if math.isfinite(value) else None
    if text[:1] not in tuple("+-0123456789"):
        return None
    plain = text.replace("_", "")  # go-yaml drops every underscore before parsing
    match = _GO_INT.fullmatch(plain)
    if match and match.lastgroup:
        try:
            magnitude = int(match.group(match.lastgroup), _BASES[match.lastgroup])
        except ValueError:  # thousands of digits: out of range for Go too
            magnitude = 1 << 64
        value = -magnitude if match.group("sign") == "-" else magnitude
        if -(1 << 63) <= value < 1 << 63 or (not match.group("sign") and value < 1 << 64):
            return value
    if _GO_FLOAT.fullmatch(plain):  # 08, 1e3, an integer beyond 64 bits: a float64, unless it overflows (then text)
        number = float(plain)
        return number if math.isfinite(number) else None
    return None


def _resolve_plain(text: str) -> tuple[str, Any]:
    if text in _WORDS:
        return _WORDS[text]
    number = _number(text)
    if number is None:  # dates among them: go-yaml hands a timestamp to JSON as the text written
        return (_MERGE, text) if text == "<<" else (_STR, text)
    return (_INT if isinstance(number, int) else _FLOAT, number)


class _GoYaml:
    """go-yaml v2's reading of plain scalars and of merge keys (``<<``), on top of a PyYAML safe loader."""

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is yaml.ScalarNode and implicit[0]:
            return _resolve_plain(value)[0]
        return str(super().resolve(kind, value, implicit))  # type: ignore[misc]  # a mixin: the loader's resolver

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """go-yaml v2 writes a merged mapping's keys where ``<<`` stands, so a key after it wins, and one before it loses;
        of a list of mappings merged, the first wins. (PyYAML lets every key written out win.)"""
        pairs: list[tuple[yaml.Node, yaml.Node]] = []
        for key, value in node.value:
            if key.tag != _MERGE:
                pairs.append((key, value))
                continue
            merged = list(reversed(value.value)) if isinstance(value, yaml.SequenceNode) else [value]
            for mapping in merged:
                if not isinstance(mapping, yaml.MappingNode):
                    raise yaml.constructor.ConstructorError(
                        None, None, "a merge key (<<) takes a mapping or a list of mappings", mapping.start_mark
                    )
                self.flatten_mapping(mapping)
                pairs.extend(mapping.value)
        node.value = pairs


def _constructor(tag: str) -> Callable[[yaml.SafeLoader, yaml.Node], Any]:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        text = loader.construct_scalar(node)  # type: ignore[arg-type]  # only scalars are resolved to these tags
        found, value = _resolve_plain(text)
        if found == tag or tag == _STR:
            return text if tag == _STR else value
        if (found, tag) == (_INT, _FLOAT):
            return float(value)
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read {quote(text)} as a !!{tag[len(_TAG) :]}", node.start_mark
        )

    return construct


class _PureLoader(_GoYaml, yaml.SafeLoader):
    pass


class _LibyamlLoader(_GoYaml, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]  # found at run time
    pass


for _loader in (_PureLoader, _LibyamlLoader):
    for _tag in (_INT, _FLOAT, _BOOL):
        _loader.add_constructor(_tag, _constructor(_tag))
    _loader.add_constructor(_TAG + "timestamp", _constructor(_STR))  # an explicit !!timestamp reaches JSON as its text too

PURE_LOADER: Final[type[yaml.SafeLoader]] = _PureLoader
"""The loader on PyYAML's pure-Python parser."""
LOADER: Final[type[yaml.SafeLoader]] = _LibyamlLoader
"""The loader on libyaml's parser when PyYAML was built with it (ten times faster), the pure-Python one otherwise."""


def json_default(value: Any) -> str:
    """A datetime or date (from a dict built in Python) as RFC 3339 in UTC; json.dumps calls this for what JSON has
    no type for. Anything else is not a manifest's: refused as JSON refuses it."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo is None else value.astimezone(timezone.utc).replace(tzinfo=None)
        return moment.isoformat() + "Z"
    if isinstance(value, date):
        return f"{value.isoformat()}T00:00:00Z"
    raise TypeError(f"{type(value).__name__} is not JSON")


def _go_float(value: float) -> int | float:
    """A float64 as Go's encoding/json writes it: without a fraction or exponent when it is whole and below 1e21
    (10.0 is sent as 10, which an integer field accepts); otherwise as a float."""
    if value.is_integer() and abs(value) < 1e21:
        return int(Decimal(repr(value)))  # the shortest digits, padded with zeros, as Go writes them
    return value


def _go_key(key: Any) -> Any:
    """A map key as sigs.k8s.io/yaml names it in JSON: true/false, an integer's digits, a float as
    strconv.FormatFloat(key, 'g', -1, 32) (float32's shortest digits; .inf, -.inf, .nan); text as it is."""
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return str(key)
    if not isinstance(key, float):
        return key
    try:
        single = struct.unpack("f", struct.pack("f", key))[0] if math.isfinite(key) else key
    except OverflowError:  # beyond float32: Go's conversion makes it an infinity
        single = math.copysign(math.inf, key)
    if not math.isfinite(single):
        return ".nan" if math.isnan(single) else ".inf" if single > 0 else "-.inf"
    for digits in range(1, 10):  # the fewest significant digits that read back as this float32
        text = f"{abs(single):.{digits - 1}e}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == abs(single):
            break
    mantissa, exponent = text.split("e")
    figures, power = mantissa.replace(".", "").rstrip("0") or "0", int(exponent)
    sign = "-" if math.copysign(1.0, single) < 0 else ""
    if power < -4 or power >= 6:  # %e (Go's shortest 'g' switches at 1e6), two exponent digits at least
        body = figures[0] + ("." + figures[1:] if len(figures) > 1 else "")
        return f"{sign}{body}e{'-' if power < 0 else '+'}{abs(power):02d}"
    return sign + f"{abs(single):.{max(len(figures) - 1 - power, 0)}f}"


def _where(loc: tuple[str | int, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".") or "(document)"


def as_sent(document: Any, problems: list[tuple[tuple[str | int, ...], str]]) -> Any:
    """``document`` as kubectl's JSON carries it. What JSON cannot carry (NaN, an infinity, a null map key), on which
    kubectl refuses the whole file, is added to ``problems`` as (location, one line) and left for the models to judge."""

    def walk(value: Any, loc: tuple[str | int, ...]) -> Any:
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for key, item in value.items():
                if key is None:
                    problems.append(
                        (loc, f"{_where(loc)}: a null key (~) is not accepted: kubectl refuses it; quote it ('null')")
                    )
                    continue
                name = _go_key(key)
                out[name] = walk(item, (*loc, str(name)))
            return out
        if isinstance(value, list):
            return [walk(item, (*loc, index)) for index, item in enumerate(value)]
        if isinstance(value, float):
            if math.isfinite(value):
                return _go_float(value)
            problems.append(
                (loc, f"{_where(loc)}: {value} is not a number JSON can carry: kubectl refuses it; write a finite number")
            )
        return value

    return walk(document, ())
