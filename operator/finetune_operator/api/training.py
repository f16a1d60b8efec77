"""What a FineTuneJob trains and how (v1alpha1): the model, dataset, strategy and hyperparameters sections of the
spec, as pydantic v2 models; ``v1alpha1`` re-exports them beside the rest of the spec. Field docstrings are
user-facing (the CRD schema and ``finetune explain`` read them)."""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from finetune_operator.api import catalog
from finetune_operator.api.base import WireModel
from finetune_operator.api.fields import Problems, check_uri, fail, fields_only, quote, uri_scheme

UriStr = Annotated[str, Field(min_length=1, max_length=2048)]
# The largest dataset.imageSize; it also bounds the sizes a model card may ask `finetune predict` for (finetune_trainer.inputs).
MAX_IMAGE_SIZE: Final = 1024
Method = Literal["linear-probe", "partial", "full", "lp-ft"]


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

    image_size: Annotated[int, Field(ge=16, le=MAX_IMAGE_SIZE)] = 224
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
    """Before each evaluation and the export, recompute the running statistics of the BatchNorm layers that train over 512
    training images, all workers together (at most 50 batches per worker and one epoch): precise BN. Costs their forward
    passes, and prevents models whose running statistics lag their weights (small BatchNorm momentum, few steps) from
    evaluating at chance. No effect without BatchNorm."""

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
