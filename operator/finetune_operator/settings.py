"""The operator's settings: one frozen object read from ``FINETUNE_OPERATOR_*`` environment variables.

The Helm chart sets these variables (``values.yaml`` mirrors them one to one); ``OperatorSettings.from_env``
is called once at start-up, and a bad value stops the operator with a message that names the variable,
quotes the value and says what would be accepted. Everything else reads the object, never the environment.

Parsing is pydantic-settings' (``env_prefix``): each field declares its type and bounds, and an ``Accepts``
note in its annotation says in words what the variable takes, which is what a refusal quotes (``settings_env``
holds that machinery and the variable types the fields share).

Kopf's own settings (finalizer, progress storage, timeouts) are not here: ``handlers.configure`` sets them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from finetune_operator.api.fields import DNS1123_SUBDOMAIN, QUANTITY, RAY_VERSION
from finetune_operator.api.pods import PodOverrides
from finetune_operator.api.versions import DEFAULT_TRAINER_IMAGE
from finetune_operator.api.versions import RAY_VERSION as DEFAULT_RAY_VERSION
from finetune_operator.settings_env import (
    ENVIRON,
    PREFIX,
    Accepts,
    Boolean,
    Environment,
    Labels,
    Namespace,
    Port,
    Seconds,
    comma_separated,
    conflict,
    image_reference,
    json_object,
    lower,
    matching,
    namespace_list,
    one_line,
    upper,
)
from finetune_operator.settings_env import env_name as env_name

# CPU quantities also take millicores ("500m"), which the API's memory-oriented QUANTITY pattern does not.
_CPU_QUANTITY = r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$"
# Kubernetes label keys (optional DNS-1123 subdomain prefix, then a name) and values.
RAY_TOKEN_AUTH_MIN_VERSION: Final = "2.52.0"
"""The first Ray with token authentication (KubeRay v1.7.0 refuses ``authOptions.mode: token`` below it)."""


class SettingsError(ValueError):
    """A ``FINETUNE_OPERATOR_*`` variable holds a value the operator cannot use."""


_PEM: Final = re.compile(r"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.S)


def _public_key_problem(text: str) -> str | None:
    """What in VERIFY_KEYS is not an Ed25519 public key, by position (never quoting the text: it may be a private key
    put there by mistake, signing.pem for verify.pem, which would otherwise be copied into every RayJob)."""
    for index, match in enumerate(_PEM.finditer(text)):
        if "PUBLIC" not in match[1]:
            return f"PEM block {index + 1} is a {match[1].lower()}"
        try:
            key = serialization.load_pem_public_key(match[0].encode())
        except ValueError:
            return f"PEM block {index + 1} is not a readable public key"
        if not isinstance(key, Ed25519PublicKey):
            return f"PEM block {index + 1} is a {type(key).__name__}"
    for index, entry in enumerate(e.strip() for e in _PEM.sub("", text).split(",")):
        try:
            raw = base64.b64decode(entry, validate=True)
        except (binascii.Error, ValueError):
            return f"entry {index + 1} is neither a PEM public key nor base64"
        if entry and len(raw) != 32:
            return f"entry {index + 1} has {len(raw)} bytes, not an Ed25519 raw key's 32"
    return None


class OperatorSettings(BaseSettings):
    """How the operator runs and what it puts into every RayJob; each attribute is one environment variable."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="ignore", validate_default=False)

    namespaces: Annotated[tuple[str, ...], NoDecode, BeforeValidator(comma_separated), AfterValidator(namespace_list)] = ()
    """``FINETUNE_OPERATOR_NAMESPACES``: comma-separated namespaces to watch; empty watches all namespaces."""

    trainer_image: Annotated[
        str, AfterValidator(image_reference), Accepts("a container image reference such as ghcr.io/org/trainer:1.0")
    ] = DEFAULT_TRAINER_IMAGE
    """``FINETUNE_OPERATOR_TRAINER_IMAGE``: trainer image of jobs that set no ``spec.runtime.image``."""

    ray_version: Annotated[str, matching(RAY_VERSION), Accepts("a Ray version such as 2.60.0")] = DEFAULT_RAY_VERSION
    """``FINETUNE_OPERATOR_RAY_VERSION``: KubeRay ``rayVersion`` of jobs that set no ``spec.runtime.rayVersion``."""

    max_workers: Annotated[int, Field(ge=1, le=1024), Accepts("an integer from 1 to 1024")] = 64
    """``FINETUNE_OPERATOR_MAX_WORKERS``: largest ``spec.resources.workers`` accepted; bigger jobs fail validation."""

    max_data_workers: Annotated[int, Field(ge=0, le=256), Accepts("an integer from 0 to 256")] = 16
    """``FINETUNE_OPERATOR_MAX_DATA_WORKERS``: largest ``spec.resources.dataWorkers.replicas`` accepted (CPU-only data
    pods, which ``maxWorkers`` does not count); 0 refuses every job that asks for data workers."""

    max_gpus_per_worker: Annotated[int, Field(ge=0, le=16), Accepts("an integer from 0 to 16")] = 8
    """``FINETUNE_OPERATOR_MAX_GPUS_PER_WORKER``: largest ``spec.resources.gpusPerWorker`` accepted."""

    default_ttl_seconds: Annotated[int, Field(ge=0, le=31_536_000), Accepts("an integer from 0 to 31536000")] = 3600
    """``FINETUNE_OPERATOR_DEFAULT_TTL_SECONDS``: RayJob ``ttlSecondsAfterFinished`` when the job sets none."""

    pre_running_deadline_seconds: Annotated[int, Field(ge=0, le=2_147_483_647), Accepts("an integer from 0 to 2147483647")] = 1800
    """``FINETUNE_OPERATOR_PRE_RUNNING_DEADLINE_SECONDS``: RayJob ``preRunningDeadlineSeconds``: a job whose Ray cluster
    has not started running by then fails (reason PreRunningDeadlineExceeded) instead of waiting for ever on quota, an
    image pull or unschedulable GPUs; 0 waits for ever. 30 minutes leave room to pull a large GPU image."""

    status_throttle_seconds: Annotated[float, Field(ge=0, le=86_400), Accepts("a number of seconds from 0 to 86400")] = 10.0
    """``FINETUNE_OPERATOR_STATUS_THROTTLE_SECONDS``: least interval between the trainer's status patches."""

    head_cpu: Annotated[str, matching(_CPU_QUANTITY), Accepts("a CPU quantity such as 1, 2.5 or 500m")] = "1"
    """``FINETUNE_OPERATOR_HEAD_CPU``: CPU of the Ray head pod (it runs the driver, not training)."""

    head_memory: Annotated[str, matching(QUANTITY), Accepts("a memory quantity such as 2Gi or 512Mi")] = "2Gi"
    """``FINETUNE_OPERATOR_HEAD_MEMORY``: memory of the Ray head pod."""

    metrics_port: Port = 8080
    """``FINETUNE_OPERATOR_METRICS_PORT``: port of the Prometheus ``/metrics`` endpoint; 0 turns it off."""

    metrics_auth: Boolean = True
    """``FINETUNE_OPERATOR_METRICS_AUTH``: serve ``/metrics`` over HTTPS to bearer tokens the API server authenticates
    and allows to ``get`` the non-resource URL ``/metrics`` (``metrics_server``); false: plain HTTP to anyone who
    reaches the port, for a cluster that puts its own authenticating proxy in front."""

    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        BeforeValidator(upper),
        Accepts("one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ] = "INFO"
    """``FINETUNE_OPERATOR_LOG_LEVEL``: DEBUG, INFO, WARNING, ERROR or CRITICAL."""

    trainer_uid: Annotated[int, Field(ge=1, le=2_147_483_647), Accepts("an integer from 1 to 2147483647")] = 1000
    """``FINETUNE_OPERATOR_TRAINER_UID``: numeric user of the Ray pods (``ray`` in rayproject/ray images); never 0."""

    trainer_gid: Annotated[int, Field(ge=0, le=2_147_483_647), Accepts("an integer from 0 to 2147483647")] = 100
    """``FINETUNE_OPERATOR_TRAINER_GID``: primary group and fsGroup of the Ray pods (``users`` in rayproject/ray)."""

    ray_auth_mode: Annotated[Literal["token", "disabled"], BeforeValidator(lower), Accepts("one of token, disabled")] = "token"
    """``FINETUNE_OPERATOR_RAY_AUTH_MODE``: ``token`` (KubeRay generates a per-cluster token that every Ray port
    demands) or ``disabled``, which is insecure: anyone who reaches a head can run code as the job."""

    job_network_policy: Boolean = True
    """``FINETUNE_OPERATOR_JOB_NETWORK_POLICY``: give each job a NetworkPolicy admitting ingress to its Ray pods
    only from its own pods, from KubeRay (dashboard port) and from the metrics scraper, when configured."""

    kuberay_namespace: Namespace = ""
    """``FINETUNE_OPERATOR_KUBERAY_NAMESPACE``: namespace of the KubeRay operator, which polls each job's
    dashboard; empty: the KubeRay pod labels are trusted in any namespace."""

    kuberay_pod_labels: Labels = ("app.kubernetes.io/component=kuberay-operator",)
    """``FINETUNE_OPERATOR_KUBERAY_POD_LABELS``: comma-separated ``key=value`` labels of the KubeRay operator pod
    (the default is on the pod of both KubeRay's Helm chart and its kustomize manifests)."""

    metrics_scraper_namespace: Namespace = ""
    """``FINETUNE_OPERATOR_METRICS_SCRAPER_NAMESPACE``: namespace of the Prometheus that scrapes Ray's metrics
    port; with ``METRICS_SCRAPER_POD_LABELS`` empty too, no scraper is admitted."""

    metrics_scraper_pod_labels: Labels = ()
    """``FINETUNE_OPERATOR_METRICS_SCRAPER_POD_LABELS``: comma-separated ``key=value`` labels of the scraper pods."""

    # ---- the validating admission webhook (docs/platform.md, "Admission webhook")
    webhook_port: Port = 9443
    """``FINETUNE_OPERATOR_WEBHOOK_PORT``: port of the admission webhook's HTTPS server; 0 turns it off."""

    webhook_host: Annotated[
        str, matching(DNS1123_SUBDOMAIN), Accepts("a DNS name such as finetune-operator-webhook.finetune-system.svc")
    ] = "finetune-operator-webhook.finetune-system.svc"
    """``FINETUNE_OPERATOR_WEBHOOK_HOST``: the name the API server calls the webhook by (``SERVICE.NAMESPACE.svc``),
    which the operator's own certificate is issued for."""

    webhook_configuration: Annotated[
        str,
        matching(DNS1123_SUBDOMAIN),
        Accepts("the name of a ValidatingWebhookConfiguration (a DNS-1123 subdomain)"),
    ] = "finetune-operator"
    """``FINETUNE_OPERATOR_WEBHOOK_CONFIGURATION``: the ValidatingWebhookConfiguration whose ``caBundle`` the operator
    keeps current when it makes its own certificate."""

    webhook_cert_dir: Annotated[
        str, matching(r"^/[^\s]*$"), Accepts("an absolute directory path such as /etc/finetune-operator/webhook")
    ] = ""
    """``FINETUNE_OPERATOR_WEBHOOK_CERT_DIR``: a directory holding ``tls.crt`` and ``tls.key`` (a cert-manager Secret);
    empty: the operator makes its own CA and certificate, renews them, and writes the CA into the configuration."""

    # ---- what every job's Ray pods get (docs/platform.md, "Pod overrides")
    pod_defaults: Annotated[
        PodOverrides,
        NoDecode,
        BeforeValidator(json_object),
        Accepts('a JSON object of spec.runtime.pod fields (docs/platform.md, "Pod overrides")'),
    ] = PodOverrides()
    """``FINETUNE_OPERATOR_POD_DEFAULTS``: JSON, the fields of ``spec.runtime.pod`` (imagePullSecrets, labels, annotations,
    volumes, volumeMounts, affinity, nodeSelector, tolerations, securityContext) every job's pods get, merged with the
    job's own by the rule of ``pod_overrides``; the chart's ``podDefaults``."""

    default_priority_class_name: Annotated[
        str, matching(DNS1123_SUBDOMAIN), Accepts("a PriorityClass name (a DNS-1123 subdomain)")
    ] = ""
    """``FINETUNE_OPERATOR_DEFAULT_PRIORITY_CLASS_NAME``: PriorityClass of the Ray pods of jobs that name none in
    ``spec.runtime.priorityClassName``; empty: none."""

    # ---- two or more replicas (docs/platform.md, "High availability")
    leader_election: Boolean = False
    """``FINETUNE_OPERATOR_LEADER_ELECTION``: replicas take turns through a Lease: only its holder reconciles jobs, every
    replica serves the webhook. Off: this replica reconciles at once, so run only one (the chart turns it on)."""

    leader_election_namespace: Namespace = ""
    """``FINETUNE_OPERATOR_LEADER_ELECTION_NAMESPACE``: namespace of the Lease (the operator's own); needed with
    ``LEADER_ELECTION=true``."""

    leader_election_lease: Annotated[str, matching(DNS1123_SUBDOMAIN), Accepts("a Lease name (a DNS-1123 subdomain)")] = (
        "finetune-operator"
    )
    """``FINETUNE_OPERATOR_LEADER_ELECTION_LEASE``: name of the Lease (coordination.k8s.io/v1) the replicas share."""

    # Kubernetes takes any string; ours go into logs and the Lease, so printable and short.
    leader_election_identity: Annotated[
        str, matching(r"^[\x21-\x7e]{1,128}$"), Accepts("1 to 128 printable characters without spaces")
    ] = ""
    """``FINETUNE_OPERATOR_LEADER_ELECTION_IDENTITY``: this replica's name in the Lease (the chart: the pod's name);
    empty: the host name and a random suffix."""

    lease_duration_seconds: Seconds = 15.0
    """``FINETUNE_OPERATOR_LEASE_DURATION_SECONDS``: how long a standby waits, on its own clock, after the Lease
    last changed before it takes over: the longest a dead leader (killed, partitioned) leaves jobs unattended."""

    renew_deadline_seconds: Seconds = 10.0
    """``FINETUNE_OPERATOR_RENEW_DEADLINE_SECONDS``: a leader that could not renew for this long stops reconciling;
    less than the lease duration, so that it has stopped before a standby may take over."""

    retry_period_seconds: Seconds = 2.0
    """``FINETUNE_OPERATOR_RETRY_PERIOD_SECONDS``: interval between a leader's renewals and a standby's tries."""

    # ---- protecting the model (docs/platform.md, "Protecting the model")
    require_protected_artifacts: Boolean = False
    """``FINETUNE_OPERATOR_REQUIRE_PROTECTED_ARTIFACTS``: refuse jobs whose output is not encrypted
    (``spec.output.encryption``) and signed (``spec.output.sign``), and make every trainer refuse a ``weightsUri`` model
    whose card is unsigned or signed by a key not in ``VERIFY_KEYS``."""

    verify_keys: Annotated[
        str,
        matching(r"^[-A-Za-z0-9+/=,\s]*$"),
        Accepts("Ed25519 public keys: PEM blocks or base64 raw keys, comma-separated"),
    ] = ""
    """``FINETUNE_OPERATOR_VERIFY_KEYS``: the Ed25519 public keys trusted to sign models (PEM blocks or base64 raw keys,
    comma-separated), given to every trainer as ``FINETUNE_VERIFY_KEYS``; needed with ``REQUIRE_PROTECTED_ARTIFACTS=true``."""

    def __init__(self, **values: Any) -> None:
        # Every way of building settings (environment, keyword arguments, ``replace``) refuses in one line.
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(one_line(type(self), exc)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = ENVIRON.get()
        if environ is None:
            return (init_settings,)
        return (init_settings, Environment(settings_cls, environ))

    @model_validator(mode="after")
    def _consistent(self) -> OperatorSettings:
        # Settings that parse one by one can still contradict each other: refuse to start rather than render
        # RayJobs that KubeRay rejects.
        if self.ray_auth_mode == "token" and not ray_version_at_least(self.ray_version, RAY_TOKEN_AUTH_MIN_VERSION):
            raise conflict(
                f"{env_name('ray_version')}={self.ray_version!r} has no Ray token authentication, which "
                f"{env_name('ray_auth_mode')}=token needs; use Ray {RAY_TOKEN_AUTH_MIN_VERSION} or later"
            )
        if self.leader_election and not self.leader_election_namespace:
            raise conflict(
                f"{env_name('leader_election_namespace')} is empty, which {env_name('leader_election')}=true cannot use; "
                "expected the operator's namespace (the chart sets it from the pod's)"
            )
        if self.verify_keys and (problem := _public_key_problem(self.verify_keys)):
            raise conflict(
                f"{env_name('verify_keys')} is not accepted: {problem}; expected Ed25519 public keys only "
                "(PEM PUBLIC KEY blocks or base64 raw keys, comma-separated)"
            )
        if self.require_protected_artifacts and not self.verify_keys:
            raise conflict(
                f"{env_name('verify_keys')} is empty, which {env_name('require_protected_artifacts')}=true cannot use; "
                "expected the public key that verifies the models' signatures (the chart: artifactProtection.verifyKeys)"
            )
        # Fencing: a leader must give up (renew deadline) before a standby may take over (lease duration), and try
        # to renew more than once in between.
        if not self.retry_period_seconds < self.renew_deadline_seconds < self.lease_duration_seconds:
            raise conflict(
                f"{env_name('renew_deadline_seconds')}={self.renew_deadline_seconds:g} is not accepted with "
                f"{env_name('lease_duration_seconds')}={self.lease_duration_seconds:g} and "
                f"{env_name('retry_period_seconds')}={self.retry_period_seconds:g}; expected retry period < renew "
                "deadline < lease duration"
            )
        unknown = sorted({m.name for m in self.pod_defaults.volume_mounts} - {v.name for v in self.pod_defaults.volumes})
        if unknown:
            raise conflict(
                f"{env_name('pod_defaults')}: volumeMounts name {', '.join(map(repr, unknown))}, which is not among its "
                "volumes; expected every mount to name one of the volumes it lists"
            )
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read every ``FINETUNE_OPERATOR_*`` variable; unset or empty ones keep their defaults."""
        token = ENVIRON.set(os.environ if environ is None else environ)
        try:
            return cls()
        finally:
            ENVIRON.reset(token)

    def replace(self, **changes: Any) -> OperatorSettings:
        """A copy with ``changes`` applied, validated like the environment (``dataclasses.replace`` of old)."""
        return type(self)(**{**{name: getattr(self, name) for name in type(self).model_fields}, **changes})

    @property
    def log_level_number(self) -> int:
        return int(logging.getLevelName(self.log_level))

    @property
    def ray_token_auth(self) -> bool:
        return self.ray_auth_mode == "token"

    def to_env(self) -> dict[str, str]:
        """The variables that reproduce these settings (for documentation and tests)."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, PodOverrides):
                out[env_name(name)] = json.dumps(
                    value.model_dump(by_alias=True, mode="json", exclude_defaults=True), separators=(",", ":"), sort_keys=True
                )
            elif isinstance(value, tuple):
                out[env_name(name)] = ",".join(value)
            else:
                out[env_name(name)] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def ray_version_at_least(version: str, minimum: str) -> bool:
    """``version >= minimum`` for ``X.Y.Z`` Ray versions (both already match ``api.fields.RAY_VERSION``)."""
    return tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))


def labels_of(items: tuple[str, ...]) -> dict[str, str]:
    """``("k=v", ...)`` (a ``*_POD_LABELS`` setting) → the ``matchLabels`` mapping."""
    return dict(item.split("=", 1) for item in items)
