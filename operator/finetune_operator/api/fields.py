"""Reusable field checks for the API models: URIs, Kubernetes names and quantities, error helpers.

Every check raises ``PydanticCustomError`` carrying ``ctx["field"]`` when the error belongs to a
sub-field of the model being validated (cross-field rules), so that ``errors.format_errors`` can
report the exact path (``spec.dataset.trainUri``) instead of the enclosing object.
"""

from __future__ import annotations

import re
import reprlib
import unicodedata
from typing import Any, NoReturn

from pydantic import ValidationError, ValidationInfo
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

URI_SCHEMES = ("s3://", "gs://", "file://", "pvc://")
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Patterns are written for both regex engines that run them: pydantic's (Rust `regex`) and the API server's (Go RE2),
# so no look-around and no back-references; lengths a pattern cannot express are checked in code.
_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_NAME63 = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = rf"^{_SUBDOMAIN}$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
# Kubernetes' IsEnvVarName: [-._a-zA-Z][-._a-zA-Z0-9]*, and not '.', '..' or '..'-prefixed.
ENV_NAME = r"^([-_a-zA-Z]|\.[-_a-zA-Z0-9])[-._a-zA-Z0-9]*$"
# The envFrom prefix, as core/v1 EnvFromSource documents it: a C identifier.
C_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
RAY_VERSION = r"^[0-9]+\.[0-9]+\.[0-9]+$"
# A qualified name (label and taint keys): an optional DNS-1123 prefix (at most 253, checked in code) and '/', a name ≤ 63.
QUALIFIED_NAME = rf"^({_SUBDOMAIN}/)?{_NAME63}$"
# A taint key: a qualified name, or empty (a toleration with operator Exists and no key tolerates every taint).
TAINT_KEY = rf"^(({_SUBDOMAIN}/)?{_NAME63})?$"
# A label value (node selectors, toleration values): empty, or at most 63 characters.
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
# An extended resource such as nvidia.com/gpu: the domain is required, which leaves out cpu, memory, ephemeral-storage,
# hugepages-*, pods and storage (the standard resources have none).
EXTENDED_RESOURCE = rf"^{_SUBDOMAIN}/{_NAME63}$"
# A container image reference (the distribution/reference grammar, IPv6 hosts left out): [host[:port]/]path[:tag][@digest].
_DOMAIN_PART = r"[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?"
_PATH_PART = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = (
    rf"^({_DOMAIN_PART}(\.{_DOMAIN_PART})*(:[0-9]+)?/)?{_PATH_PART}(/{_PATH_PART})*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
# What each pattern means, for error messages: a regex is no help to someone who wrote "4GB".
PATTERN_MEANINGS = {
    DNS1123_LABEL: "a DNS-1123 label: lower-case letters, digits and '-', at most 63 characters",
    DNS1123_SUBDOMAIN: "a DNS-1123 name: lower-case letters, digits, '-' and '.'",
    QUANTITY: "a Kubernetes quantity such as 4Gi, 512Mi or 16G",
    ENV_NAME: "an environment variable name such as AWS_DEFAULT_REGION "
    "(letters, digits, '_', '-', '.'; not starting with a digit or '..')",
    C_IDENTIFIER: "a C identifier such as S3_ (letters, digits and '_', not starting with a digit)",
    RAY_VERSION: "a Ray version such as 2.60.0",
    QUALIFIED_NAME: "a Kubernetes label key such as gpu or nvidia.com/gpu.product: an optional DNS prefix and '/', "
    "then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    TAINT_KEY: "a taint key such as nvidia.com/gpu: an optional DNS prefix and '/', "
    "then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    LABEL_VALUE: "a Kubernetes label value: empty, or at most 63 letters, digits, '-', '_' or '.', "
    "starting and ending with a letter or digit",
    EXTENDED_RESOURCE: "an extended resource name with a domain, such as nvidia.com/gpu or amd.com/gpu "
    "(cpu and memory are set by cpusPerWorker and memoryPerWorker)",
    IMAGE_REFERENCE: "an image reference such as ghcr.io/acme/trainer:1.2 or registry:5000/trainer@sha256:<digest> "
    "(no spaces, lower-case repository path)",
}
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|API_KEY)", re.I)
# The trainer's own key variables (FINETUNE_ENCRYPTION_KEY, FINETUNE_SIGNING_KEY, ...): inline, a key would be copied into
# the FineTuneJob, the RayJob, the trainer's ConfigMap and the model card's spec.
_FINETUNE_KEY_ENV = re.compile(r"^FINETUNE_.*KEY", re.I)

