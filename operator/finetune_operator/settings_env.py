"""How ``FINETUNE_OPERATOR_*`` variables are read into ``settings.OperatorSettings``: pydantic-settings' environment
source over a given mapping, the variable types the settings share, and the one-line refusals.

Each field of the settings declares its type and bounds, and an ``Accepts`` note in its annotation says in words
what the variable takes; ``one_line`` turns pydantic's error into ``VARIABLE='value' is not accepted; expected …``.
Two departures from pydantic-settings' defaults keep the variables as they always were: lists are comma-separated
(not JSON), and booleans are ``true`` or ``false`` only (not ``yes``/``1``/``on``).
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode

from finetune_operator.api.fields import DNS1123_LABEL

PREFIX: Final = "FINETUNE_OPERATOR_"
NOT_ACCEPTED: Final = "not_accepted"  # the error type whose message is the whole "expected …" text

_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")

# The environment ``from_env`` reads; unset, settings come from keyword arguments and defaults only, so that
# ``OperatorSettings()`` means the defaults wherever it is built (tests, ``finetune render`` without --cluster).
ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("finetune_operator_environ", default=None)


@dataclass(frozen=True)
class Accepts:
    """Annotation metadata: what a variable accepts, in the words of its refusal."""

    text: str


def not_accepted(accepted: str) -> PydanticCustomError:
    return PydanticCustomError(NOT_ACCEPTED, "{accepted}", {"accepted": accepted})


def matching(pattern: str) -> AfterValidator:
    # re.match, as Kubernetes' own patterns are written (anchored); the Accepts note supplies the words.
    def check(value: str) -> str:
        # Empty is the default of the optional ones (``from_env`` never passes an empty variable on).
        if value and not re.match(pattern, value):
            raise ValueError(pattern)
        return value

    return AfterValidator(check)


def true_or_false(value: Any) -> Any:
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ValueError(value)
        return value.lower() == "true"
    return value


def lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def comma_separated(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    return value


def namespace_list(items: tuple[str, ...]) -> tuple[str, ...]:
    for item in items:
        if len(item) > 63 or not re.match(DNS1123_LABEL, item):
            raise not_accepted(f"comma-separated namespace names (DNS-1123 labels); {item!r} is not one")
    return items


def label_list(items: tuple[str, ...]) -> tuple[str, ...]:
    for item in items:
        key, equals, value = item.partition("=")
        prefix = key.rpartition("/")[0]
        if not equals or len(prefix) > 253 or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise not_accepted(f"comma-separated key=value pod labels; {item!r} is not one")
    return items


def json_object(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise not_accepted(f"a JSON object of spec.runtime.pod fields; {exc}") from None
    return value


def image_reference(value: str) -> str:
    if any(c.isspace() for c in value) or len(value) > 512:
        raise ValueError(value)
    return value


Boolean = Annotated[bool, BeforeValidator(true_or_false), Accepts("true or false")]
Port = Annotated[int, Field(ge=0, le=65_535), Accepts("an integer from 0 to 65535")]
Namespace = Annotated[str, Field(max_length=63), matching(DNS1123_LABEL), Accepts("a namespace name (a DNS-1123 label)")]
Labels = Annotated[tuple[str, ...], NoDecode, BeforeValidator(comma_separated), AfterValidator(label_list)]
Seconds = Annotated[float, Field(gt=0, le=3600), Accepts("a number of seconds above 0, at most 3600")]


class Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (``from_env``'s), values stripped, empty ones unset."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._given = {key: value.strip() for key, value in environ.items() if value.strip()}
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {key.lower(): value for key, value in self._given.items()}


def conflict(message: str) -> PydanticCustomError:
    return PydanticCustomError("settings_conflict", "{message}", {"message": message})


def one_line(cls: type[BaseSettings], exc: ValidationError) -> str:
    """The first error as ``VARIABLE='value' is not accepted; expected …`` (or a conflict's own sentence)."""
    error = exc.errors()[0]
    if not error["loc"]:
        return str(error["ctx"]["message"]) if error["type"] == "settings_conflict" else error["msg"]
    field = str(error["loc"][0])
    if error["type"] == NOT_ACCEPTED:
        accepted = str(error["ctx"]["accepted"])
    elif len(error["loc"]) > 1 or "field" in error.get("ctx", {}):
        # Inside a structured variable (POD_DEFAULTS): the wire path within it and the API's own words.
        parts = [f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:]]
        if "field" in error.get("ctx", {}):
            parts.append(f".{error['ctx']['field']}")
        inner = "".join(parts).lstrip(".")
        accepted = f"{accepts(cls.model_fields.get(field))}; {inner}: {error['msg']}"
    else:
        accepted = accepts(cls.model_fields.get(field))
    raw = error["input"]
    # The variable as it was set (validators may have normalised the input: "loud" → "LOUD").
    environ = {key.upper(): value.strip() for key, value in (ENVIRON.get() or {}).items()}
    raw = environ.get(env_name(field), raw)
    shown = repr(raw) if isinstance(raw, str) else repr(",".join(raw) if isinstance(raw, tuple) else str(raw))
    return f"{env_name(field)}={shown} is not accepted; expected {accepted}"


def accepts(info: FieldInfo | None) -> str:
    notes = [item.text for item in (info.metadata if info else []) if isinstance(item, Accepts)]
    return notes[0] if notes else "a valid value"


def env_name(attribute: str) -> str:
    return PREFIX + attribute.upper()
