"""What one Ray Train worker holds for the run (``Worker``) and what it does at the end of every epoch
(``report_epoch``): every worker reports (a barrier); rank 0 alone writes the checkpoint (of a
frozen-backbone stage only what trains: ``checkpoint.stored_weights``; once, straight into a local run
directory, or into a temporary one that Ray uploads to an object store), rewrites ``metrics.jsonl`` and
feeds the progress sinks. ``step_meter`` is rank 0's per-step hook. Split out of ``loop``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
from torch import nn

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.timestamps import utc_now
from finetune_operator.api.v1alpha1 import FineTuneJobSpec, Metrics, Progress
from finetune_trainer import storage
from finetune_trainer.checkpoint import TrainState, checkpoint_dir_name, write_checkpoint
from finetune_trainer.engine import Precision
from finetune_trainer.metrics_log import EpochRecord, MetricsLog
from finetune_trainer.model import StartingWeights
from finetune_trainer.progress import MultiSink
from finetune_trainer.protect import keyring_for
from finetune_trainer.seeding import gather_rng_states
from finetune_trainer.stages import Stage
from finetune_trainer.step_progress import StepMeter, report_seconds_from_env
from finetune_trainer.tracking import Tracker

__all__ = ["Worker", "report_epoch", "step_meter"]


@dataclass
class Worker:
    """What one worker holds for the whole run."""

    cfg: TrainerConfig
    fingerprint: str
    """The spec's fingerprint as written, before ``recipe.with_batch_plan`` chose a batch size: checkpoints carry it, so
    that a relaunch on another number of workers (whose planned batch differs) resumes instead of being refused."""
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    class_names: list[str]
    precision: Precision
    criterion: nn.Module
    sinks: MultiSink | None
    fail_after: int | None
    resumed_from: int = 0
    """The epoch of the checkpoint this attempt started from (0: a fresh start)."""
    passes: int = 1
    """Passes over the training images per epoch (``recipe.plan_batches``)."""
    warned_batch_norm: bool = False
    tracker: Tracker | None = None
    """Rank 0's TensorBoard and MLflow (``tracking``)."""
    warnings: list[str] = field(default_factory=list)
    """What this attempt warned about, for the model card (rank 0)."""
    start: StartingWeights | None = None
    """The starting weights' fingerprint (with their copy on rank 0) when a stage freezes the backbone."""
    metrics_log: MetricsLog | None = None
    """Rank 0's ``metrics.jsonl``, read once per attempt (``metrics_log.MetricsLog``)."""

    @property
    def spec(self) -> FineTuneJobSpec:
        return self.cfg.spec


def step_meter(worker: Worker, epoch: int, stage: Stage, steps: int, optimizer: torch.optim.Optimizer) -> StepMeter | None:
    """Rank 0's per-step hook for this epoch (status, console bar, TensorBoard points); None on other ranks."""
    if worker.rank != 0:
        return None
    tracker = worker.tracker
    return StepMeter(
        sinks=worker.sinks,
        tracker=tracker if tracker is not None and tracker.writer is not None else None,
        optimizer=optimizer,
        epoch=epoch,
        total_epochs=worker.spec.hyperparameters.epochs,
        stage=stage.name,
        steps_per_epoch=steps,
        world=worker.world,
        global_step=tracker.global_step if tracker is not None else 0,
        log_every=worker.spec.tracking.tensorboard.log_every_steps,
        report_seconds=report_seconds_from_env(),
    )


def report_epoch(
    worker: Worker,
    record: EpochRecord,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    attempt: dict[str, Any],
    frozen_backbone: bool = False,
) -> None:
    """Every worker reports (a barrier); rank 0 adds the checkpoint, metrics.jsonl and progress.
    ``frozen_backbone``: the stage trains the head alone; its checkpoint stores only what trains."""
    metrics: dict[str, Any] = {k: v for k, v in vars(record).items() if v is not None} | {
        "best_val_accuracy": state.best_val_accuracy,
        "best_epoch": state.best_epoch,
        **attempt,
    }
    name = checkpoint_dir_name(record.epoch, state.lineage)
    rng = gather_rng_states()  # a collective: every worker's generators, onto rank 0 alone (None elsewhere)
    if worker.rank != 0:
        ray.train.report(metrics, checkpoint_dir_name=name)
        return
    if worker.metrics_log is None:
        worker.metrics_log = MetricsLog(worker.cfg.run_dir)
    worker.metrics_log.append(record)
    keyring = keyring_for(worker.cfg)

    def write(directory: str | Path) -> None:
        write_checkpoint(
            directory,
            model=worker.model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=worker.precision.scaler,
            state=state,
            fingerprint=worker.fingerprint,
            rng=rng,
            keyring=keyring,
            name=name,
            frozen_from=worker.start if frozen_backbone else None,
        )

    run_dir = worker.cfg.run_dir
    if storage.is_remote(run_dir) or keyring is not None:
        # An object store: Ray Train uploads the directory before report() returns (durable when it does).
        # Encrypted: the clear file is written before it is sealed, so never under the run directory but in
        # a private temporary one (mode 0700), whose sealed content Ray copies.
        with tempfile.TemporaryDirectory(prefix="finetune-ckpt-") as directory:
            write(directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name)
    else:
        # A local or mounted run directory, which is Ray Train's own (RunConfig(storage_path, name)): written
        # once where Ray would have copied it, complete before it appears under its name, and reported
        # without Ray's copy (NO_UPLOAD), which doubled the epoch's checkpoint time.
        target = storage.local_path(run_dir) / name
        with storage.atomic_directory(target) as staging:
            write(staging)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(target)),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )
    if worker.sinks is not None:
        total = worker.spec.hyperparameters.epochs
        worker.sinks.update(
            Progress(
                epoch=record.epoch,
                total_epochs=total,
                percent=round(100 * record.epoch / total, 2),
                stage=record.stage,
                updated_at=utc_now(),
            ),
            Metrics(
                train_loss=record.train_loss,
                val_loss=record.val_loss,
                val_accuracy=record.val_accuracy,
                val_top5=record.val_top5,
                best_val_accuracy=state.best_val_accuracy,
                best_epoch=state.best_epoch,
                images_per_second=record.images_per_second,
                epoch_seconds=record.epoch_seconds,
            ),
        )
