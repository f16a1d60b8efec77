"""The admission decision for a FineTuneJob, made once: ``admit(job, settings) -> AdmittedJob`` or ``AdmissionError``.

Pure (pydantic and the operator's settings, no Kubernetes client). The create handler calls it on first
reconcile, ``finetune render`` before building, and the builders (``rayjob.build_children``) accept only
its result, so nothing reaches the cluster without the same verdict. The decision is the API's own
validation (``api.validate``, the words ``finetune validate`` prints) plus what this operator adds on a
cluster: outputs the Ray pods can share, no relative input paths, its limits (``maxWorkers``, GPUs), and,
while Ray token authentication is on, a Ray that has it and no ``env`` that would override KubeRay's token.
Every mistake is one line (field path, quoted value, what is accepted), and all of them come at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator.api.fields import uri_scheme
from finetune_operator.api.v1alpha1 import FineTuneJob, FineTuneJobSpec, ObjectMeta
from finetune_operator.api.validate import validate_spec
from finetune_operator.settings import RAY_TOKEN_AUTH_MIN_VERSION, OperatorSettings, env_name, ray_version_at_least

# KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN only where the container's env has no such name (common/pod.go,
# SetContainerTokenAuthEnvVars): a user's entry would switch authentication off or replace the token.
RAY_AUTH_ENV_PREFIX = "RAY_AUTH_"


class AdmissionError(ValueError):
    """The job is refused; ``lines`` are the field-path messages ``finetune validate`` prints, one per mistake."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


@dataclass(frozen=True)
class AdmittedJob:
    """A FineTuneJob that passed ``admit`` under some operator settings; only ``admit`` makes one."""

    job: FineTuneJob

    @property
    def spec(self) -> FineTuneJobSpec:
        return self.job.spec

    @property
    def metadata(self) -> ObjectMeta:
        return self.job.metadata


def cluster_errors(spec: FineTuneJobSpec) -> list[str]:
    """What is valid for `finetune run` on a laptop but cannot work in Ray pods.

    The output must outlive the Ray cluster and be shared by all its pods (Ray Train writes checkpoints
    from every worker), so it must be an object store or a PVC. Inputs may be absolute paths baked into
    the image, but a relative path means nothing in a pod.
    """
    errors = []
    output = spec.output.uri
    if uri_scheme(output) not in ("s3", "gs", "pvc"):
        errors.append(
            f"spec.output.uri: {output!r} is not shared by the Ray pods nor kept after the cluster is deleted; "
            "on a cluster use s3://BUCKET/PATH, gs://BUCKET/PATH or pvc://CLAIM/PATH"
        )
    inputs = {
        "spec.model.weightsUri": spec.model.weights_uri,
        "spec.dataset.trainUri": spec.dataset.train_uri,
        "spec.dataset.validationUri": spec.dataset.validation_uri,
        "spec.dataset.cacheDir": spec.dataset.cache_dir,
    }
    for field, uri in inputs.items():
        if uri is not None and uri_scheme(uri) is None and not uri.startswith("/"):
            errors.append(
                f"{field}: {uri!r} is a relative path, which means nothing in a Ray pod; "
                "use pvc://CLAIM/PATH, s3://, gs:// or an absolute path inside the trainer image"
            )
    return errors


def policy_errors(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[str]:
    """What this operator enforces on top of the API's own validation: cluster-only rules and its limits."""
    errors = cluster_errors(spec)
    res = spec.resources
    if res.workers > settings.max_workers:
        errors.append(
            f"spec.resources.workers: {res.workers} exceeds this operator's limit of {settings.max_workers} "
            "(FINETUNE_OPERATOR_MAX_WORKERS); ask for fewer workers"
        )
    if res.gpus_per_worker > settings.max_gpus_per_worker:
        errors.append(
            f"spec.resources.gpusPerWorker: {res.gpus_per_worker} exceeds this operator's limit of "
            f"{settings.max_gpus_per_worker} (FINETUNE_OPERATOR_MAX_GPUS_PER_WORKER)"
        )
    if settings.ray_token_auth:
        errors += ray_auth_errors(spec)
    return errors


def ray_auth_errors(spec: FineTuneJobSpec) -> list[str]:
    """What would leave the Ray cluster without token authentication, which this operator turns on."""
    errors = []
    version = spec.runtime.ray_version
    if version is not None and not ray_version_at_least(version, RAY_TOKEN_AUTH_MIN_VERSION):
        errors.append(
            f"spec.runtime.rayVersion: {version!r} has no Ray token authentication, which this operator requires "
            f"({env_name('ray_auth_mode')}=token); use Ray {RAY_TOKEN_AUTH_MIN_VERSION} or later"
        )
    for index, item in enumerate(spec.runtime.env):
        if item.name.startswith(RAY_AUTH_ENV_PREFIX):
            errors.append(
                f"spec.runtime.env[{index}].name: {item.name!r} is set by KubeRay for Ray token authentication "
                f"({env_name('ray_auth_mode')}=token); remove it"
            )
    return errors


def admit(job: FineTuneJob | Mapping[str, Any], settings: OperatorSettings) -> AdmittedJob:
    """The whole admission decision for an API object (validated here) or an already validated model.

    Raises ``AdmissionError`` with every mistake. Extra metadata such as managedFields is ignored.
    """
    if isinstance(job, FineTuneJob):
        model = job
    else:
        meta = job.get("metadata") or {}
        spec, errors = validate_spec(job.get("spec"))
        if spec is None:
            raise AdmissionError(errors)
        model = FineTuneJob(
            metadata=ObjectMeta(name=meta["name"], namespace=meta.get("namespace"), uid=meta.get("uid")), spec=spec
        )
    if errors := policy_errors(model.spec, settings):
        raise AdmissionError(errors)
    return AdmittedJob(model)
