"""The FineTuneJob API, version v1alpha1: spec, status and the object itself, as pydantic v2 models.

These models are the single source of truth: the CRD schema is generated from them (``crd.py``),
``finetune validate`` and the operator validate with them, ``finetune explain`` reads their
docstrings, and the trainer takes its configuration from them. Field docstrings are user-facing.
The spec's larger sections and the status live beside it (``training.py``: model, dataset, strategy,
hyperparameters; ``runtime.py``; ``job_status.py``), re-exported here: the code imports the API from here.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import (
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from finetune_operator.api import catalog
from finetune_operator.api.base import WireModel
from finetune_operator.api.dataworkers import DataWorkersSpec
from finetune_operator.api.fields import (
    DNS1123_LABEL,
    EXTENDED_RESOURCE,
    FIELDS_ONLY,
    QUANTITY,
    Problems,
    check_extended_resource,
    check_uri,
    fail,
    fields_only,
    quote,
    uri_scheme,
)

# The status models live in job_status.py; re-exported here, where the rest of the code finds the API.
from finetune_operator.api.job_status import MAX_WARNING_LENGTH as MAX_WARNING_LENGTH
from finetune_operator.api.job_status import MAX_WARNINGS as MAX_WARNINGS
from finetune_operator.api.job_status import TERMINAL_PHASES as TERMINAL_PHASES
from finetune_operator.api.job_status import Artifacts as Artifacts
from finetune_operator.api.job_status import Condition as Condition
from finetune_operator.api.job_status import FineTuneJobStatus as FineTuneJobStatus
from finetune_operator.api.job_status import Metrics as Metrics
from finetune_operator.api.job_status import Phase as Phase
from finetune_operator.api.job_status import Progress as Progress
from finetune_operator.api.job_status import Stage as Stage
from finetune_operator.api.job_status import WarningLine as WarningLine
from finetune_operator.api.job_status import newest_warnings as newest_warnings
from finetune_operator.api.protection import EncryptionSpec

# The runtime section lives in runtime.py; re-exported here too.
from finetune_operator.api.runtime import EnvFromSource as EnvFromSource
from finetune_operator.api.runtime import EnvVar as EnvVar
from finetune_operator.api.runtime import LocalObjectReference as LocalObjectReference
from finetune_operator.api.runtime import Name as Name
from finetune_operator.api.runtime import RuntimeSpec as RuntimeSpec
from finetune_operator.api.scheduling import LabelKey, LabelValue, Toleration
from finetune_operator.api.tracking import TrackingSpec

# The model, dataset, strategy and hyperparameters sections live in training.py; re-exported here too.
from finetune_operator.api.training import DatasetSpec as DatasetSpec
from finetune_operator.api.training import EarlyStoppingSpec as EarlyStoppingSpec
from finetune_operator.api.training import FakeDataSpec as FakeDataSpec
from finetune_operator.api.training import HyperparametersSpec as HyperparametersSpec
from finetune_operator.api.training import Method as Method
from finetune_operator.api.training import ModelSpec as ModelSpec
from finetune_operator.api.training import StrategySpec as StrategySpec
from finetune_operator.api.training import UriStr as UriStr
from finetune_operator.api.versions import KIND

INT32_MAX: Final = 2**31 - 1
"""KubeRay's and Kubernetes' int32 fields (activeDeadlineSeconds) overflow above this."""

ShortStr = Annotated[str, Field(max_length=253)]
ExportFormat = Literal["state_dict", "torchscript", "onnx", "safetensors"]


# ----------------------------------------------------------------------------------------- resources
class ResourcesSpec(WireModel):
    """The Ray cluster's training workers."""

    workers: Annotated[int, Field(ge=1, le=1024)] = 1
    """Worker pods (one Ray Train worker per GPU of each, one per pod on CPU)."""

    gpus_per_worker: Annotated[int, Field(ge=0, le=16)] = 0
    """Accelerators per worker pod, each trained by its own data-parallel process; 0 trains on CPU."""

    cpus_per_worker: Annotated[float, Field(gt=0, le=512)] = 2
    """CPU cores per worker."""

    memory_per_worker: Annotated[str, Field(max_length=32, pattern=QUANTITY)] = "4Gi"
    """Memory per worker as a Kubernetes quantity (e.g. 16Gi)."""

    accelerator: Annotated[str, Field(max_length=317, pattern=EXTENDED_RESOURCE)] = "nvidia.com/gpu"
    """Extended resource name of the accelerator requested with `gpusPerWorker`: a device plugin's domain-qualified name such
    as `nvidia.com/gpu` or `amd.com/gpu` (never cpu, memory or another standard resource)."""

    node_selector: Annotated[dict[LabelKey, LabelValue], Field(max_length=64)] = Field(default_factory=dict)
    """Node labels the worker pods must match (Kubernetes label keys and values), e.g.
    {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}."""

    @field_validator("accelerator")
    @classmethod
    def _extended(cls, value: str) -> str:
        return check_extended_resource(value)

    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=list)
    """Taints the worker pods tolerate (GPU nodes are usually tainted)."""

    data_workers: DataWorkersSpec | None = None
    """CPU-only pods that decode and augment images for the training workers (docs/platform.md); none when absent."""

    @property
    def train_workers(self) -> int:
        """Ray Train workers, i.e. data-parallel processes: one per GPU of every pod (a process drives one GPU best),
        one per pod on CPU. The global batch is split across these."""
        return self.workers * max(1, self.gpus_per_worker)


