"""The admission decision for a FineTuneJob, made once: ``admit(job, settings) -> AdmittedJob`` or ``AdmissionError``.

Pure (pydantic and the operator's settings, no Kubernetes client). The create handler calls it on first
reconcile, ``finetune render`` before building, ``finetune validate --cluster`` to give the same verdict
before anything is applied, and the builders (``rayjob.build_children``) accept only its result, so nothing
reaches the cluster without the same verdict. The decision is the API's own
validation (``api.validate``, the words ``finetune validate`` prints) plus what this operator adds on a
cluster: outputs the Ray pods can share, no relative input paths, its limits (``maxWorkers``, GPUs), pod overrides
that fit the platform's pod defaults (``pod_overrides.merge_errors``), and,
while Ray token authentication is on, a Ray that has it and no ``env`` that would override KubeRay's token.
Every mistake is one line (field path, quoted value, what is accepted), and all of them come at once: when
the spec is invalid, the operator's rules still judge the sections that parsed.

The admission webhook (``handlers.validate``, served by Kopf) asks ``review`` for its answer at ``kubectl
apply``: on CREATE the same lines as ``finetune validate --cluster`` (``verdict``); on UPDATE, one line per
changed field other than ``spec.runPolicy.suspend`` (``spec_changes``); ``denial`` is the message kubectl shows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from finetune_operator import pod_overrides
from finetune_operator.api.base import WireModel
from finetune_operator.api.dataworkers import data_replicas
from finetune_operator.api.fields import quote, uri_scheme
from finetune_operator.api.v1alpha1 import (
    DatasetSpec,
    FineTuneJob,
    FineTuneJobSpec,
    ModelSpec,
    ObjectMeta,
    OutputSpec,
    ResourcesSpec,
    RunPolicySpec,
    RuntimeSpec,
    parse_sections,
)
from finetune_operator.api.validate import DocumentResult, validate_document, validate_spec
from finetune_operator.api.versions import KIND
from finetune_operator.settings import RAY_TOKEN_AUTH_MIN_VERSION, OperatorSettings, env_name, labels_of, ray_version_at_least

# KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN only where the container's env has no such name (common/pod.go,
# SetContainerTokenAuthEnvVars): a user's entry would switch authentication off or replace the token.
RAY_AUTH_ENV_PREFIX = "RAY_AUTH_"


MAX_SPEC_BYTES: Final = 128 * 1024
"""The largest spec admitted, as compact JSON. Kopf keeps the last handled spec in an annotation (all annotations of an
object share 256 KiB); the spec is copied into the trainer ConfigMap (at most 1 MiB) and, through ``runtime.env``, into
each pod template of the RayJob (etcd takes about 1.5 MiB per object). 128 KiB keeps every one of them well inside its
limit (tests/unit/test_rayjob.py renders a spec at the bound and measures)."""

MAX_REVIEW_BYTES: Final = 4 * 1024 * 1024
"""The largest AdmissionReview body the webhook reads; a longer one is answered HTTP 413 once this much is read. An
UPDATE's review carries the object and its old self, each as large as etcd stores (``--max-request-bytes``, 1.5 MiB by
default: labels and managed fields are not capped by count), plus a few KiB of envelope (userInfo, options): 4 MiB holds
2 × 1.5 MiB with room to spare, and a CREATE up to the 3 MiB body the API server reads, which then gets the operator's
own refusal (a spec that large is refused in words). aiohttp's default, 1 MiB, failed such calls opaquely."""


def size_errors(spec: Any) -> list[str]:
    """A spec too big to store and render (see ``MAX_SPEC_BYTES``); measured before anything else is built."""
    try:
        size = len(json.dumps(spec, separators=(",", ":"), default=str).encode())
    except (TypeError, ValueError, RecursionError):
        return []  # not JSON at all: validation says what is wrong with it
    if size <= MAX_SPEC_BYTES:
        return []
    return [
        f"spec: {size // 1024} KiB of JSON exceeds the {MAX_SPEC_BYTES // 1024} KiB a FineTuneJob may hold "
        "(it is copied into the RayJob's pods and the trainer's ConfigMap); move large values into a ConfigMap or Secret "
        "and reference it with runtime.envFrom"
    ]


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


@dataclass(frozen=True)
class ClusterProblem:
    """Something valid for `finetune run` on a laptop that cannot work in Ray pods."""

    field: str
    value: str
    problem: str
    why: str
    fix: str

    @property
    def line(self) -> str:
        """The one-line error (field path, quoted value, what is accepted)."""
        return f"{self.field}: {quote(self.value)} {self.problem}{self.why}; {self.fix}"

    @property
    def note(self) -> str:
        """The short form ``finetune validate`` adds to a job it finds valid for local runs only."""
        return f"{self.field} {quote(self.value)} {self.problem}"


