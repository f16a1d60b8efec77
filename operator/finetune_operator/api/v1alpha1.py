"""The FineTuneJob API, version v1alpha1: spec, status and the object itself, as pydantic v2 models.

These models are the single source of truth: the CRD schema is generated from them (``crd.py``),
``finetune validate`` and the operator validate with them, ``finetune explain`` reads their
docstrings, and the trainer takes its configuration from them. Field docstrings are user-facing.
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
    C_IDENTIFIER,
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    ENV_NAME,
    EXTENDED_RESOURCE,
    FIELDS_ONLY,
    IMAGE_REFERENCE,
    QUANTITY,
    RAY_VERSION,
    Problems,
    check_extended_resource,
    check_uri,
    fail,
    fields_only,
    looks_like_secret,
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
from finetune_operator.api.pods import PodOverrides
from finetune_operator.api.protection import EncryptionSpec
from finetune_operator.api.scheduling import LabelKey, LabelValue, Toleration
from finetune_operator.api.tracking import TrackingSpec
from finetune_operator.api.versions import KIND

INT32_MAX: Final = 2**31 - 1
"""KubeRay's and Kubernetes' int32 fields (activeDeadlineSeconds) overflow above this."""

ShortStr = Annotated[str, Field(max_length=253)]
UriStr = Annotated[str, Field(min_length=1, max_length=2048)]
Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
Method = Literal["linear-probe", "partial", "full", "lp-ft"]
ExportFormat = Literal["state_dict", "torchscript", "onnx", "safetensors"]


# --------------------------------------------------------------------------------------------- model
class ModelSpec(WireModel):
    """Which torchvision classification model to fine-tune, and where its starting weights come from."""

    name: Annotated[str, Field(min_length=1, max_length=64, examples=["resnet50", "vit_b_16"])]
    """torchvision classification model name, as `torchvision.models.list_models()` spells it (`finetune models` lists them)."""

    weights: Annotated[str | None, Field(max_length=128)] = None
    """torchvision weights of that model: `DEFAULT`, `IMAGENET1K_V2` or `ResNet50_Weights.IMAGENET1K_V2`; null trains from random
    initialisation unless `weightsUri` is set."""

    weights_uri: UriStr | None = None
    """A state_dict or trainer checkpoint to start from (s3://, gs://, file://, pvc:// or a path): offline clusters, or chaining
    from an earlier job's `model.pt`. Excludes `weights`."""

    num_classes: Annotated[int | None, Field(ge=2, le=100_000)] = None
    """Number of output classes of the new head; inferred from the dataset when absent."""

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        names = catalog.model_names()
        if value in names:
            return value
        hint = catalog.suggest(value, names)
        did_you_mean = f"did you mean {' or '.join(repr(h) for h in hint)}? " if hint else ""
        fail(
            None,
            f"{quote(value)} is not a torchvision classification model; {did_you_mean}"
            f"`finetune models` lists all {len(names)} (e.g. resnet18, resnet50, efficientnet_b0, vit_b_16, convnext_tiny)",
        )

    @field_validator("weights_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return None if value is None else check_uri(value)

    @model_validator(mode="after")
    def _weights_of_model(self, info: ValidationInfo) -> ModelSpec:
        if fields_only(info):
            return self
        problems = Problems()
        if self.weights is not None and self.weights_uri is not None:
            problems.add("weightsUri", "set either `weights` (torchvision) or `weightsUri` (a file of yours), not both")
        entry = catalog.load_catalog().get(self.name)
        if entry is not None and self.weights is not None and entry.resolve_weights(self.weights) is None:
            problems.add(
                "weights",
                f"{quote(self.weights)}: torchvision ships no weights for {self.name}; use weights: null or weightsUri"
                if not entry.weights
                else f"{quote(self.weights)} is not a weight of {self.name}; accepted: {', '.join(entry.weight_choices())}",
            )
        problems.raise_any(self)
        return self


# ------------------------------------------------------------------------------------------- dataset
class FakeDataSpec(WireModel):
    """Random images from torchvision `FakeData`, for tests and throughput benchmarks."""

    samples: Annotated[int, Field(ge=2, le=10_000_000)] = 1024
    """Number of training images; validation gets a quarter as many."""

    classes: Annotated[int, Field(ge=2, le=100_000)] = 10
    """Number of classes."""


class DatasetSpec(WireModel):
    """Where the images come from and how they are prepared."""

    format: Literal["imagefolder", "digits", "fake"] = "imagefolder"
    """`imagefolder`: one folder per class (torchvision ImageFolder). `digits`: scikit-learn's bundled 8×8 handwritten digits,
    upsampled (works offline). `fake`: torchvision FakeData."""

    train_uri: UriStr | None = None
    """Training images for `imagefolder`: s3://, gs://, file://, pvc://CLAIM/PATH or a path; object stores are downloaded once per
    node into `cacheDir`."""

    validation_uri: UriStr | None = None
    """Validation images (same layout and classes as `trainUri`). Excludes `validationSplit`."""

    validation_split: Annotated[float | None, Field(gt=0, lt=1)] = None
    """Fraction of the training images held out (stratified, by `seed`) when there is no `validationUri`; 0.2 when neither is
    given. """

    classes: Annotated[list[Annotated[int, Field(ge=0, le=9)]] | None, Field(min_length=2, max_length=10)] = None
    """`digits` only: the digit classes to use, e.g. [5, 6, 7, 8, 9]; labels are renumbered 0..n-1 in this order."""

    max_per_class: Annotated[int | None, Field(ge=1, le=10_000_000)] = None
    """Cap on training images per class (few-shot transfer); the held-out validation set is not capped."""

    image_size: Annotated[int, Field(ge=16, le=1024)] = 224
    """Side of the square image the model sees, in pixels. Fixed-input models take exactly their weights' size (`finetune models`,
    INPUT), e.g. 384 for vit_b_16 with IMAGENET1K_SWAG_E2E_V1 and 224 without torchvision weights."""

    augmentation: Literal["none", "light", "standard", "trivialaugment"] = "standard"
    """Training augmentation preset. `none`: resize only. `light`: small affine jitter (digits, documents). `standard`: random
    resized crop + horizontal flip. `trivialaugment`: standard + TrivialAugmentWide."""

    loader_workers: Annotated[int, Field(ge=0, le=64)] = 2
    """DataLoader worker processes per training process (one per GPU on GPU workers, one per pod on CPU)."""

    cache_dir: UriStr | None = None
    """Node-local directory where datasets from object stores (s3://, gs://) are downloaded once per node (a path, file:// or
    pvc://CLAIM/PATH); a temporary directory by default. Cached backbone features (`strategy.cacheFeatures`) are kept in
    memory, not here."""

    fake: FakeDataSpec | None = None
    """Options of the `fake` format."""

    # Defaults left out of the wire form: jobs, trainer configs and RayJobs rendered before these fields stay identical.
    ingest: Literal["auto", "streaming", "mapStyle"] = Field(default="auto", exclude_if=lambda v: v == "auto")
    """How `imagefolder` images reach the workers. `streaming`: the files are listed (not copied) and read, decoded and augmented
    by Ray Data while training runs, on any node of the Ray cluster. `mapStyle`: a copy of the dataset on every node read by
    DataLoader processes. `auto`: `streaming` for an object store (s3://, gs://) or a folder of more than 20,000 files, else
    `mapStyle` (always `mapStyle` for `digits` and `fake`)."""

    jpeg_decode: Literal["cpu", "gpu"] = Field(default="cpu", exclude_if=lambda v: v == "cpu")
    """Where streamed JPEGs are decoded: `cpu` (Ray Data tasks, with the augmentation) or `gpu` (the training worker decodes each
    batch on its GPU with nvJPEG, then resizes and augments there). `gpu` needs `ingest: streaming` and `gpusPerWorker` ≥ 1."""

    @field_validator("train_uri", "validation_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return None if value is None else check_uri(value)

    @field_validator("cache_dir")
    @classmethod
    def _directory(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if uri_scheme(check_uri(value)) in ("s3", "gs"):
            fail(None, f"{quote(value)}: the cache is a directory on the node; give a path, file:///PATH or pvc://CLAIM/PATH")
        return value

    @field_validator("classes")
    @classmethod
    def _unique(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            fail(None, f"{quote(value)} repeats a class; list each digit once")
        return value

    @model_validator(mode="after")
    def _by_format(self, info: ValidationInfo) -> DatasetSpec:
        if fields_only(info):
            return self
        problems = Problems()
        if self.format == "imagefolder" and self.train_uri is None:
            problems.add("trainUri", "is required for format 'imagefolder': the folder holding one sub-folder per class")
        if self.format != "imagefolder":
            for field, value in (("trainUri", self.train_uri), ("validationUri", self.validation_uri)):
                if value is not None:
                    problems.add(
                        field,
                        f"{quote(value)}: format {self.format!r} brings its own images; "
                        f"remove {field} or use format 'imagefolder'",
                    )
        if self.classes is not None and self.format != "digits":
            problems.add("classes", f"{quote(self.classes)}: applies to format 'digits' only, not {self.format!r}")
        if self.fake is not None and self.format != "fake":
            problems.add("fake", f"applies to format 'fake' only, not {self.format!r}")
        if self.validation_uri is not None and self.validation_split is not None:
            problems.add("validationSplit", f"{self.validation_split}: set either `validationUri` or `validationSplit`, not both")
        if self.ingest == "streaming" and self.format != "imagefolder":
            problems.add(
                "ingest", f"'streaming': applies to format 'imagefolder' only, not {self.format!r}; use 'auto' or 'mapStyle'"
            )
        if self.jpeg_decode == "gpu" and self.ingest != "streaming":
            problems.add(
                "jpegDecode", f"'gpu': needs ingest 'streaming', not {self.ingest!r}; set ingest: streaming or jpegDecode: cpu"
            )
        problems.raise_any(self)
        return self


# ------------------------------------------------------------------------------------------ strategy
class StrategySpec(WireModel):
    """What is trained: the head alone, the last blocks, everything, or the head first and then everything."""

    method: Method = "full"
    """`linear-probe`: frozen backbone, new head only. `partial`: head + the last `unfreezeBlocks` blocks. `full`: every
    parameter (the default: it won the measurements in bench/README.md). `lp-ft`: `probeEpochs` of linear probe, then full
    fine-tuning with the backbone at a lower rate (Kumar et al., 2022)."""

    unfreeze_blocks: Annotated[int | None, Field(ge=1, le=1000)] = None
    """`partial` only: how many of the backbone's last blocks train besides the head."""

    probe_epochs: Annotated[int | None, Field(ge=1, le=10_000)] = None
    """`lp-ft` only: epochs of the linear-probe stage (default: a third of `epochs`, at least 1)."""

    cache_features: bool = True
    """Train a frozen-backbone stage on backbone features computed once (much faster); used only when the training augmentation is
    `none`."""

    freeze_batch_norm: bool = True
    """Keep frozen layers' BatchNorm statistics fixed (eval mode) while the rest trains."""

    precise_batch_norm: bool = True
    """Before each evaluation and the export, recompute the running statistics of the BatchNorm layers that train over up to 50
    training batches (precise BN). Costs at most a third of an epoch of forward passes, and prevents models whose running
    statistics lag their weights (small BatchNorm momentum, few steps) from evaluating at chance. No effect without BatchNorm."""

    sync_batch_norm: bool = False
    """With several workers, BatchNorm layers that train compute their batch statistics over the global batch
    (SyncBatchNorm) rather than each worker's share: for per-worker batches too small for stable statistics."""

    @model_validator(mode="after")
    def _knobs(self, info: ValidationInfo) -> StrategySpec:
        if fields_only(info):
            return self
        problems = Problems()
        if self.method == "partial" and self.unfreeze_blocks is None:
            problems.add("unfreezeBlocks", "is required for method 'partial': how many last blocks of the backbone to train")
        if self.method != "partial" and self.unfreeze_blocks is not None:
            problems.add("unfreezeBlocks", f"{self.unfreeze_blocks}: applies to method 'partial' only, not {self.method!r}")
        if self.method != "lp-ft" and self.probe_epochs is not None:
            problems.add("probeEpochs", f"{self.probe_epochs}: applies to method 'lp-ft' only, not {self.method!r}")
        problems.raise_any(self)
        return self


# ----------------------------------------------------------------------------------- hyperparameters
class EarlyStoppingSpec(WireModel):
    """Stop a stage when its validation accuracy has not improved for `patience` epochs; with lp-ft a probe stage that stops is
    still followed by fine-tuning, with a fresh patience."""

    patience: Annotated[int, Field(ge=1, le=10_000)] = 3
    """Epochs without improvement before stopping."""

    min_delta: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Smallest rise in validation accuracy that counts as an improvement."""


class HyperparametersSpec(WireModel):
    """Optimisation settings."""

    epochs: Annotated[int, Field(ge=1, le=10_000)] = 10
    """Total epochs, probe stage included."""

    batch_size: Annotated[int | None, Field(ge=1, le=65_536)] = None
    """Global batch size, split evenly across `resources.workers` (must be divisible by it). Default: chosen from the training
    set and logged: up to 64, smaller for small sets, and for very small ones several passes over the images per epoch so that the
    job gets at least 200 optimiser steps. A value set here is used as it is, one pass per epoch."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimizer."""

    learning_rate: Annotated[float, Field(gt=0, le=10)] = 1e-3
    """Learning rate of the new head (and of the whole model when nothing is frozen and no backbone rate is set). In the
    fine-tune stage of `lp-ft` the probed head trains at the backbone's rate: at this rate it would unlearn what the probe
    taught it while the backbone starts to move."""

    backbone_learning_rate: Annotated[float | None, Field(gt=0, le=10)] = None
    """Absolute learning rate of unfrozen backbone parameters. Excludes `backboneLrMultiplier`."""

    backbone_lr_multiplier: Annotated[float | None, Field(gt=0, le=1)] = None
    """Backbone rate as a fraction of `learningRate` (default 0.1 for `partial` and `lp-ft`, 1 for `full`)."""

    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """SGD momentum (Nesterov); ignored by AdamW."""

    weight_decay: Annotated[float, Field(ge=0, le=1)] = 1e-4
    """Weight decay (not applied to biases and normalisation parameters)."""

    scheduler: Literal["cosine", "step", "none"] = "cosine"
    """Learning-rate schedule after warm-up."""

    warmup_epochs: Annotated[int | None, Field(ge=0, le=10_000)] = None
    """Epochs of linear warm-up from 1% of the rate (per stage for `lp-ft`). Default: a share of the steps of each stage
    that trains the backbone (a tenth for `full` and `partial`, a fifth for the fine-tune stage of `lp-ft`, so that the
    unfrozen backbone does not wreck the probed head); none for a frozen backbone."""

    step_size: Annotated[int | None, Field(ge=1, le=10_000)] = None
    """`step` scheduler: epochs between decays (default: a third of the epochs)."""

    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    """`step` scheduler: decay factor."""

    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Label smoothing of the cross-entropy loss."""

    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    """Automatic mixed precision on GPU: `auto` is bf16 on a GPU that supports it (Ampere and newer), else fp32; `no` is
    fp32 always. Ignored on CPU."""

    compile: bool = False
    """Train the model through `torch.compile` (slower start, faster steps; saved weights are the plain model's)."""

    grad_clip_norm: Annotated[float | None, Field(gt=0, le=1e6)] = None
    """Clip the global gradient norm to this value."""

    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    """Seed for initialisation, splits, shuffling and augmentation."""

    early_stopping: EarlyStoppingSpec | None = None
    """Stop early when validation accuracy stalls."""

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> HyperparametersSpec:
        if fields_only(info):
            return self
        problems = Problems()
        if self.backbone_learning_rate is not None and self.backbone_lr_multiplier is not None:
            problems.add(
                "backboneLrMultiplier",
                f"{self.backbone_lr_multiplier}: set either `backboneLearningRate` or `backboneLrMultiplier`, not both",
            )
        if self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            problems.add("warmupEpochs", f"{self.warmup_epochs} must be less than epochs ({self.epochs})")
        if self.step_size is not None and self.scheduler != "step":
            problems.add("stepSize", f"{self.step_size}: applies to scheduler 'step' only, not {self.scheduler!r}")
        problems.raise_any(self)
        return self


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
    """Service account of the Ray pods; the operator's default when absent. The trainer reports progress with it."""

    queue_name: Annotated[str | None, Field(max_length=63, pattern=DNS1123_LABEL)] = None
    """Kueue LocalQueue: sets the `kueue.x-k8s.io/queue-name` label on the RayJob."""

    priority_class_name: Annotated[str | None, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)] = None
    """PriorityClass of the Ray pods; the operator's default (FINETUNE_OPERATOR_DEFAULT_PRIORITY_CLASS_NAME) when absent."""

    # Left out of the wire form while empty: jobs, trainer configs and RayJobs rendered before it stay identical.
    pod: PodOverrides = Field(default_factory=PodOverrides, exclude_if=lambda p: p == PodOverrides())
    """Image pull secrets, labels, annotations, volumes, affinity, scheduling and a stricter securityContext for every Ray
    pod (head, workers, KubeRay's submitter), merged with the platform's defaults (docs/platform.md, "Pod overrides")."""

    @field_validator("env")
    @classmethod
    def _unique_env(cls, value: list[EnvVar]) -> list[EnvVar]:
        seen: set[str] = set()
        for var in value:
            if var.name in seen:
                fail(None, f"{quote(var.name)} is set twice; set each variable once")
            seen.add(var.name)
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
