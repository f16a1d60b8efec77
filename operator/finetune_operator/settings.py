"""The operator's settings: one frozen object read from ``FINETUNE_OPERATOR_*`` environment variables.

The Helm chart sets these variables (``values.yaml`` mirrors them one to one); ``OperatorSettings.from_env``
is called once at start-up, and a bad value stops the operator with a message that names the variable,
quotes the value and says what would be accepted. Everything else reads the object, never the environment.

Kopf's own settings (finalizer, progress storage, timeouts) are not here: ``handlers.configure`` sets them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from finetune_operator.api.fields import DNS1123_LABEL, DNS1123_SUBDOMAIN, QUANTITY, RAY_VERSION
from finetune_operator.api.versions import DEFAULT_TRAINER_IMAGE
from finetune_operator.api.versions import RAY_VERSION as DEFAULT_RAY_VERSION

PREFIX = "FINETUNE_OPERATOR_"
# CPU quantities also take millicores ("500m"), which the API's memory-oriented QUANTITY pattern does not.
_CPU_QUANTITY = r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
T = TypeVar("T")


class SettingsError(ValueError):
    """A ``FINETUNE_OPERATOR_*`` variable holds a value the operator cannot use."""


@dataclass(frozen=True)
class OperatorSettings:
    """How the operator runs and what it puts into every RayJob; each attribute is one environment variable."""

    namespaces: tuple[str, ...] = ()
    """``FINETUNE_OPERATOR_NAMESPACES``: comma-separated namespaces to watch; empty watches all namespaces."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """``FINETUNE_OPERATOR_TRAINER_IMAGE``: trainer image of jobs that set no ``spec.runtime.image``."""

    ray_version: str = DEFAULT_RAY_VERSION
    """``FINETUNE_OPERATOR_RAY_VERSION``: KubeRay ``rayVersion`` of jobs that set no ``spec.runtime.rayVersion``."""

    max_workers: int = 64
    """``FINETUNE_OPERATOR_MAX_WORKERS``: largest ``spec.resources.workers`` accepted; bigger jobs fail validation."""

    max_gpus_per_worker: int = 8
    """``FINETUNE_OPERATOR_MAX_GPUS_PER_WORKER``: largest ``spec.resources.gpusPerWorker`` accepted."""

    default_ttl_seconds: int = 3600
    """``FINETUNE_OPERATOR_DEFAULT_TTL_SECONDS``: RayJob ``ttlSecondsAfterFinished`` when the job sets none."""

    status_throttle_seconds: float = 10.0
    """``FINETUNE_OPERATOR_STATUS_THROTTLE_SECONDS``: least interval between the trainer's status patches."""

    head_cpu: str = "1"
    """``FINETUNE_OPERATOR_HEAD_CPU``: CPU of the Ray head pod (it runs the driver, not training)."""

    head_memory: str = "2Gi"
    """``FINETUNE_OPERATOR_HEAD_MEMORY``: memory of the Ray head pod."""

    metrics_port: int = 8080
    """``FINETUNE_OPERATOR_METRICS_PORT``: port of the Prometheus ``/metrics`` endpoint; 0 turns it off."""

    log_level: str = "INFO"
    """``FINETUNE_OPERATOR_LOG_LEVEL``: DEBUG, INFO, WARNING, ERROR or CRITICAL."""

    # ---- the validating admission webhook (docs/platform.md, "Admission webhook")
    webhook_port: int = 9443
    """``FINETUNE_OPERATOR_WEBHOOK_PORT``: port of the admission webhook's HTTPS server; 0 turns it off."""

    webhook_host: str = "finetune-operator-webhook.finetune-system.svc"
    """``FINETUNE_OPERATOR_WEBHOOK_HOST``: the name the API server calls the webhook by (``SERVICE.NAMESPACE.svc``),
    which the operator's own certificate is issued for."""

    webhook_configuration: str = "finetune-operator"
    """``FINETUNE_OPERATOR_WEBHOOK_CONFIGURATION``: the ValidatingWebhookConfiguration whose ``caBundle`` the operator
    keeps current when it makes its own certificate."""

    webhook_cert_dir: str = ""
    """``FINETUNE_OPERATOR_WEBHOOK_CERT_DIR``: a directory holding ``tls.crt`` and ``tls.key`` (a cert-manager Secret);
    empty: the operator makes its own CA and certificate, renews them, and writes the CA into the configuration."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read every ``FINETUNE_OPERATOR_*`` variable; unset or empty ones keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            name = env_name(field.name)
            raw = env.get(name, "").strip()
            if not raw:
                continue
            values[field.name] = _PARSERS[field.name](name, raw)
        return cls(**values)

    @property
    def log_level_number(self) -> int:
        return int(logging.getLevelName(self.log_level))

    def to_env(self) -> dict[str, str]:
        """The variables that reproduce these settings (for documentation and tests)."""
        out: dict[str, str] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            out[env_name(field.name)] = ",".join(value) if isinstance(value, tuple) else str(value)
        return out


def env_name(attribute: str) -> str:
    return PREFIX + attribute.upper()


def _bad(name: str, raw: str, accepted: str) -> SettingsError:
    return SettingsError(f"{name}={raw!r} is not accepted; expected {accepted}")


def _integer(low: int, high: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise _bad(name, raw, f"an integer from {low} to {high}") from None
        if not low <= value <= high:
            raise _bad(name, raw, f"an integer from {low} to {high}")
        return value

    return parse


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _bad(name, raw, "a number of seconds, 0 or more") from None
    if not 0 <= value <= 86_400:
        raise _bad(name, raw, "a number of seconds from 0 to 86400")
    return value


def _pattern(pattern: str, accepted: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if not re.match(pattern, raw):
            raise _bad(name, raw, accepted)
        return raw

    return parse


def _namespaces(name: str, raw: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    for item in items:
        if len(item) > 63 or not re.match(DNS1123_LABEL, item):
            raise _bad(name, raw, f"comma-separated namespace names (DNS-1123 labels); {item!r} is not one")
    return items


def _image(name: str, raw: str) -> str:
    if any(c.isspace() for c in raw) or len(raw) > 512:
        raise _bad(name, raw, "a container image reference such as ghcr.io/org/trainer:1.0")
    return raw


def _log_level(name: str, raw: str) -> str:
    if raw.upper() not in _LOG_LEVELS:
        raise _bad(name, raw, f"one of {', '.join(_LOG_LEVELS)}")
    return raw.upper()


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "namespaces": _namespaces,
    "trainer_image": _image,
    "ray_version": _pattern(RAY_VERSION, "a Ray version such as 2.60.0"),
    "max_workers": _integer(1, 1024),
    "max_gpus_per_worker": _integer(0, 16),
    "default_ttl_seconds": _integer(0, 31_536_000),
    "status_throttle_seconds": _seconds,
    "head_cpu": _pattern(_CPU_QUANTITY, "a CPU quantity such as 1, 2.5 or 500m"),
    "head_memory": _pattern(QUANTITY, "a memory quantity such as 2Gi or 512Mi"),
    "metrics_port": _integer(0, 65_535),
    "log_level": _log_level,
    "webhook_port": _integer(0, 65_535),
    "webhook_host": _pattern(DNS1123_SUBDOMAIN, "a DNS name such as finetune-operator-webhook.finetune-system.svc"),
    "webhook_configuration": _pattern(DNS1123_SUBDOMAIN, "the name of a ValidatingWebhookConfiguration (a DNS-1123 subdomain)"),
    "webhook_cert_dir": _pattern(r"^/[^\s]*$", "an absolute directory path such as /etc/finetune-operator/webhook"),
}