# -------------------------------------------------------------------------------------------- output
class OutputSpec(WireModel):
    """Where checkpoints and artifacts go."""

    uri: UriStr
    """Artifact root: s3://, gs://, file://, pvc://CLAIM/PATH or a path; the job writes under `<uri>/<job name>/`. It must be
    reachable from every Ray node (object store or shared volume)."""

    exports: Annotated[list[ExportFormat], Field(min_length=1, max_length=4)] = Field(
        default_factory=lambda: list[ExportFormat](["state_dict"])
    )
    """Model formats to export: `state_dict` (model.pt), `torchscript` (model.torchscript.pt), `onnx` (model.onnx),
    `safetensors` (model.safetensors: the same tensors as model.pt, its metadata naming the architecture and classes)."""

    keep_checkpoints: Annotated[int, Field(ge=1, le=100)] = 2
    """Checkpoints kept (the best by validation accuracy and the latest always survive)."""

    encryption: EncryptionSpec | None = None
    """Encryption at rest of the model files and checkpoints: client-side (any store) and/or the object store's KMS."""

    sign: bool = False
    """Sign the model card (which lists every file's sha256) with the Ed25519 key in `FINETUNE_SIGNING_KEY` (from a Secret in
    `runtime.envFrom`); unsigned cards say so."""

    @model_validator(mode="after")
    def _server_side_store(self, info: ValidationInfo) -> OutputSpec:
        sse = self.encryption.server_side if self.encryption is not None else None
        if sse is not None and not fields_only(info) and uri_scheme(self.uri) not in ("s3", "gs"):
            fail(
                "encryption.serverSide",
                f"{quote(sse.to_wire())} needs an object store, but uri {quote(self.uri)} is not one; "
                "use an s3:// or gs:// uri, or encryption.clientSide",
            )
        return self

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_uri(value)

    @field_validator("exports")
    @classmethod
    def _unique(cls, value: list[ExportFormat]) -> list[ExportFormat]:
        if len(set(value)) != len(value):
            fail(None, f"{quote(value)} repeats a format; list each once")
        return value


# ---------------------------------------------------------------------------------------- run policy
class RunPolicySpec(WireModel):
    """Retries, deadlines, clean-up and suspension."""

    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 0
    """Times the whole RayJob is retried after a failure (each retry resumes from the last checkpoint)."""

    max_worker_failures: Annotated[int, Field(ge=0, le=1000)] = 0
    """Worker failures Ray Train absorbs within one run by restarting from the last checkpoint."""

    active_deadline_seconds: Annotated[int | None, Field(ge=1, le=INT32_MAX)] = None
    """Wall-clock limit of the job in seconds, after which it fails (KubeRay's int32: at most 2147483647)."""

    ttl_seconds_after_finished: Annotated[int | None, Field(ge=0, le=31_536_000)] = None
    """Seconds KubeRay keeps the finished job's Ray cluster before deleting it (the FineTuneJob and artifacts stay); absent:
    the platform's default (the operator's FINETUNE_OPERATOR_DEFAULT_TTL_SECONDS, 3600 unless changed)."""

    suspend: bool = False
    """Suspend the job (Ray cluster deleted); set back to false to resume from the last checkpoint. The only field that may change
    after creation."""


class EvaluationSpec(WireModel):
    """Quality gates checked when training ends, so that a pipeline never promotes a bad model."""

    min_accuracy: Annotated[float | None, Field(gt=0, le=1)] = None
    """Lowest best validation top-1 accuracy (0-1) that passes: below it the job ends Failed with reason BelowAccuracyGate,
    its artifacts kept for inspection. Unset: no gate."""


