"""What a training checkpoint holds, and how a relaunched run takes it back.

Rank 0 writes one ``checkpoint.pt`` per epoch into a directory it hands to ``ray.train.report``; Ray
Train copies it to ``<run dir>/checkpoint_epoch_NNNN`` and remembers it in the run's snapshot, so a
relaunch of the same job (same ``RunConfig(name, storage_path)``) gets it back from
``ray.train.get_checkpoint()``. The file holds the unwrapped model's state_dict, the optimizer, the
scheduler, the AMP scaler, where training stood (epoch, stage, best metric, epochs without
improvement), every worker's random generators (``seeding.rng_state``, absent before they were kept)
and the spec fingerprint: a checkpoint written for another spec is refused, not resumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from finetune_trainer.errors import TrainerError

__all__ = ["CHECKPOINT_FILE", "TrainState", "checkpoint_dir_name", "read_checkpoint", "write_checkpoint"]

CHECKPOINT_FILE: Final = "checkpoint.pt"
_FORMAT: Final = 1


@dataclass
class TrainState:
    """Where training stands after ``epoch`` epochs (1-based, 0 before the first)."""

    epoch: int = 0
    stage: str = "starting"
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    """Epochs since the last improvement, for early stopping."""
    stopped_early: bool = False

    def observe(self, epoch: int, val_accuracy: float, min_delta: float) -> None:
        """Record epoch ``epoch``'s accuracy: the best is the maximum; an improvement (for patience)
        must beat the previous best by more than ``min_delta``."""
        previous = self.best_val_accuracy
        if previous is None or val_accuracy - previous > min_delta:
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        if previous is None or val_accuracy > previous:
            self.best_val_accuracy, self.best_epoch = val_accuracy, epoch
        self.epoch = epoch


def checkpoint_dir_name(epoch: int) -> str:
    """The checkpoint's directory under the run dir: named by epoch, so the best one can be found again."""
    return f"checkpoint_epoch_{epoch:04d}"


def write_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    fingerprint: str,
    rng: list[dict[str, Any]] | None = None,
) -> None:
    torch.save(
        {
            "format": _FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "train_state": dataclasses.asdict(state),
            "fingerprint": fingerprint,
            "rng": rng,
        },
        Path(directory) / CHECKPOINT_FILE,
    )


def read_checkpoint(directory: str | Path, fingerprint: str, run_dir: str) -> dict[str, Any]:
    """The checkpoint in ``directory`` (as written by ``write_checkpoint``) with ``train_state`` as a
    TrainState; a TrainerError when it belongs to another spec."""
    path = Path(directory) / CHECKPOINT_FILE
    # weights_only: a checkpoint is data; loading it must not be able to run code.
    data: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    found = data.get("fingerprint")
    if found != fingerprint:
        raise TrainerError(
            f"output: {run_dir} holds checkpoints of a different spec (fingerprint {found}, this job {fingerprint}); "
            "a relaunch resumes only the same training spec: delete that folder, or rename the job or change output.uri"
        )
    data["train_state"] = TrainState(**data["train_state"])
    return data
