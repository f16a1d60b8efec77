"""Progress sinks: where the trainer's rank-0 worker reports how far training is and how it goes.

The training loop speaks the API's own status models (``Progress``, ``Metrics``, ``Artifacts``) to a
``ProgressSink``; which sinks listen is the config's choice (``TrainerConfig.sinks``): a console bar for
people (``finetune run``), a JSON status file for scripts, the FineTuneJob status in a cluster. The
Kubernetes sink lives in ``status_reporter`` (the one trainer module allowed to import kubernetes) and is
imported here only when asked for. ``build_sinks`` wraps them all in a ``MultiSink`` so that a broken
sink — an API server hiccup, a full disk — is logged and never stops training.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, Protocol, TextIO

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.timestamps import utc_now
from finetune_operator.api.v1alpha1 import Artifacts, Metrics, Phase, Progress, newest_warnings
from finetune_trainer import storage

__all__ = [
    "ConsoleSink",
    "JsonFileSink",
    "MultiSink",
    "ProgressSink",
    "build_sinks",
    "format_epoch_line",
    "format_step_line",
    "utc_now",
]

log = logging.getLogger(__name__)

# Stages inside an epoch loop; the others (caching features, evaluation, export) are one-off steps.
_EPOCH_STAGES = frozenset({"probe", "fine-tune"})


class ProgressSink(Protocol):
    """Receives training progress. ``update`` after every epoch (and at stage changes); ``warn`` for a
    problem the trainer worked around (kept until the end); ``finish`` once."""

    def update(self, progress: Progress, metrics: Metrics | None = None) -> None: ...

    def warn(self, message: str) -> None: ...

    def finish(self, artifacts: Artifacts | None = None, error: str | None = None) -> None: ...


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_epoch_line(progress: Progress, metrics: Metrics | None) -> str:
    """One human line for a finished epoch, e.g.
    ``epoch  3/10 fine-tune  train_loss 0.4123  val_loss 0.3981  val_acc 88.20%  best 88.20% (epoch 3)  1234 img/s  12.3s``."""
    width = len(str(progress.total_epochs or progress.epoch))
    parts = [f"epoch {progress.epoch:>{width}}/{progress.total_epochs}", f"{progress.stage:<9}"]
    if metrics is not None:
        parts += [f"train_loss {_num(metrics.train_loss, '.4f')}", f"val_loss {_num(metrics.val_loss, '.4f')}"]
        parts.append(f"val_acc {_pct(metrics.val_accuracy)}")
        if metrics.val_top5 is not None:
            parts.append(f"top5 {_pct(metrics.val_top5)}")
        best = f"best {_pct(metrics.best_val_accuracy)}"
        parts.append(best if metrics.best_epoch is None else f"{best} (epoch {metrics.best_epoch})")
        parts.append(f"{_num(metrics.images_per_second, '.0f')} img/s")
        parts.append(f"{_num(metrics.epoch_seconds, '.1f')}s")
    return "  ".join(parts)


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _epoch_eta(progress: Progress) -> int | None:
    """Seconds left in this epoch, from the job's ETA at the job's step rate (every epoch has as many steps)."""
    if progress.eta_seconds is None or progress.step is None or not progress.steps_per_epoch:
        return None
    left_in_epoch = max(progress.steps_per_epoch - progress.step, 0)
    left_in_job = left_in_epoch + max(progress.total_epochs - progress.epoch - 1, 0) * progress.steps_per_epoch
    return int(progress.eta_seconds * left_in_epoch / left_in_job) if left_in_job else 0


def format_step_line(progress: Progress, epoch_eta: int | None = None) -> str:
    """One human line inside an epoch, e.g.
    ``epoch  4/10 step 120/500  fine-tune  loss 0.4123  1234 img/s  eta epoch 2m05s, job 41m10s`` (never
    mistaken for an epoch's line, which has the stage right after the epoch). Without ``epoch_eta`` (a line at the
    status pace carries only the Progress) it is the job's ETA shared out over the steps left."""
    if epoch_eta is None:
        epoch_eta = _epoch_eta(progress)
    width = len(str(progress.total_epochs or progress.epoch))
    return "  ".join(
        [
            f"epoch {progress.epoch + 1:>{width}}/{progress.total_epochs} step {progress.step}/{progress.steps_per_epoch}",
            f"{progress.stage:<9}",
            f"loss {_num(progress.loss, '.4f')}",
            f"{_num(progress.images_per_second, '.0f')} img/s",
            f"eta epoch {_duration(epoch_eta)}, job {_duration(progress.eta_seconds)}",
        ]
    )