# ---------------------------------------------------------------------------------------------- spec
class FineTuneJobSpec(WireModel):
    """The desired fine-tuning run."""

    model: ModelSpec
    """Backbone and starting weights."""

    dataset: DatasetSpec
    """Training and validation images."""

    output: OutputSpec
    """Where checkpoints and artifacts are written."""

    strategy: StrategySpec = Field(default_factory=StrategySpec)
    """What trains, and in which stages."""

    hyperparameters: HyperparametersSpec = Field(default_factory=HyperparametersSpec)
    """Optimisation settings."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Training workers and their pods."""

    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    """Image, environment and scheduling."""

    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec)
    """Retries, deadlines, clean-up and suspension."""

    # Left out of the wire form while no gate is set: jobs, trainer configs and RayJobs rendered before the gate stay identical.
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, exclude_if=lambda e: e.min_accuracy is None)
    """Gates the trained model must pass for the job to succeed."""

    tracking: TrackingSpec = Field(default_factory=TrackingSpec, exclude_if=lambda t: t.is_default())
    """Experiment tracking: TensorBoard event files in the run directory (on by default), an optional MLflow server."""

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: ModelWrapValidatorHandler[FineTuneJobSpec]) -> FineTuneJobSpec:
        """Field errors and every cross-section problem together: when a section is wrong, the rules between the
        sections that are right still run, so that one pass shows every mistake."""
        try:
            spec = handler(data)
        except ValidationError as exc:
            sections = parse_sections(data)
            cross_section_problems(sections).raise_any(data, also=exc)
            raise
        cross_section_problems(spec.sections()).raise_any(spec)
        return spec

    def sections(self) -> dict[str, WireModel]:
        """The spec's sections by wire name (what ``parse_sections`` returns when all of them parse)."""
        return {(field.alias or name): getattr(self, name) for name, field in type(self).model_fields.items()}

    def probe_epochs(self) -> int:
        """Epochs of the frozen-backbone stage (all of them for linear probe, none for full/partial)."""
        method, epochs = self.strategy.method, self.hyperparameters.epochs
        if method == "linear-probe":
            return epochs
        if method == "lp-ft":
            return self.strategy.probe_epochs or max(1, epochs // 3)
        return 0


def parse_sections(data: Any) -> dict[str, WireModel]:
    """The sections of a raw spec that are valid on their own, by wire name; an absent optional section is its default.

    What the spec-level rules (``cross_section_problems``) and the operator's policy can still judge when the spec as a
    whole is invalid.
    """
    if isinstance(data, FineTuneJobSpec):
        return data.sections()
    if not isinstance(data, dict):
        return {}
    parsed: dict[str, WireModel] = {}
    for name, field in FineTuneJobSpec.model_fields.items():
        wire, section = field.alias or name, _section_type(field.annotation)
        raw = data.get(wire)
        if isinstance(raw, section):
            parsed[wire] = raw
            continue
        if raw is None and field.is_required():
            continue
        try:
            # Fields only: a section whose own cross-field rules fail still has values the rules between sections can judge.
            parsed[wire] = section() if raw is None else section.model_validate(raw, context={FIELDS_ONLY: True})
        except ValidationError:
            continue
    return parsed


def _section_type(annotation: Any) -> type[WireModel]:
    assert isinstance(annotation, type) and issubclass(annotation, WireModel), annotation
    return annotation


def cross_section_problems(sections: dict[str, WireModel]) -> Problems:
    """Every rule between spec sections whose sections parsed (each rule needs its two sections, nothing more)."""
    problems = Problems()
    model, dataset, strategy = sections.get("model"), sections.get("dataset"), sections.get("strategy")
    hp, resources = sections.get("hyperparameters"), sections.get("resources")
    if (
        isinstance(hp, HyperparametersSpec)
        and isinstance(resources, ResourcesSpec)
        and hp.batch_size is not None
        and hp.batch_size % resources.train_workers
    ):
        workers = resources.train_workers
        split = "resources.workers" if workers == resources.workers else "resources.workers × gpusPerWorker"
        problems.add(
            "hyperparameters.batchSize",
            f"{hp.batch_size} is not divisible by {split} ({workers}); "
            f"use a multiple of {workers}, e.g. {max(workers, hp.batch_size - hp.batch_size % workers)}",
        )
    if isinstance(hp, HyperparametersSpec) and isinstance(strategy, StrategySpec):
        _method_problems(strategy, hp, problems)
    if (
        isinstance(strategy, StrategySpec)
        and isinstance(resources, ResourcesSpec)
        and strategy.sync_batch_norm
        and resources.gpus_per_worker == 0
    ):
        # torch's SyncBatchNorm runs on accelerators only; on CPU it would fail at the first batch.
        problems.add(
            "strategy.syncBatchNorm",
            "true needs GPUs (resources.gpusPerWorker ≥ 1): SyncBatchNorm does not run on CPU; remove it or add GPUs",
        )
    gpu_decode = isinstance(dataset, DatasetSpec) and dataset.jpeg_decode == "gpu"
    if gpu_decode and isinstance(resources, ResourcesSpec) and resources.gpus_per_worker == 0:
        problems.add("dataset.jpegDecode", "'gpu' needs GPUs (resources.gpusPerWorker ≥ 1); use jpegDecode: cpu or add GPUs")
    if isinstance(model, ModelSpec) and isinstance(dataset, DatasetSpec):
        _input_problems(model, dataset, problems)
    return problems


def _method_problems(strategy: StrategySpec, hp: HyperparametersSpec, problems: Problems) -> None:
    if strategy.method == "lp-ft" and hp.epochs < 2:
        problems.add("hyperparameters.epochs", f"{hp.epochs}: method 'lp-ft' needs at least 2 epochs (probe, then fine-tune)")
    if strategy.method == "lp-ft" and strategy.probe_epochs is not None and strategy.probe_epochs >= hp.epochs >= 2:
        problems.add("strategy.probeEpochs", f"{strategy.probe_epochs} must be less than hyperparameters.epochs ({hp.epochs})")
    if strategy.method == "linear-probe":
        for field, value in (
            ("backboneLearningRate", hp.backbone_learning_rate),
            ("backboneLrMultiplier", hp.backbone_lr_multiplier),
        ):
            if value:
                problems.add(
                    f"hyperparameters.{field}",
                    f"{value}: has no effect with method 'linear-probe' (the backbone is frozen); remove it",
                )


def _input_problems(model: ModelSpec, dataset: DatasetSpec, problems: Problems) -> None:
    """The image size the model is built for, and the classes the dataset brings."""
    info = catalog.load_catalog().get(model.name)
    weights = info.resolve_weights(model.weights) if info is not None and model.weights else None
    if info is not None and (weights is not None or model.weights is None):  # unknown weights: ModelSpec says so
        # The size follows the weights chosen: torchvision builds vit_b_16 for 384 with IMAGENET1K_SWAG_E2E_V1.
        built = f"{model.name} with {weights.name}" if weights else f"{model.name} without torchvision weights"
        size, fixed = dataset.image_size, info.fixed_size(weights)
        min_h, min_w = info.min_size(weights)
        if fixed is not None and size != fixed:
            problems.add("dataset.imageSize", f"{size}: {built} takes {fixed}×{fixed} images only; set imageSize: {fixed}")
        elif size < min_h or size < min_w:
            problems.add(
                "dataset.imageSize",
                f"{size} is below the minimum input of {built} ({min_h}×{min_w}); use at least {max(min_h, min_w)}",
            )
    if model.num_classes is None:
        return
    if dataset.format == "digits":
        n = len(dataset.classes) if dataset.classes else 10
        if model.num_classes != n:
            problems.add(
                "model.numClasses", f"{model.num_classes} does not match the {n} digit classes selected; remove it or set {n}"
            )
    if dataset.format == "fake":
        fake = dataset.fake or FakeDataSpec()
        if model.num_classes != fake.classes:
            problems.add("model.numClasses", f"{model.num_classes} does not match dataset.fake.classes ({fake.classes})")


# -------------------------------------------------------------------------------------------- object
class ObjectMeta(WireModel):
    """The subset of Kubernetes ObjectMeta the API reads; other metadata is kept as is."""

    model_config = ConfigDict(**{**WireModel.model_config, "extra": "allow"})

    name: Name
    """Name of the job, unique in its namespace."""

    namespace: Annotated[str | None, Field(max_length=63, pattern=DNS1123_LABEL)] = None
    """Namespace of the job."""

    uid: str | None = None
    generation: int | None = None
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    annotations: dict[LabelKey, str] = Field(default_factory=dict)


class FineTuneJob(WireModel):
    """Fine-tune a pretrained torchvision model on your images, data-parallel on a KubeRay cluster."""

    api_version: Literal["finetune.dev/v1alpha1"] = "finetune.dev/v1alpha1"
    """finetune.dev/v1alpha1."""

    kind: Literal["FineTuneJob"] = KIND
    """FineTuneJob."""

    metadata: ObjectMeta
    """Standard object metadata."""

    spec: FineTuneJobSpec
    """The desired fine-tuning run."""

    status: FineTuneJobStatus | None = None
    """Observed state, written by the operator and the trainer."""

    @classmethod
    def parse(cls, document: Any) -> FineTuneJob:
        """Validate a manifest (a dict from YAML/JSON or the API server)."""
        return cls.model_validate(document)
