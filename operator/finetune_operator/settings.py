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
from typing import Any, Final, TypeVar

from finetune_operator.api.fields import DNS1123_LABEL, DNS1123_SUBDOMAIN, QUANTITY, RAY_VERSION
from finetune_operator.api.versions import DEFAULT_TRAINER_IMAGE
from finetune_operator.api.versions import RAY_VERSION as DEFAULT_RAY_VERSION

PREFIX = "FINETUNE_OPERATOR_"
# CPU quantities also take millicores ("500m"), which the API's memory-oriented QUANTITY pattern does not.
_CPU_QUANTITY = r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_AUTH_MODES = ("token", "disabled")
_BOOLEANS = {"true": True, "false": False}
# Kubernetes label keys (optional DNS-1123 subdomain prefix, then a name) and values.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")
RAY_TOKEN_AUTH_MIN_VERSION: Final = "2.52.0"
"""The first Ray with token authentication (KubeRay v1.7.0 refuses ``authOptions.mode: token`` below it)."""
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

    pre_running_deadline_seconds: int = 1800
    """``FINETUNE_OPERATOR_PRE_RUNNING_DEADLINE_SECONDS``: RayJob ``preRunningDeadlineSeconds``: a job whose Ray cluster
    has not started running by then fails (reason PreRunningDeadlineExceeded) instead of waiting for ever on quota, an
    image pull or unschedulable GPUs; 0 waits for ever. 30 minutes leave room to pull a large GPU image."""

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

    trainer_uid: int = 1000
    """``FINETUNE_OPERATOR_TRAINER_UID``: numeric user of the Ray pods (``ray`` in rayproject/ray images); never 0."""

    trainer_gid: int = 100
    """``FINETUNE_OPERATOR_TRAINER_GID``: primary group and fsGroup of the Ray pods (``users`` in rayproject/ray)."""

    ray_auth_mode: str = "token"
    """``FINETUNE_OPERATOR_RAY_AUTH_MODE``: ``token`` (KubeRay generates a per-cluster token that every Ray port
    demands) or ``disabled``, which is insecure: anyone who reaches a head can run code as the job."""

    job_network_policy: bool = True
    """``FINETUNE_OPERATOR_JOB_NETWORK_POLICY``: give each job a NetworkPolicy admitting ingress to its Ray pods
    only from its own pods, from KubeRay (dashboard port) and from the metrics scraper, when configured."""

    kuberay_namespace: str = ""
    """``FINETUNE_OPERATOR_KUBERAY_NAMESPACE``: namespace of the KubeRay operator, which polls each job's
    dashboard; empty: the KubeRay pod labels are trusted in any namespace."""

    kuberay_pod_labels: tuple[str, ...] = ("app.kubernetes.io/component=kuberay-operator",)
    """``FINETUNE_OPERATOR_KUBERAY_POD_LABELS``: comma-separated ``key=value`` labels of the KubeRay operator pod
    (the default is on the pod of both KubeRay's Helm chart and its kustomize manifests)."""

    metrics_scraper_namespace: str = ""
    """``FINETUNE_OPERATOR_METRICS_SCRAPER_NAMESPACE``: namespace of the Prometheus that scrapes Ray's metrics
    port; with ``METRICS_SCRAPER_POD_LABELS`` empty too, no scraper is admitted."""

    metrics_scraper_pod_labels: tuple[str, ...] = ()
    """``FINETUNE_OPERATOR_METRICS_SCRAPER_POD_LABELS``: comma-separated ``key=value`` labels of the scraper pods."""

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

    # ---- two or more replicas (docs/platform.md, "High availability")
    leader_election: bool = False
    """``FINETUNE_OPERATOR_LEADER_ELECTION``: replicas take turns through a Lease: only its holder reconciles jobs, every
    replica serves the webhook. Off: this replica reconciles at once, so run only one (the chart turns it on)."""

    leader_election_namespace: str = ""
    """``FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE``: namespace of the Lease (the operator's own); needed with
    ``LEADER_ELECTION=true``."""

    leader_election_lease: str = "finetune-operator"
    """``FINETUNE_OPERATOR_LEADER_ELECTION_LEASE``: name of the Lease (coordination.k8s.io/v1) the replicas share."""

    leader_election_identity: str = ""
    """``FINETUNE_OPERATOR_LEADER_ELECTION_IDENTITY``: this replica's name in the Lease (the chart: the pod's name);
    empty: the host name and a random suffix."""

    lease_duration_seconds: float = 15.0
    """``FINETUNE_OPERATOR_LEASE_DURATION_SECONDS``: how long a standby waits, on its own clock, after the Lease
    last changed before it takes over: the longest a dead leader (killed, partitioned) leaves jobs unattended."""

    renew_deadline_seconds: float = 10.0
    """``FINETUNE_OPERATOR_RENEW_DEADLINE_SECONDS``: a leader that could not renew for this long stops reconciling;
    less than the lease duration, so that it has stopped before a standby may take over."""

    retry_period_seconds: float = 2.0
    """``FINETUNE_OPERATOR_RETRY_PERIOD_SECONDS``: interval between a leader's renewals and a standby's tries."""

    # ---- protecting the model (docs/platform.md, "Protecting the model")
    require_protected_artifacts: bool = False
    """``FINETUNE_OPERATOR_REQUIRE_PROTECTED_ARTIFACTS``: refuse jobs whose output is not encrypted
    (``spec.output.encryption``) and signed (``spec.output.sign``), and make every trainer refuse a ``weightsUri`` model
    whose card is unsigned or signed by a key not in ``VERIFY_KEYS``."""

    verify_keys: str = ""
    """``FINETUNE_OPERATOR_VERIFY_KEYS``: the Ed25519 public keys trusted to sign models (PEM blocks or base64 raw keys,
    comma-separated), given to every trainer as ``FINETUNE_VERIFY_KEYS``; needed with ``REQUIRE_PROTECTED_ARTIFACTS=true``."""

    def __post_init__(self) -> None:
        # Settings that parse one by one can still contradict each other: refuse to start rather than render
        # RayJobs that KubeRay rejects.
        if self.ray_auth_mode == "token" and not ray_version_at_least(self.ray_version, RAY_TOKEN_AUTH_MIN_VERSION):
            raise SettingsError(
                f"{env_name('ray_version')}={self.ray_version!r} has no Ray token authentication, which "
                f"{env_name('ray_auth_mode')}=token needs; use Ray {RAY_TOKEN_AUTH_MIN_VERSION} or later"
            )
        if self.leader_election and not self.leader_election_namespace:
            raise SettingsError(
                f"{env_name('leader_election_namespace')} is empty, which {env_name('leader_election')}=true cannot use; "
                "expected the operator's namespace (the chart sets it from the pod's)"
            )
        if self.require_protected_artifacts and not self.verify_keys:
            raise SettingsError(
                f"{env_name('verify_keys')} is empty, which {env_name('require_protected_artifacts')}=true cannot use; "
                "expected the public key that verifies the models' signatures (the chart: artifactProtection.verifyKeys)"
            )
        # Fencing: a leader must give up (renew deadline) before a standby may take over (lease duration), and try
        # to renew more than once in between.
        if not self.retry_period_seconds < self.renew_deadline_seconds < self.lease_duration_seconds:
            raise SettingsError(
                f"{env_name('renew_deadline_seconds')}={self.renew_deadline_seconds:g} is not accepted with "
                f"{env_name('lease_duration_seconds')}={self.lease_duration_seconds:g} and "
                f"{env_name('retry_period_seconds')}={self.retry_period_seconds:g}; expected retry period < renew "
                "deadline < lease duration"
            )

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

    @property
    def ray_token_auth(self) -> bool:
        return self.ray_auth_mode == "token"

    def to_env(self) -> dict[str, str]:
        """The variables that reproduce these settings (for documentation and tests)."""
        out: dict[str, str] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                out[env_name(field.name)] = ",".join(value)
            else:
                out[env_name(field.name)] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def env_name(attribute: str) -> str:
    return PREFIX + attribute.upper()