_QUANTITY_FACTORS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def fail(field: str | None, message: str, **ctx: Any) -> NoReturn:
    """Raise a validation error; ``field`` (camelCase, dotted) is appended to the error's location."""
    context: dict[str, Any] = {"detail": message, **ctx}
    if field:
        context["field"] = field
    raise PydanticCustomError("finetune", "{detail}", context)


FIELDS_ONLY = "finetune.dev/fields-only"
"""Validation context key: check the fields alone, skip the models' cross-field rules (see ``fields_only``)."""


def fields_only(info: ValidationInfo) -> bool:
    """Whether this validation asked for the fields alone: how ``v1alpha1.parse_sections`` reads a section whose own
    cross-field rules fail, so that the rules between sections can judge its values in the same pass."""
    return isinstance(info.context, dict) and bool(info.context.get(FIELDS_ONLY))


class Problems:
    """The cross-field problems of one model, collected so that a user sees all of them in one pass, not one per fix."""

    def __init__(self) -> None:
        self.items: list[tuple[str | None, str]] = []

    def add(self, field: str | None, message: str) -> None:
        """Record a problem; ``field`` (camelCase, dotted) is appended to the model's location, as with ``fail``."""
        self.items.append((field, message))

    def raise_any(self, model: object, also: ValidationError | None = None) -> None:
        """Raise every recorded problem at once, after the errors of ``also`` (a validator's ValidationError joins the
        enclosing model's errors); return when there is none."""
        if not self.items:
            return
        if len(self.items) == 1 and also is None:
            fail(*self.items[0])
        details = [_carried(error) for error in also.errors()] if also is not None else []
        details += [
            InitErrorDetails(
                type=PydanticCustomError("finetune", "{detail}", {"detail": message, **({"field": field} if field else {})}),
                loc=(),
                input=model,
            )
            for field, message in self.items
        ]
        raise ValidationError.from_exception_data(type(model).__name__, details)


def _carried(error: ErrorDetails) -> InitErrorDetails:
    """An error re-raised as it was: same type, location, input, context and message."""
    context = {**error.get("ctx", {}), "message": error["msg"]}
    return InitErrorDetails(type=PydanticCustomError(error["type"], "{message}", context), loc=error["loc"], input=error["input"])


def quote(value: object, limit: int = 80) -> str:
    """A value as the user wrote it, shortened: 'resnet5', 7, [1, 2].

    Bounded before it is built: a megabyte string is cut before repr, a deep or long list is drawn a few
    items and levels deep, and a huge integer is described, never converted (Python refuses 4,300+ digits).
    """
    text = repr(value[: limit + 1]) if isinstance(value, str) else _plain(value)
    return shorten(text, limit)


def display_width(text: str) -> int:
    """The columns ``text`` takes on a terminal: two for an East-Asian wide or full-width character, none for a
    combining mark, one for the rest. For what people read only: Kubernetes counts a name's characters, not columns."""
    return sum(_columns(c) for c in text)


def _columns(c: str) -> int:
    if c < "\u0300":  # ASCII and Latin-1: one column each, without a table lookup
        return 1
    if unicodedata.category(c) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def shorten(text: str, limit: int) -> str:
    """``text`` when it takes at most ``limit`` columns (``display_width``), else cut to end in '...' within them."""
    if len(text) <= limit // 2 or display_width(text) <= limit:
        return text
    budget = limit - 3
    for end, c in enumerate(text):
        budget -= _columns(c)
        if budget < 0:
            return text[:end] + "..."
    return text