def cluster_problems(spec: FineTuneJobSpec | Mapping[str, WireModel]) -> list[ClusterProblem]:
    """What is valid for `finetune run` on a laptop but cannot work in Ray pods, for a spec or the sections of one
    that parsed (``v1alpha1.parse_sections``).

    The output must outlive the Ray cluster and be shared by all its pods (Ray Train writes checkpoints
    from every worker), so it must be an object store or a PVC. Inputs may be absolute paths baked into
    the image, but a relative path means nothing in a pod.
    """
    sections = spec.sections() if isinstance(spec, FineTuneJobSpec) else spec
    output, model, dataset = sections.get("output"), sections.get("model"), sections.get("dataset")
    problems = []
    if isinstance(output, OutputSpec) and uri_scheme(output.uri) not in ("s3", "gs", "pvc"):
        problems.append(
            ClusterProblem(
                "spec.output.uri",
                output.uri,
                "is not shared by the Ray pods",
                " nor kept after the cluster is deleted",
                "on a cluster use s3://BUCKET/PATH, gs://BUCKET/PATH or pvc://CLAIM/PATH",
            )
        )
    inputs = {
        "spec.model.weightsUri": model.weights_uri if isinstance(model, ModelSpec) else None,
        "spec.dataset.trainUri": dataset.train_uri if isinstance(dataset, DatasetSpec) else None,
        "spec.dataset.validationUri": dataset.validation_uri if isinstance(dataset, DatasetSpec) else None,
        "spec.dataset.cacheDir": dataset.cache_dir if isinstance(dataset, DatasetSpec) else None,
    }
    for field, uri in inputs.items():
        if uri is not None and uri_scheme(uri) is None and not uri.startswith("/"):
            problems.append(
                ClusterProblem(
                    field,
                    uri,
                    "is a relative path",
                    ", which means nothing in a Ray pod",
                    "use pvc://CLAIM/PATH, s3://, gs:// or an absolute path inside the trainer image",
                )
            )
    return problems


def cluster_errors(spec: FineTuneJobSpec | Mapping[str, WireModel]) -> list[str]:
    """``cluster_problems`` as error lines."""
    return [problem.line for problem in cluster_problems(spec)]


def policy_errors(spec: FineTuneJobSpec | Mapping[str, WireModel], settings: OperatorSettings) -> list[str]:
    """What this operator enforces on top of the API's own validation: cluster-only rules and its limits.

    Takes a spec, or the sections of an invalid one that parsed, so that a refusal lists these too.
    """
    errors = cluster_errors(spec)
    res = spec.resources if isinstance(spec, FineTuneJobSpec) else spec.get("resources")
    if isinstance(res, ResourcesSpec) and res.workers > settings.max_workers:
        errors.append(
            f"spec.resources.workers: {res.workers} exceeds this operator's limit of {settings.max_workers} "
            "(FINETUNE_OPERATOR_MAX_WORKERS); ask for fewer workers"
        )
    # Data pods are a second pod group beside the workers: without their own bound, a job held to maxWorkers could
    # still ask for MAX_DATA_WORKERS (256) CPU-only pods.
    if isinstance(res, ResourcesSpec) and data_replicas(res.data_workers) > settings.max_data_workers:
        errors.append(
            f"spec.resources.dataWorkers.replicas: {data_replicas(res.data_workers)} exceeds this operator's limit of "
            f"{settings.max_data_workers} (FINETUNE_OPERATOR_MAX_DATA_WORKERS); ask for fewer data workers"
        )
    if isinstance(res, ResourcesSpec) and res.gpus_per_worker > settings.max_gpus_per_worker:
        errors.append(
            f"spec.resources.gpusPerWorker: {res.gpus_per_worker} exceeds this operator's limit of "
            f"{settings.max_gpus_per_worker} (FINETUNE_OPERATOR_MAX_GPUS_PER_WORKER)"
        )
    runtime = spec.runtime if isinstance(spec, FineTuneJobSpec) else spec.get("runtime")
    if settings.ray_token_auth and isinstance(runtime, RuntimeSpec):
        errors += ray_auth_errors(runtime)
    if isinstance(runtime, RuntimeSpec):
        errors += pod_overrides.merge_errors(settings.pod_defaults, runtime.pod)
        errors += peer_label_errors(runtime.pod.labels, settings)
    output = spec.output if isinstance(spec, FineTuneJobSpec) else spec.get("output")
    if settings.require_protected_artifacts and isinstance(output, OutputSpec):
        errors += protection_errors(output)
    return errors


