"""The trainer's container in a FineTuneJob (v1alpha1): image, environment (literal variables and Secret or ConfigMap
references), service account, queue, priority and pod overrides, as pydantic v2 models; ``v1alpha1`` re-exports
them beside the rest of the spec. Field docstrings are user-facing (the CRD schema and ``finetune explain``)."""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import Field, field_validator, model_validator

from finetune_operator.api.base import WireModel
from finetune_operator.api.fields import (
    C_IDENTIFIER,
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    ENV_NAME,
    IMAGE_REFERENCE,
    RAY_VERSION,
    fail,
    looks_like_secret,
    quote,
)
from finetune_operator.api.pods import PodOverrides

JOB_ACCOUNT_SUFFIX: Final = "-trainer"
"""How the ServiceAccount the operator makes for each job ends (``naming.service_account_name``)."""

Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]


# ------------------------------------------------------------------------------------------- runtime
class EnvVar(WireModel):
    """A literal environment variable. Credentials go through `envFrom` secret references, never here."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=ENV_NAME)]
    """Variable name, as Kubernetes accepts it: letters, digits, `_`, `-` and `.`, not starting with a digit or `..`."""

    value: Annotated[str, Field(max_length=32_768)] = ""
    """Literal value."""

    @model_validator(mode="after")
    def _no_inline_secret(self) -> EnvVar:
        if self.value and looks_like_secret(self.name):
            fail(
                "value",
                f"{self.name} looks like a credential; never inline secrets: "
                "put it in a Secret and list it under runtime.envFrom",
            )
        return self


class LocalObjectReference(WireModel):
    """A reference to an object in the job's namespace."""

    name: Name
    """Name of the object."""


class EnvFromSource(WireModel):
    """Environment variables from a Secret or ConfigMap in the job's namespace."""

    secret_ref: LocalObjectReference | None = None
    """A Secret whose keys become environment variables (storage credentials)."""

    config_map_ref: LocalObjectReference | None = None
    """A ConfigMap whose keys become environment variables."""

    prefix: Annotated[str | None, Field(max_length=253, pattern=C_IDENTIFIER)] = None
    """Prefix added to every variable name: a C identifier such as `S3_`."""

    @model_validator(mode="after")
    def _one_source(self) -> EnvFromSource:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            fail(None, "give exactly one of secretRef or configMapRef")
        return self


class RuntimeSpec(WireModel):
    """The trainer's container and scheduling."""

    image: Annotated[str | None, Field(min_length=1, max_length=512, pattern=IMAGE_REFERENCE)] = None
    """Trainer image reference such as `ghcr.io/acme/trainer:1.2` (with torch, torchvision, Ray and this trainer); the operator's
    default when absent."""

    ray_version: Annotated[str | None, Field(max_length=32, pattern=RAY_VERSION)] = None
    """Ray version in the image (KubeRay's `rayVersion`); the operator's default when absent."""

    env: Annotated[list[EnvVar], Field(max_length=128)] = Field(default_factory=list)
    """Literal environment variables for the trainer."""

    env_from: Annotated[list[EnvFromSource], Field(max_length=32)] = Field(default_factory=list)
    """Secrets or ConfigMaps whose keys become environment variables (e.g. AWS_ACCESS_KEY_ID for s3://)."""

    service_account_name: Annotated[str | None, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)] = None
    """Service account of the Ray pods; the operator's default when absent. The trainer reports progress with it. Not
    a name ending in `-trainer`: those are the accounts the operator makes for one job each."""

    queue_name: Annotated[str | None, Field(max_length=63, pattern=DNS1123_LABEL)] = None
    """Kueue LocalQueue: sets the `kueue.x-k8s.io/queue-name` label on the RayJob."""

    priority_class_name: Annotated[str | None, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)] = None
    """PriorityClass of the Ray pods; the operator's default (FINETUNE_OPERATOR_DEFAULT_PRIORITY_CLASS_NAME) when absent."""

    # Left out of the wire form while empty: jobs, trainer configs and RayJobs rendered before it stay identical.
    pod: PodOverrides = Field(default_factory=PodOverrides, exclude_if=lambda p: p == PodOverrides())
    """Image pull secrets, labels, annotations, volumes, affinity, scheduling and a stricter securityContext for every Ray
    pod (head, workers, KubeRay's submitter), merged with the platform's defaults (docs/platform.md, "Pod overrides")."""

    @field_validator("service_account_name")
    @classmethod
    def _not_a_jobs_own(cls, value: str | None) -> str | None:
        # Another job's own account (`<job>-trainer`): this job's pods would carry its token and could patch that
        # job's status, and the operator would bind this job's Role to it too.
        if value is not None and value.endswith(JOB_ACCOUNT_SUFFIX):
            fail(
                None,
                f"{quote(value)} has the form of the ServiceAccount the operator makes for one job "
                f"(`<job>{JOB_ACCOUNT_SUFFIX}`), whose token lets a pod report that job's status; leave it out for this "
                "job's own, or name an account of yours",
            )
        return value

    @field_validator("env")
    @classmethod
    def _unique_env(cls, value: list[EnvVar]) -> list[EnvVar]:
        seen: set[str] = set()
        for var in value:
            if var.name in seen:
                fail(None, f"{quote(var.name)} is set twice; set each variable once")
            seen.add(var.name)
        return value
