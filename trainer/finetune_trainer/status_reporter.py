"""The trainer's Kubernetes progress sink: rank 0 patches its own FineTuneJob's progress, metrics, artifacts.

``KubernetesStatusSink`` implements ``progress.ProgressSink``. It merge-patches ``status.progress``,
``status.metrics``, ``status.warnings`` and finally ``status.artifacts`` through the status subresource of the one job named in
the config (the per-job Role allows nothing else), and never touches ``phase``/``conditions``, which the
operator owns. Patches are throttled to one per ``FINETUNE_STATUS_THROTTLE_SECONDS`` (set by the operator
in the pod's environment; updates in between are coalesced, the last one wins) and ``finish`` always
sends. Reporting is never fatal: an unreachable or refusing API server costs a warning, not the run.

The only trainer module that imports the kubernetes client (import-linter enforces it), loaded by
``progress.build_sinks`` on demand. Credentials: in-cluster (the pod's service account), else
``KUBECONFIG`` (tests, development).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import kubernetes.client

from finetune_operator.api.contract import ENV_JOB_NAMESPACE, ENV_THROTTLE, TrainerConfig
from finetune_operator.api.timestamps import utc_now
from finetune_operator.api.v1alpha1 import Artifacts, Metrics, Progress, newest_warnings
from finetune_operator.api.versions import GROUP, PLURAL, VERSION
from finetune_operator.kubeclient import load_client

log = logging.getLogger(__name__)

DEFAULT_THROTTLE: Final = 10.0
TIMEOUT: Final = (3.0, 10.0)  # connect, read: a stuck API server must not stall an epoch for long
MERGE_PATCH: Final = "application/merge-patch+json"
IN_EPOCH_NULLS: Final = {"step": None, "stepsPerEpoch": None, "loss": None, "imagesPerSecond": None, "etaSeconds": None}
_SA_NAMESPACE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _throttle_from_env() -> float:
    raw = os.environ.get(ENV_THROTTLE, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_THROTTLE
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %s", ENV_THROTTLE, raw, DEFAULT_THROTTLE)
        return DEFAULT_THROTTLE


class KubernetesStatusSink:
    """Progress → ``FineTuneJob.status`` of ``cfg.namespace/cfg.job_name``; see the module docstring."""

    def __init__(
        self,
        cfg: TrainerConfig,
        *,
        api_client: kubernetes.client.ApiClient | None = None,
        throttle_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = cfg.job_name
        self.namespace = cfg.namespace or os.environ.get(ENV_JOB_NAMESPACE) or self._pod_namespace()
        self.throttle = _throttle_from_env() if throttle_seconds is None else throttle_seconds
        self._clock = clock
        self._last_sent: float | None = None
        self._pending: dict[str, Any] = {}
        self._warnings: list[str] = []
        self._failing = False
        self.sent = 0  # patches the API server accepted
        self._api: kubernetes.client.CustomObjectsApi | None = None
        try:
            self._api = kubernetes.client.CustomObjectsApi(api_client or load_client(retries=0))
        except Exception as exc:  # no credentials: report nothing, train anyway
            log.warning("no Kubernetes credentials (%s); FineTuneJob %s will not show progress", exc, self.where)

    @property
    def where(self) -> str:
        return f"{self.namespace or '?'}/{self.name}"

    @staticmethod
    def _pod_namespace() -> str | None:
        try:
            return _SA_NAMESPACE.read_text().strip() or None
        except OSError:
            return None

    # ---- ProgressSink

    def update(self, progress: Progress, metrics: Metrics | None = None) -> None:
        if progress.updated_at is None:
            progress = progress.model_copy(update={"updated_at": utc_now()})
        # A merge patch keeps keys it does not name: the in-epoch fields are nulled (removed) when absent, or an
        # epoch's end would leave the previous epoch's step, loss and ETA standing in the status.
        self._pending["progress"] = {**IN_EPOCH_NULLS, **progress.to_wire()}
        if metrics is not None:
            self._pending["metrics"] = metrics.to_wire()
        now = self._clock()
        if self._last_sent is None or now - self._last_sent >= self.throttle:
            self._flush(now)

    def warn(self, message: str) -> None:
        # Sent at once, throttle or not: a warning is rare and must not wait for (or be lost before) the next epoch.
        self._warnings = newest_warnings([*self._warnings, message])
        self._pending["warnings"] = list(self._warnings)
        self._flush(self._clock())

    def finish(self, artifacts: Artifacts | None = None, error: str | None = None) -> None:
        if error is None:
            done = self._pending.get("progress") or {}
            self._pending["progress"] = {**done, **IN_EPOCH_NULLS, "stage": "done", "percent": 100.0, "updatedAt": utc_now()}
        if artifacts is not None:
            self._pending["artifacts"] = artifacts.to_wire()
        # The operator reports the failure (phase, conditions) from the RayJob; we only flush what we know.
        self._flush(self._clock())

    # ---- sending

    def _flush(self, now: float) -> None:
        if not self._pending:
            return
        self._last_sent = now  # also after a failure: an unreachable API is retried at the throttle's pace
        if self._api is None or self.namespace is None:
            return
        body = {"status": dict(self._pending)}
        try:
            self._api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, body, _content_type=MERGE_PATCH, _request_timeout=TIMEOUT
            )
        except Exception as exc:  # never fatal: training matters more than its progress bar
            status = getattr(exc, "status", None)
            detail = f"HTTP {status} {getattr(exc, 'reason', '')}".strip() if status else str(exc)
            log.warning("could not patch FineTuneJob %s status (%s); training goes on", self.where, detail)
            self._failing = True
            return
        if self._failing:
            log.info("FineTuneJob %s status reachable again", self.where)
            self._failing = False
        self._pending.clear()
        self.sent += 1