def ray_version_at_least(version: str, minimum: str) -> bool:
    """``version >= minimum`` for ``X.Y.Z`` Ray versions (both already match ``api.fields.RAY_VERSION``)."""
    return tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))


def labels_of(items: tuple[str, ...]) -> dict[str, str]:
    """``("k=v", ...)`` (a ``*_POD_LABELS`` setting) → the ``matchLabels`` mapping."""
    return dict(item.split("=", 1) for item in items)


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


def _positive_seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _bad(name, raw, "a number of seconds above 0") from None
    if not 0 < value <= 3600:
        raise _bad(name, raw, "a number of seconds above 0, at most 3600")
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


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw.lower() not in choices:
            raise _bad(name, raw, f"one of {', '.join(choices)}")
        return raw.lower()

    return parse


def _boolean(name: str, raw: str) -> bool:
    if raw.lower() not in _BOOLEANS:
        raise _bad(name, raw, "true or false")
    return _BOOLEANS[raw.lower()]


def _namespace(name: str, raw: str) -> str:
    if len(raw) > 63 or not re.match(DNS1123_LABEL, raw):
        raise _bad(name, raw, "a namespace name (a DNS-1123 label)")
    return raw


def _labels(name: str, raw: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    for item in items:
        key, equals, value = item.partition("=")
        prefix = key.rpartition("/")[0]
        if not equals or len(prefix) > 253 or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise _bad(name, raw, f"comma-separated key=value pod labels; {item!r} is not one")
    return items


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
    "pre_running_deadline_seconds": _integer(0, 2_147_483_647),
    "status_throttle_seconds": _seconds,
    "head_cpu": _pattern(_CPU_QUANTITY, "a CPU quantity such as 1, 2.5 or 500m"),
    "head_memory": _pattern(QUANTITY, "a memory quantity such as 2Gi or 512Mi"),
    "metrics_port": _integer(0, 65_535),
    "log_level": _log_level,
    "trainer_uid": _integer(1, 2_147_483_647),
    "trainer_gid": _integer(0, 2_147_483_647),
    "ray_auth_mode": _choice(_AUTH_MODES),
    "job_network_policy": _boolean,
    "kuberay_namespace": _namespace,
    "kuberay_pod_labels": _labels,
    "metrics_scraper_namespace": _namespace,
    "metrics_scraper_pod_labels": _labels,
    "webhook_port": _integer(0, 65_535),
    "webhook_host": _pattern(DNS1123_SUBDOMAIN, "a DNS name such as finetune-operator-webhook.finetune-system.svc"),
    "webhook_configuration": _pattern(DNS1123_SUBDOMAIN, "the name of a ValidatingWebhookConfiguration (a DNS-1123 subdomain)"),
    "webhook_cert_dir": _pattern(r"^/[^\s]*$", "an absolute directory path such as /etc/finetune-operator/webhook"),
    "leader_election": _boolean,
    "leader_election_namespace": _namespace,
    "leader_election_lease": _pattern(DNS1123_SUBDOMAIN, "a Lease name (a DNS-1123 subdomain)"),
    # Kubernetes takes any string; ours go into logs and the Lease, so printable and short.
    "leader_election_identity": _pattern(r"^[\x21-\x7e]{1,128}$", "1 to 128 printable characters without spaces"),
    "lease_duration_seconds": _positive_seconds,
    "renew_deadline_seconds": _positive_seconds,
    "retry_period_seconds": _positive_seconds,
    "require_protected_artifacts": _boolean,
    "verify_keys": _pattern(r"^[-A-Za-z0-9+/=,\s]*$", "Ed25519 public keys: PEM blocks or base64 raw keys, comma-separated"),
}
