"""The ``spec.tracking`` section: where a run's metrics go besides ``metrics.jsonl`` (TensorBoard, MLflow).

Its own module so that ``v1alpha1`` only names it. Nothing here changes what is trained, so the section
stays out of the spec fingerprint (``contract._NOT_TRAINING``): a job may gain an MLflow sink on resume.
Credentials never live in the spec: an MLflow URI with a user or password, a query string or a fragment (where
tokens hide) is refused, and the server's token comes through ``runtime.envFrom`` (``MLFLOW_TRACKING_TOKEN`` and
friends). Messages show a URI only as ``shown_uri`` draws it: scheme://host[:port]/path.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from finetune_operator.api.base import WireModel
from finetune_operator.api.fields import fail, quote, uri_scheme

__all__ = ["MlflowSpec", "TensorBoardSpec", "TrackingSpec", "shown_uri"]

MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "databricks")


def shown_uri(uri: str) -> str:
    """``uri`` without what may hold a secret: no user or password, no query string, no fragment."""
    head = uri.split("#", 1)[0].split("?", 1)[0]
    scheme, sep, rest = head.partition("://")
    if not sep:
        return head
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


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
    """The server, e.g. https://mlflow.example.com (or file:///PATH). No user or password, query string or fragment
    in it: give credentials (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD) through runtime.envFrom."""

    experiment_name: Annotated[str, Field(min_length=1, max_length=500)]
    """The experiment the run is logged under; created when it does not exist."""

    run_name: Annotated[str | None, Field(min_length=1, max_length=250)] = None
    """The MLflow run's name. Default: the FineTuneJob's name. A resumed job continues its MLflow run."""

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        # Never echoed whole: a user, password, query or fragment may hold a secret.
        shown = quote(shown_uri(value))
        scheme = uri_scheme(value)
        if scheme not in MLFLOW_SCHEMES:
            accepted = ", ".join(f"{s}://" for s in MLFLOW_SCHEMES)
            fail(None, f"{shown} is not an MLflow tracking URI; accepted: {accepted}")
        try:
            parts = urlsplit(value)
        except ValueError:
            fail(None, f"{shown} is not a valid URI; write e.g. https://mlflow.example.com")
        if parts.username is not None or parts.password is not None:
            host = parts.hostname or ""
            fail(
                None,
                f"{quote(f'{scheme}://…@{host}')} has credentials in the URI; "
                "remove the user and password and give them through runtime.envFrom (a Secret)",
            )
        if "?" in value or "#" in value:
            fail(
                None,
                f"{shown} has a query string or fragment (…?… or …#…), where tokens hide; accepted: "
                "scheme://HOST[:PORT][/PATH], with credentials through runtime.envFrom (a Secret)",
            )
        if scheme in ("http", "https") and not parts.hostname:
            fail(None, f"{shown} has no host; write {scheme}://HOST[:PORT][/PATH]")
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
