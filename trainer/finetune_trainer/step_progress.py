"""In-epoch progress on rank 0: the per-step hook of ``engine.train_one_epoch`` (``StepMeter``).

Every step it counts steps and images and adds the loss and the right top-1 predictions to running sums
that stay on the device: no host sync per step. The sums are read (one sync) only every ``log_every``
steps (a TensorBoard point with the loss and training accuracy since the last one, and a console-bar
refresh) and when a status report is due; the epoch's training accuracy (this worker's shard) once, at
its end. Status sinks get an in-epoch ``Progress`` (step,
percent, loss, images/s, ETA) at most once per ``report_seconds`` (the operator's status throttle, the
``FINETUNE_STATUS_THROTTLE_SECONDS`` the Kubernetes sink also obeys), so a long epoch moves
``kubectl get ftj`` without flooding the API server or rewriting a status file every step.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Final, Protocol

import torch
from torch import Tensor

from finetune_operator.api.contract import ENV_THROTTLE
from finetune_operator.api.timestamps import utc_now
from finetune_operator.api.v1alpha1 import Progress, Stage

__all__ = ["DEFAULT_REPORT_SECONDS", "StepMeter", "StepSink", "StepTracker", "report_seconds_from_env"]

log = logging.getLogger(__name__)

DEFAULT_REPORT_SECONDS: Final = 10.0
"""The operator's default status throttle (``settings.status_throttle_seconds``)."""


class StepSink(Protocol):
    """Where in-epoch progress goes (``progress.MultiSink``)."""

    def update(self, progress: Progress) -> None: ...

    def step(self, progress: Progress, epoch_eta_seconds: int | None) -> None: ...


class StepTracker(Protocol):
    """Where per-step points go (``tracking.Tracker``)."""

    def step(
        self, global_step: int, loss: float, lrs: list[float], images_per_second: float, accuracy: float | None = None
    ) -> None: ...


def report_seconds_from_env() -> float:
    raw = os.environ.get(ENV_THROTTLE, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_REPORT_SECONDS
    except ValueError:
        return DEFAULT_REPORT_SECONDS


class StepMeter:
    """Called after every optimizer step of one epoch with the step's loss tensor and batch size."""

    def __init__(
        self,
        *,
        sinks: StepSink | None,
        tracker: StepTracker | None,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        total_epochs: int,
        stage: Stage,
        steps_per_epoch: int,
        world: int,
        global_step: int,
        log_every: int,
        report_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sinks, self.tracker, self.optimizer = sinks, tracker, optimizer
        self.epoch, self.total_epochs, self.stage = epoch, total_epochs, stage
        self.steps_per_epoch, self.world = max(1, steps_per_epoch), world
        self.global_step = global_step
        self.log_every, self.report_seconds = log_every, report_seconds
        self._clock = clock
        self._started = self._last_report = clock()
        self.step = 0
        self.images = 0
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self.loss: float | None = None
        self._correct: Tensor | None = None  # right predictions since the last read, on the device
        self._epoch_correct: Tensor | None = None  # ... and since the epoch began
        self._epoch_count = 0
        self.accuracy: float | None = None  # training accuracy over the last interval
        self.reports = 0  # in-epoch status updates sent (tests)

    def __call__(self, loss: Tensor, batch: int, correct: Tensor | None = None) -> None:
        self.step += 1
        self.global_step += 1
        self.images += batch * self.world  # equal shards: every worker steps with the same batch size
        weighted = loss.detach().float() * batch  # stays on the device: no sync here
        self._loss_sum = weighted if self._loss_sum is None else self._loss_sum + weighted
        self._loss_count += batch
        if correct is not None:
            self._correct = correct if self._correct is None else self._correct + correct
            self._epoch_correct = correct if self._epoch_correct is None else self._epoch_correct + correct
            self._epoch_count += batch
        now = self._clock()
        logged = self.step % self.log_every == 0
        due = now - self._last_report >= self.report_seconds and self.step < self.steps_per_epoch
        if logged or due:
            self._read_loss()  # the one host sync, at the log or report interval
        if logged:
            if self.tracker is not None:
                lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
                self.tracker.step(self.global_step, self.loss or 0.0, lrs, self.images_per_second(now), self.accuracy)
            if self.sinks is not None:
                progress, epoch_eta = self.progress(now)
                self.sinks.step(progress, epoch_eta)
        if due:
            self._last_report = now
            self.reports += 1
            if self.sinks is not None:
                self.sinks.update(self.progress(now)[0])

    def _read_loss(self) -> None:
        if self._loss_sum is not None and self._loss_count:
            if self._correct is None:
                loss_sum, correct = float(self._loss_sum), None
            else:  # one transfer for both: each read from the device waits for the queued steps
                loss_sum, correct = torch.stack([self._loss_sum.double(), self._correct.double()]).tolist()
            loss = loss_sum / self._loss_count
            self.loss = loss if math.isfinite(loss) else None  # a diverged loss is not valid JSON for the API server
            self.accuracy = None if correct is None else correct / self._loss_count
        self._loss_sum, self._loss_count, self._correct = None, 0, None

    def epoch_accuracy(self) -> float | None:
        """This worker's training accuracy over the epoch so far (one device read); None without predictions."""
        if self._epoch_correct is None or not self._epoch_count:
            return None
        return float(self._epoch_correct) / self._epoch_count

    def images_per_second(self, now: float) -> float:
        return self.images / max(now - self._started, 1e-9)

    def progress(self, now: float) -> tuple[Progress, int | None]:
        """The in-epoch Progress (``epoch`` counts finished epochs) and this epoch's ETA in seconds."""
        done = self.epoch - 1
        elapsed = now - self._started
        rate = self.step / elapsed if elapsed > 0 and self.step else None  # steps per second
        epoch_eta = None if rate is None else int((self.steps_per_epoch - self.step) / rate)
        later = (self.total_epochs - self.epoch) * self.steps_per_epoch
        job_eta = None if rate is None else int((self.steps_per_epoch - self.step + later) / rate)
        fraction = (done + min(self.step, self.steps_per_epoch) / self.steps_per_epoch) / max(self.total_epochs, 1)
        progress = Progress(
            epoch=done,
            total_epochs=self.total_epochs,
            percent=round(min(100.0, 100 * fraction), 2),
            stage=self.stage,
            step=self.step,
            steps_per_epoch=self.steps_per_epoch,
            loss=self.loss,
            images_per_second=round(self.images_per_second(now), 1),
            eta_seconds=job_eta,
            updated_at=utc_now(),
        )
        return progress, epoch_eta
