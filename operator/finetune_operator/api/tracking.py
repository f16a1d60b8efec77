"""The ``spec.tracking`` section: where a run's metrics go besides ``metrics.jsonl`` (TensorBoard, MLflow).

Its own module so that ``v1alpha1`` only names it. Nothing here changes what is trained, so the section
stays out of the spec fingerprint (``contract._NOT_TRAINING``): a job may gain an MLflow sink on resume.
Credentials never live in the spec: an MLflow URI with a user or password in it is refused, and the
server's token comes through ``runtime.envFrom`` (``MLFLOW_TRACKING_TOKEN`` and friends).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from finetune_operator.api.base import WireModel
from finetune_operator.api.fields import fail, quote, uri_scheme

__all__ = ["MlflowSpec", "TensorBoardSpec", "TrackingSpec"]

MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "databricks")


class TensorBoardSpec(WireModel):
    """TensorBoard event files, written by the first worker into `<run dir>/tensorboard/`."""

    enabled: bool = True
    """Write event files (scalars per step and per epoch, confusion matrix, sample predictions, hyperparameters)."""

    log_every_steps: Annotated[int, Field(ge=1, le=100_000)] = 20
    """Optimizer steps between per-step points (loss, learning rates, images/s); the loss is read from the
    accelerator only then, never every step."""


class MlflowSpec(WireModel):
    """An MLflow tracking server that receives the run's parameters, metrics and final artifacts. An unreachable
    server costs a warning (status.warnings), never the training run."""

    tracking_uri: Annotated[str, Field(min_length=1, max_length=2048)]
    """The server, e.g. https://mlflow.example.com (or file:///PATH). No user or password in it: give credentials
    (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD) through runtime.envFrom."""

    experiment_name: Annotated[str, Field(min_length=1, max_length=500)]
    """The experiment the run is logged under; created when it does not exist."""

    run_name: Annotated[str | None, Field(min_length=1, max_length=250)] = None
    """The MLflow run's name. Default: the FineTuneJob's name. A resumed job continues its MLflow run."""

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        scheme = uri_scheme(value)
        if scheme not in MLFLOW_SCHEMES:
            accepted = ", ".join(f"{s}://" for s in MLFLOW_SCHEMES)
            fail(None, f"{quote(value)} is not an MLflow tracking URI; accepted: {accepted}")
        try:
            parts = urlsplit(value)
        except ValueError:
            fail(None, f"{quote(value)} is not a valid URI; write e.g. https://mlflow.example.com")
        if parts.username is not None or parts.password is not None:
            # The value is not echoed: it holds a password.
            shown = f"{scheme}://…@{parts.hostname or ''}"
            fail(
                None,
                f"{quote(shown)} has credentials in the URI; "
                "remove the user and password and give them through runtime.envFrom (a Secret)",
            )
        if scheme in ("http", "https") and not parts.hostname:
            fail(None, f"{quote(value)} has no host; write {scheme}://HOST[:PORT][/PATH]")
        return value


class TrackingSpec(WireModel):
    """Experiment tracking: TensorBoard event files (on by default) and an optional MLflow server."""

    tensorboard: TensorBoardSpec = Field(default_factory=TensorBoardSpec)
    """TensorBoard event files in the run directory, uploaded with the other artifacts."""

    mlflow: MlflowSpec | None = None
    """An MLflow tracking server (optional)."""

    def is_default(self) -> bool:
        """Whether nothing was set: the wire form then leaves the section out (older configs stay identical)."""
        return self == TrackingSpec()
