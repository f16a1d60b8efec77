"""The FineTuneJob's status (v1alpha1): phase, conditions, and what the trainer reports (progress, metrics,
artifacts, warnings), as pydantic v2 models; ``v1alpha1`` re-exports them beside the spec. Field docstrings are
user-facing (the CRD schema and ``finetune explain`` read them)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Final, Literal

from pydantic import Field

from finetune_operator.api.base import WireModel
from finetune_operator.api.protection import ArtifactProtection

Stage = Literal["starting", "caching-features", "probe", "fine-tune", "evaluate", "export", "done"]
WarningLine = Annotated[str, Field(max_length=1024)]  # MAX_WARNING_LENGTH


class Phase(str, Enum):
    # No docstring on purpose: pydantic would copy it into the CRD schema as the field's description.
    # A str Enum, so that a phase compares equal to the plain string a status dict holds ("Running").
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


TERMINAL_PHASES: Final = frozenset({Phase.SUCCEEDED.value, Phase.FAILED.value})
"""Phases a job never leaves."""

MAX_WARNINGS: Final = 16
"""``status.warnings`` keeps the newest this many: a status must stay small whatever happens to a run."""
MAX_WARNING_LENGTH: Final = 1024


def newest_warnings(warnings: list[str]) -> list[str]:
    """What ``status.warnings`` holds of ``warnings``: the newest ``MAX_WARNINGS``, each cut to fit."""
    cut = MAX_WARNING_LENGTH - 1
    return [w if len(w) <= MAX_WARNING_LENGTH else w[:cut] + "…" for w in warnings[-MAX_WARNINGS:]]


# -------------------------------------------------------------------------------------------- status
class Condition(WireModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: Annotated[str, Field(max_length=316)]
    """Validated, ClusterReady, Training, Succeeded, Failed or Suspended."""

    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""

    reason: Annotated[str, Field(max_length=1024)] = ""
    """CamelCase reason for the last transition."""

    message: Annotated[str, Field(max_length=32_768)] = ""
    """Human-readable details."""

    last_transition_time: str | None = None
    """When the status last changed (RFC 3339)."""

    observed_generation: Annotated[int | None, Field(ge=0)] = None
    """The spec generation the condition was set from."""


class Progress(WireModel):
    """Where training is, written by the trainer's rank-0 worker."""

    epoch: Annotated[int, Field(ge=0)] = 0
    """Epochs completed."""

    total_epochs: Annotated[int, Field(ge=0)] = 0
    """Epochs planned."""

    percent: Annotated[float, Field(ge=0, le=100)] = 0
    """Completion in percent."""

    stage: Stage = "starting"
    """What the trainer is doing."""

    # In-epoch fields: written every few seconds during an epoch (the status throttle), absent between epochs.
    step: Annotated[int | None, Field(ge=0)] = None
    """Optimizer steps done in the current epoch."""

    steps_per_epoch: Annotated[int | None, Field(ge=0)] = None
    """Optimizer steps in one epoch."""

    loss: float | None = None
    """Mean training loss of the first worker's batches since the last report, in the current epoch."""

    images_per_second: Annotated[float | None, Field(ge=0)] = None
    """Training throughput of the current epoch, all workers together."""

    eta_seconds: Annotated[int | None, Field(ge=0)] = None
    """Estimated seconds until the last epoch ends (at the current epoch's pace)."""

    updated_at: str | None = None
    """When the trainer last reported (RFC 3339)."""


class Metrics(WireModel):
    """Latest and best metrics, written by the trainer."""

    train_loss: float | None = None
    """Training loss of the last epoch (with the job's label smoothing)."""

    val_loss: float | None = None
    """Validation loss of the last epoch: plain cross-entropy, without label smoothing."""

    val_accuracy: float | None = None
    """Top-1 validation accuracy of the last epoch (0–1)."""

    val_top5: float | None = None
    """Top-5 validation accuracy of the last epoch (more than five classes)."""

    best_val_accuracy: float | None = None
    """Best top-1 validation accuracy so far."""

    best_epoch: int | None = None
    """Epoch of the best validation accuracy."""

    images_per_second: float | None = None
    """Training throughput of the last epoch, all workers together."""

    epoch_seconds: float | None = None
    """Wall time of the last epoch."""


class Artifacts(WireModel):
    """What the finished job produced."""

    model_uri: str | None = None
    """The fine-tuned state_dict (`model.pt`)."""

    model_card_uri: str | None = None
    """The model card (`model.json`): architecture, classes, transforms, metrics, checksums."""

    checkpoint_uri: str | None = None
    """The checkpoint of the weights in `model.pt`, the best epoch's (model, optimizer, scheduler, epoch); retention keeps it."""

    sha256: str | None = None
    """SHA-256 of `model.pt`."""

    exports: dict[str, str] = Field(default_factory=dict)
    """Exported format → URI."""

    class_names: list[str] = Field(default_factory=list)
    """Class names in output-index order."""

    protection: ArtifactProtection | None = None
    """Whether the artifacts are encrypted and signed, and with which key ids."""


class FineTuneJobStatus(WireModel):
    """Observed state. The operator owns phase and conditions; the trainer owns progress, metrics and artifacts."""

    phase: Phase | None = None
    """Pending, Provisioning, Running, Succeeded, Failed or Suspended."""

    message: str | None = None
    """Why the job is in its phase, for people."""

    conditions: list[Condition] = Field(default_factory=list)
    """Validated, ClusterReady, Training, Succeeded, Failed, Suspended."""

    observed_generation: int | None = None
    """The spec generation the operator last acted on."""

    start_time: str | None = None
    """When training started (RFC 3339)."""

    completion_time: str | None = None
    """When the job finished (RFC 3339)."""

    progress: Progress | None = None
    """Training progress."""

    metrics: Metrics | None = None
    """Training and validation metrics."""

    artifacts: Artifacts | None = None
    """Model files of the finished job."""

    ray_job_name: str | None = None
    """The KubeRay RayJob running this job."""

    ray_cluster_name: str | None = None
    """The Ray cluster KubeRay created for it."""

    dashboard_url: str | None = Field(default=None, alias="dashboardURL")
    """The Ray dashboard of that cluster."""

    attempts: int | None = None
    """Times the RayJob has been started (1 + retries)."""

    warnings: Annotated[list[WarningLine], Field(max_length=MAX_WARNINGS)] = Field(default_factory=list)
    """Problems the trainer worked around, newest last (e.g. a corrupt checkpoint skipped on resume)."""