class _Shortened(reprlib.Repr):
    """reprlib's bounded repr, with integers too long to print described instead."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 6, 6, 4, 6
        self.maxstring = self.maxother = 60

    def repr_int(self, x: int, level: int) -> str:
        return _integer(x)


_SHORTENED = _Shortened()


def _plain(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _integer(value) if isinstance(value, int) else _SHORTENED.repr(value)


def _integer(value: int) -> str:
    return repr(value) if value.bit_length() <= 256 else f"<an integer of {value.bit_length()} bits>"


def uri_scheme(uri: str) -> str | None:
    match = _SCHEME_RE.match(uri)
    return match.group(1).lower() if match else None


def check_uri(uri: str, field: str | None = None) -> str:
    """Accept s3://, gs://, file://, pvc://CLAIM/PATH, or a filesystem path; reject anything else."""
    if not uri.strip():
        fail(field, f"{quote(uri)} is empty; give s3://BUCKET/PATH, gs://BUCKET/PATH, file:///PATH, pvc://CLAIM/PATH or a path")
    if _CONTROL_RE.search(uri):
        fail(field, f"{quote(uri)} contains a control character (a newline, tab or NUL); write the URI on one line, as is")
    scheme = uri_scheme(uri)
    if scheme is None:
        return uri
    if f"{scheme}://" not in URI_SCHEMES:
        fail(
            field,
            f"{quote(uri)} uses the unsupported scheme {scheme + '://'!r}; "
            "accepted: s3://, gs://, file://, pvc://CLAIM/PATH or a filesystem path",
        )
    rest = uri[len(scheme) + 3 :]
    name, _, path = rest.partition("/")
    if scheme in ("s3", "gs", "pvc") and not name:
        what = "claim" if scheme == "pvc" else "bucket"
        fail(field, f"{quote(uri)} has no {what} name; write {scheme}://NAME/PATH")
    if scheme == "pvc" and (len(name) > 253 or not re.match(DNS1123_SUBDOMAIN, name)):
        fail(field, f"{quote(uri)}: the claim name must be a DNS-1123 name (lower case letters, digits, '-', at most 253)")
    if scheme in ("s3", "gs", "pvc") and ".." in path.split("/"):
        why = (
            "it would leave the claim's volume, mounted in every Ray pod"
            if scheme == "pvc"
            else "object stores keep it as a literal key, not a step up"
        )
        fail(field, f"{quote(uri)} has a '..' segment ({why}); write the path without '..'")
    return uri


def check_qualified_name(value: str, field: str | None = None) -> str:
    """What QUALIFIED_NAME cannot say: the DNS prefix of ``prefix/name`` is at most 253 characters."""
    prefix, slash, _ = value.rpartition("/")
    if slash and len(prefix) > 253:
        fail(field, f"{quote(value)}: the prefix before '/' has {len(prefix)} characters; at most 253 are accepted")
    return value


def check_extended_resource(value: str, field: str | None = None) -> str:
    """An extended resource name (EXTENDED_RESOURCE already matched) outside Kubernetes' own domain."""
    check_qualified_name(value, field)
    # Kubernetes' IsNativeResource / IsExtendedResourceName, word for word: these are quota or built-in names.
    if "kubernetes.io/" in value or value.startswith("requests."):
        fail(
            field,
            f"{quote(value)} is a Kubernetes resource, not an extended resource; name the device plugin's resource, "
            "such as nvidia.com/gpu or amd.com/gpu",
        )
    return value


def quantity_to_bytes(quantity: str) -> int:
    """'4Gi' → 4294967296. Assumes the value already matched QUANTITY."""
    match = re.match(r"^([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)$", quantity)
    if not match or match.group(2) not in _QUANTITY_FACTORS:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    return int(float(match.group(1)) * _QUANTITY_FACTORS[match.group(2)])


def looks_like_secret(env_name: str) -> bool:
    return bool(_SECRET_ENV.search(env_name) or _FINETUNE_KEY_ENV.search(env_name))
