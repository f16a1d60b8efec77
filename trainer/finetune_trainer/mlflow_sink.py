"""The optional MLflow sink of ``spec.tracking.mlflow``: parameters, per-epoch metrics, the final artifacts.

Talks to the server through ``MlflowClient`` (no fluent API: no process-global active run). Never fatal:
the first failure is reported once through ``on_failure`` (the loop turns it into a status warning) and
the sink goes quiet for the rest of the run, so a dead server costs one bounded wait, not one per epoch.
Waits are bounded by MLflow's own HTTP settings, set here unless the job's environment sets them:
``MLFLOW_HTTP_REQUEST_TIMEOUT`` and ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (MLflow's defaults, 120 s and
7 retries with back-off, would stall a job for many minutes). Artifact uploads are the exception: a model
of hundreds of MB takes longer than a metrics call, so they run under ``ARTIFACT_TIMEOUT_ENV`` (600 s unless
set; the job's own ``MLFLOW_HTTP_REQUEST_TIMEOUT`` wins), and a failed upload is a warning naming the file that
leaves the other uploads and the run's end to go on. A resumed job continues the MLflow run whose id
``tracking`` kept in the run directory. The server is named only as scheme://host[:port]/path (``shown_uri``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from finetune_operator.api.tracking import MlflowSpec, shown_uri
from finetune_trainer.errors import exception_line

__all__ = ["ARTIFACT_TIMEOUT_ENV", "HTTP_DEFAULTS", "MlflowSink"]

log = logging.getLogger(__name__)

HTTP_DEFAULTS: Final = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
ARTIFACT_TIMEOUT_ENV: Final = "FINETUNE_MLFLOW_ARTIFACT_TIMEOUT"
_ARTIFACT_TIMEOUT_DEFAULT: Final = "600"
_MAX_PARAM = 6000  # MLflow refuses longer parameter values


class MlflowSink:
    """One MLflow run for one job; every method is a no-op once a call has failed (see the module docstring)."""

    def __init__(self, spec: MlflowSpec, job_name: str, on_failure: Callable[[str], None]) -> None:
        self.spec = spec
        self.run_name = spec.run_name or job_name
        self.run_id: str | None = None
        self._on_failure = on_failure
        self._client: Any = None
        self.failed = False
        # Whether MLFLOW_HTTP_REQUEST_TIMEOUT is ours (HTTP_DEFAULTS) and may be raised for artifact uploads.
        self._own_timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") in (None, HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"])

    def _fail(self, what: str, exc: BaseException) -> None:
        self.failed = True
        message = (
            f"MLflow at {shown_uri(self.spec.tracking_uri)} failed ({what}: {exception_line(exc)}); "
            "training goes on without MLflow tracking"
        )
        log.warning("%s", message)
        self._on_failure(message)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.failed:
            return None
        try:
            return fn()
        except Exception as exc:  # the server's errors, network errors, a refused file store: all the same to training
            self._fail(what, exc)
            return None

    def start(self, run_id: str | None, params: Mapping[str, Any]) -> str | None:
        """Open (or, with ``run_id`` from an earlier attempt, continue) the run; log ``params`` on a new run.
        Returns the run id, None when MLflow is unusable."""
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)

        def start() -> str:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.spec.tracking_uri)
            if run_id is not None:
                try:
                    self._client.update_run(run_id, status="RUNNING")
                    return run_id
                except Exception as exc:  # deleted, or another server: a new run, said in the log
                    log.warning("MLflow run %s cannot be continued (%s); starting a new one", run_id, exception_line(exc))
            experiment = self._client.get_experiment_by_name(self.spec.experiment_name)
            experiment_id = (
                experiment.experiment_id if experiment is not None else self._client.create_experiment(self.spec.experiment_name)
            )
            run = self._client.create_run(experiment_id, run_name=self.run_name)
            new_id: str = run.info.run_id
            self._log_params(new_id, params)
            return new_id

        self.run_id = self._call("start run", start)
        return self.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in params.items() if v is not None]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self._client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        def log_batch() -> None:
            import time

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
            self._client.log_batch(self.run_id, metrics=batch)

        self._call("log metrics", log_batch)

    def log_artifacts(self, files: Iterable[Path], artifact_path: str | None = None) -> None:
        """Upload ``files``; one that fails is a warning naming it, and the others still go (see the module docstring)."""
        if self.run_id is None or self.failed:
            return
        failed: list[str] = []
        timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
        if self._own_timeout:
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = os.environ.get(ARTIFACT_TIMEOUT_ENV, _ARTIFACT_TIMEOUT_DEFAULT)
        try:
            for path in files:
                try:
                    self._client.log_artifact(self.run_id, str(path), artifact_path)
                except Exception as exc:
                    log.warning("MLflow upload of %s failed: %s", path.name, exception_line(exc))
                    failed.append(f"{path.name} ({exception_line(exc)})")
        finally:
            if self._own_timeout and timeout is not None:
                os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = timeout
        if failed:
            self._on_failure(
                f"MLflow at {shown_uri(self.spec.tracking_uri)} did not receive {len(failed)} artifact(s): "
                f"{'; '.join(failed)[:400]}"
            )

    def end(self, failed: bool = False) -> None:
        if self.run_id is None:
            return
        self._call("end run", lambda: self._client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED"))