def peer_label_errors(labels: Mapping[str, str], settings: OperatorSettings) -> list[str]:
    """Pod labels that make a job's Ray pods look like KubeRay's operator or the metrics scraper: every job's
    NetworkPolicy admits those to Ray's dashboard or metrics port (``security.network_policy_spec``), so a job
    carrying them could reach every other job's Ray cluster. The platform's own labels (pod defaults) count with
    the job's: together they must not complete a peer's selector."""
    if not settings.job_network_policy or not labels:
        return []
    merged = {**settings.pod_defaults.labels, **labels}
    errors = []
    for setting, peer in (
        ("kuberay_pod_labels", settings.kuberay_pod_labels),
        ("metrics_scraper_pod_labels", settings.metrics_scraper_pod_labels),
    ):
        wanted = labels_of(peer)
        if wanted and all(merged.get(k) == v for k, v in wanted.items()) and any(labels.get(k) == v for k, v in wanted.items()):
            mine = ", ".join(f"{k}={v}" for k, v in wanted.items() if labels.get(k) == v)
            errors.append(
                f"spec.runtime.pod.labels: {quote(mine)} gives the job's pods the labels this operator's NetworkPolicies "
                f"admit as {'KubeRay' if setting == 'kuberay_pod_labels' else 'the metrics scraper'} ({env_name(setting)}); "
                "use other labels"
            )
    return errors


def protection_errors(output: OutputSpec) -> list[str]:
    """What leaves a job's model unencrypted or unsigned, which this operator refuses."""
    why = f"this operator requires protected models ({env_name('require_protected_artifacts')}=true)"
    errors = []
    # Client-side encryption is required, not only the store's: checkpoints carry an unsigned sha256 alone, and the
    # shipped model.pt is read back from the best checkpoint in the bucket before the card is signed; only AES-GCM
    # (bound to each file's name) proves the trainer wrote what it signs. serverSide may be added on top.
    if output.encryption is None or not output.encryption.client_side:
        found = "not set" if output.encryption is None else f"{quote(output.encryption.to_wire())} has no clientSide"
        errors.append(
            f"spec.output.encryption: {found}, but {why}; set encryption.clientSide: true (key in a Secret under "
            "runtime.envFrom); encryption.serverSide.kmsKey may be added, not substituted"
        )
    if not output.sign:
        errors.append(f"spec.output.sign: false, but {why}; set sign: true and list the signing-key Secret under runtime.envFrom")
    return errors


def ray_auth_errors(runtime: RuntimeSpec) -> list[str]:
    """What would leave the Ray cluster without token authentication, which this operator turns on."""
    errors = []
    version = runtime.ray_version
    if version is not None and not ray_version_at_least(version, RAY_TOKEN_AUTH_MIN_VERSION):
        errors.append(
            f"spec.runtime.rayVersion: {version!r} has no Ray token authentication, which this operator requires "
            f"({env_name('ray_auth_mode')}=token); use Ray {RAY_TOKEN_AUTH_MIN_VERSION} or later"
        )
    for index, item in enumerate(runtime.env):
        if item.name.startswith(RAY_AUTH_ENV_PREFIX):
            errors.append(
                f"spec.runtime.env[{index}].name: {item.name!r} is set by KubeRay for Ray token authentication "
                f"({env_name('ray_auth_mode')}=token); remove it"
            )
    return errors


def admit(job: FineTuneJob | Mapping[str, Any], settings: OperatorSettings) -> AdmittedJob:
    """The whole admission decision for an API object (validated here) or an already validated model.

    Raises ``AdmissionError`` with every mistake. Extra metadata such as managedFields is ignored. Nothing in
    the job's status counts as proof of an earlier admission (the trainer may write status): what to do with a
    job that runs already but that newer rules refuse is the reconciler's business (it follows it).
    """
    raw_spec = (
        job.spec.model_dump(by_alias=True, mode="json", exclude_none=True) if isinstance(job, FineTuneJob) else job.get("spec")
    )
    if too_big := size_errors(raw_spec):
        raise AdmissionError(too_big)
    if isinstance(job, FineTuneJob):
        model = job
    else:
        meta = job.get("metadata") or {}
        spec, errors = validate_spec(job.get("spec"))
        if spec is None:
            # The operator's own rules on the sections that did parse: every mistake in one refusal.
            extra = policy_errors(parse_sections(job.get("spec")), settings)
            raise AdmissionError(errors + [line for line in extra if line not in errors])
        model = FineTuneJob(
            metadata=ObjectMeta(name=meta["name"], namespace=meta.get("namespace"), uid=meta.get("uid")), spec=spec
        )
    if errors := policy_errors(model.spec, settings):
        raise AdmissionError(errors)
    return AdmittedJob(model)


