"""Reusable field checks for the API models: URIs, Kubernetes names and quantities, error helpers.

Every check raises ``PydanticCustomError`` carrying ``ctx["field"]`` when the error belongs to a
sub-field of the model being validated (cross-field rules), so that ``errors.format_errors`` can
report the exact path (``spec.dataset.trainUri``) instead of the enclosing object.
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

from pydantic_core import PydanticCustomError

URI_SCHEMES = ("s3://", "gs://", "file://", "pvc://")
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
RAY_VERSION = r"^[0-9]+\.[0-9]+\.[0-9]+$"
# A qualified extended-resource name such as nvidia.com/gpu or amd.com/gpu.
RESOURCE_NAME = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
# What each pattern means, for error messages: a regex is no help to someone who wrote "4GB".
PATTERN_MEANINGS = {
    DNS1123_LABEL: "a DNS-1123 label: lower-case letters, digits and '-', at most 63 characters",
    DNS1123_SUBDOMAIN: "a DNS-1123 name: lower-case letters, digits, '-' and '.'",
    QUANTITY: "a Kubernetes quantity such as 4Gi, 512Mi or 16G",
    ENV_NAME: "an environment variable name such as AWS_DEFAULT_REGION",
    RAY_VERSION: "a Ray version such as 2.60.0",
    RESOURCE_NAME: "an extended resource name such as nvidia.com/gpu",
}
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|API_KEY)", re.I)

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


def quote(value: object, limit: int = 80) -> str:
    """A value as the user wrote it, shortened: 'resnet5', 7, [1, 2]."""
    text = repr(value) if isinstance(value, str) else _plain(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def uri_scheme(uri: str) -> str | None:
    match = _SCHEME_RE.match(uri)
    return match.group(1).lower() if match else None


def check_uri(uri: str, field: str | None = None) -> str:
    """Accept s3://, gs://, file://, pvc://CLAIM/PATH, or a filesystem path; reject anything else."""
    if not uri.strip():
        fail(field, f"{quote(uri)} is empty; give s3://BUCKET/PATH, gs://BUCKET/PATH, file:///PATH, pvc://CLAIM/PATH or a path")
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
    if scheme in ("s3", "gs", "pvc") and not rest.split("/", 1)[0]:
        what = "claim" if scheme == "pvc" else "bucket"
        fail(field, f"{quote(uri)} has no {what} name; write {scheme}://NAME/PATH")
    if scheme == "pvc" and not re.match(DNS1123_SUBDOMAIN, rest.split("/", 1)[0]):
        fail(field, f"{quote(uri)}: the claim name must be a DNS-1123 name (lower case letters, digits, '-')")
    return uri


def quantity_to_bytes(quantity: str) -> int:
    """'4Gi' → 4294967296. Assumes the value already matched QUANTITY."""
    match = re.match(r"^([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)$", quantity)
    if not match or match.group(2) not in _QUANTITY_FACTORS:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    return int(float(match.group(1)) * _QUANTITY_FACTORS[match.group(2)])


def looks_like_secret(env_name: str) -> bool:
    return bool(_SECRET_ENV.search(env_name))