# ------------------------------------------------------------------------------------------ console
class ConsoleSink:
    """A tqdm bar over epochs and one line per finished epoch, on ``stream`` (default stderr); plain lines
    only when it is not a terminal (CI logs, Ray's forwarded worker output), where a redrawn bar is noise."""

    def __init__(
        self, stream: TextIO | None = None, *, bar: bool | None = None, label: str = "training", say_failure: bool = True
    ) -> None:
        """``say_failure``: end a failed run with ``failed: <error>``; off where the caller prints the error as its
        own last line (``finetune run``), which would otherwise show it twice."""
        self._say_failure = say_failure
        # Resolved on each write when not given, so that redirections after construction are honoured.
        self._stream = stream
        self._bar_wanted = bar
        self._label = label
        self._bar: Any = None
        self._last_epoch = -1
        self._last_stage: str | None = None
        self._steps = 0  # steps per epoch, once known

    @property
    def stream(self) -> TextIO:
        # stderr, as tqdm and pip do: it keeps stdout for results, and Ray Train (2.60) forwards a worker's
        # stdout to the driver twice but its stderr once.
        return self._stream if self._stream is not None else sys.stderr

    def _use_bar(self) -> bool:
        if self._bar_wanted is not None:
            return self._bar_wanted
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def _write(self, line: str) -> None:
        if self._bar is not None:
            # tqdm.write clears the bar, prints the line and redraws the bar below it.
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _move_bar(self, progress: Progress) -> None:
        """The bar counts epochs until the first in-epoch report, then every step of the job (its ETA the job's)."""
        if self._bar is None and self._use_bar() and progress.total_epochs:
            from tqdm import tqdm

            self._bar = tqdm(total=progress.total_epochs, desc=self._label, unit="epoch", file=self.stream, dynamic_ncols=True)
        if self._bar is None:
            return
        if progress.steps_per_epoch:
            self._steps = progress.steps_per_epoch
        self._bar.set_description(f"{self._label} [{progress.stage}]", refresh=False)
        if self._steps:
            self._bar.unit = "step"
            self._bar.total = progress.total_epochs * self._steps
            self._bar.n = progress.epoch * self._steps + (progress.step or 0)
        else:
            self._bar.total = progress.total_epochs
            self._bar.n = progress.epoch

    def step(self, progress: Progress, epoch_eta_seconds: int | None = None) -> None:
        """An in-epoch point (every few steps): the bar moves; lines only come with ``update``'s slower pace."""
        self._move_bar(progress)
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"epoch {progress.epoch + 1}/{progress.total_epochs} loss {_num(progress.loss, '.4f')} "
                f"{_num(progress.images_per_second, '.0f')} img/s eta epoch {_duration(epoch_eta_seconds)}",
                refresh=False,
            )
            self._bar.refresh()

    def update(self, progress: Progress, metrics: Metrics | None = None) -> None:
        if progress.step is not None:  # in-epoch, at the status pace: a line where no bar is drawn
            if self._use_bar():
                self.step(progress)
            else:
                self._write(format_step_line(progress))
            return
        self._move_bar(progress)
        if self._bar is not None:
            if metrics is not None and metrics.val_accuracy is not None:
                self._bar.set_postfix(val_acc=_pct(metrics.val_accuracy), best=_pct(metrics.best_val_accuracy), refresh=False)
            self._bar.refresh()
        if progress.stage in _EPOCH_STAGES and progress.epoch > self._last_epoch and metrics is not None:
            self._write(format_epoch_line(progress, metrics))
            self._last_epoch = progress.epoch
        elif progress.stage != self._last_stage and progress.stage not in _EPOCH_STAGES and progress.stage != "done":
            # One-off steps (caching features, evaluation, export) get a line so a long pause is explained.
            self._write(f"{progress.stage}...")
        self._last_stage = progress.stage

    def warn(self, message: str) -> None:
        self._write(f"warning: {message}")

    def finish(self, artifacts: Artifacts | None = None, error: str | None = None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if error is not None:
            if self._say_failure:
                self._write(f"failed: {error}")
        elif artifacts is not None and artifacts.model_uri:
            self._write(f"done: model {artifacts.model_uri}, model card {artifacts.model_card_uri}")
        else:
            self._write("done")


# --------------------------------------------------------------------------------------------- file
class JsonFileSink:
    """The latest status as one JSON document at ``path``:
    ``{"phase", "progress", "metrics", "artifacts", "error", "warnings"}`` with the API's camelCase fields. Each
    write replaces the file atomically, so a reader polling it always parses a complete document."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._progress: Progress | None = None
        self._metrics: Metrics | None = None
        self._warnings: list[str] = []

    def _write(self, phase: Phase, artifacts: Artifacts | None = None, error: str | None = None) -> None:
        def wire(obj: Progress | Metrics | Artifacts | None) -> dict[str, Any] | None:
            return None if obj is None else obj.model_dump(by_alias=True, mode="json")

        doc = {
            "phase": phase.value,
            "progress": wire(self._progress),
            "metrics": wire(self._metrics),
            "artifacts": wire(artifacts),
            "error": error,
            "warnings": self._warnings,
        }
        storage.write_text(self.path, json.dumps(doc, indent=2) + "\n")

    def update(self, progress: Progress, metrics: Metrics | None = None) -> None:
        if progress.updated_at is None:
            progress = progress.model_copy(update={"updated_at": utc_now()})
        self._progress = progress
        # An update without metrics (a stage change) keeps the last epoch's metrics visible.
        if metrics is not None:
            self._metrics = metrics
        self._write(Phase.RUNNING)

    def warn(self, message: str) -> None:
        self._warnings = newest_warnings([*self._warnings, message])
        self._write(Phase.RUNNING)

    def finish(self, artifacts: Artifacts | None = None, error: str | None = None) -> None:
        if self._progress is not None and error is None:
            self._progress = self._progress.model_copy(update={"stage": "done", "percent": 100.0, "updated_at": utc_now()})
        self._write(Phase.FAILED if error is not None else Phase.SUCCEEDED, artifacts, error)


# ------------------------------------------------------------------------------------------ fan-out
class MultiSink:
    """Forwards to every sink; one that raises is logged (with its traceback the first time) and skipped,
    because losing a progress line must never cost a training run."""

    def __init__(self, sinks: Sequence[ProgressSink]) -> None:
        self.sinks = list(sinks)
        self._failed: set[int] = set()

    def _call(self, sink: ProgressSink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as e:
            first = id(sink) not in self._failed
            self._failed.add(id(sink))
            log.warning("progress sink %s failed in %s: %s", type(sink).__name__, method, e, exc_info=first)

    def update(self, progress: Progress, metrics: Metrics | None = None) -> None:
        for sink in self.sinks:
            self._call(sink, "update", progress, metrics)

    def step(self, progress: Progress, epoch_eta_seconds: int | None = None) -> None:
        """In-epoch points for the sinks that draw them (the console bar); the others wait for ``update``."""
        for sink in self.sinks:
            if hasattr(sink, "step"):
                self._call(sink, "step", progress, epoch_eta_seconds)

    def warn(self, message: str) -> None:
        for sink in self.sinks:
            self._call(sink, "warn", message)

    def finish(self, artifacts: Artifacts | None = None, error: str | None = None) -> None:
        for sink in self.sinks:
            self._call(sink, "finish", artifacts, error)


def build_sinks(cfg: TrainerConfig, *, local: bool = False) -> MultiSink:
    """The sinks ``cfg.sinks`` names, behind one ``MultiSink``. ``file`` writes ``cfg.status_file``
    (default ``<run dir>/status.json`` for a local run dir); ``kubernetes`` is skipped with a warning
    when its module cannot be imported (no kubernetes client in this image). ``local``: ``finetune run``, whose
    driver prints a failure's one line itself (the console does not repeat it)."""
    sinks: list[ProgressSink] = []
    for name in dict.fromkeys(cfg.sinks):  # each once, in the order given
        if name == "console":
            sinks.append(ConsoleSink(label=cfg.job_name, say_failure=not local))
        elif name == "file":
            path = cfg.status_file
            if path is None and not storage.is_remote(cfg.run_dir):
                path = storage.join(cfg.run_dir, "status.json")
            if path is None:
                log.warning("file progress sink needs statusFile when the run dir %s is remote; skipped", cfg.run_dir)
                continue
            sinks.append(JsonFileSink(path))
        elif name == "kubernetes":
            try:
                # By name, at run time: the module needs the kubernetes client, which local installs lack.
                reporter = importlib.import_module("finetune_trainer.status_reporter")
                sinks.append(reporter.KubernetesStatusSink(cfg))
            except Exception as e:  # ImportError, or no in-cluster credentials when the sink starts
                log.warning("kubernetes progress sink unavailable (%s); the FineTuneJob status will not show progress", e)
    return MultiSink(sinks)