# ---------------------------------------------------------------------------------- the webhook's answer
SUSPEND_ONLY: Final = (
    "only spec.runPolicy.suspend may change after creation; delete the job and create it again to change anything else"
)
_ABSENT: Final = object()


def verdict(result: DocumentResult, settings: OperatorSettings) -> list[str]:
    """Every mistake of one validated document under this operator: the API's lines, then the operator's rules and limits.

    What ``finetune validate --cluster`` prints for the document and what the admission webhook answers on CREATE.
    """
    errors = list(result.errors)
    if result.job is not None:
        try:
            admit(result.job, settings)
        except AdmissionError as exc:
            errors += exc.lines
    elif isinstance(result.document, dict) and result.document.get("kind") == KIND:
        # Invalid already: the operator's rules on the sections that parsed, so that one answer shows everything.
        errors += [line for line in policy_errors(parse_sections(result.document.get("spec")), settings) if line not in errors]
    return errors


def review(operation: str, new: Mapping[str, Any] | None, old: Mapping[str, Any] | None, settings: OperatorSettings) -> list[str]:
    """The admission webhook's decision on one request (``new`` and ``old`` as the API server sends them); [] allows it.

    CREATE: the whole admission decision (``verdict``). UPDATE: only ``spec.runPolicy.suspend`` may change
    (``spec_changes``); the job itself is not judged again, since it was admitted under the rules of its day, and a
    label, an annotation or a suspension must never fail over newer limits. Anything else (DELETE) is allowed:
    deleting a job never depends on the operator.
    """
    if operation == "CREATE":
        return verdict(validate_document(dict(new or {})), settings)
    if operation == "UPDATE":
        return spec_changes((old or {}).get("spec"), (new or {}).get("spec"))
    return []


def spec_changes(old: Any, new: Any) -> list[str]:
    """One line per field of a spec that changed, ``runPolicy.suspend`` aside; [] when nothing else did.

    As in the CRD's CEL rules, ``runPolicy`` may be added to suspend a job, and a run-policy field spelled out
    with its default value is no change.
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        old, new = _comparable(old), _comparable(new)
    return [f"{path}: {change}; {SUSPEND_ONLY}" for path, change in _changes(old, new, "spec")]


def denial(lines: list[str]) -> str:
    """The webhook's refusal, one mistake a line; kubectl prints it after ``admission webhook "..." denied the request:``."""
    return f"invalid {KIND} ({len(lines)} error{'s' if len(lines) > 1 else ''}):\n" + "\n".join(f"  {line}" for line in lines)


def _comparable(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(spec.get("runPolicy", {}), Mapping):
        return spec
    policy = {field.alias or name: field.default for name, field in RunPolicySpec.model_fields.items() if name != "suspend"}
    policy |= {key: value for key, value in spec.get("runPolicy", {}).items() if key != "suspend"}
    return {**spec, "runPolicy": policy}


def _changes(old: Any, new: Any, path: str) -> Iterator[tuple[str, str]]:
    """(field path, what happened) for each difference, in the new document's order."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*new, *(key for key in old if key not in new)]:
            yield from _changes(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{path}.{key}")
    elif old is _ABSENT:
        yield path, f"{quote(new)} was added"
    elif new is _ABSENT:
        yield path, f"{quote(old)} was removed"
    elif not _same(old, new):
        yield path, f"changed from {quote(old)} to {quote(new)}"


def _same(a: Any, b: Any) -> bool:
    """JSON equality: unlike Python's, true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    return bool(a == b)


def malformed_review_answer(review: Any, exc: Exception) -> dict[str, Any]:
    """An AdmissionReview v1 refusing a request that could not be read, with its uid when there is one."""
    request = review.get("request") if isinstance(review, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    detail = (str(exc).splitlines() or [""])[0][:200]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": uid if isinstance(uid, str) else "",
            "allowed": False,
            "status": {"code": 400, "message": f"malformed AdmissionReview: {type(exc).__name__}: {detail}"},
        },
    }
