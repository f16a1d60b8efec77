"""A checkpoint written as the training loop writes one (``write_checkpoint``), for the tests of what reads
checkpoints back (resume, sealing at rest, probe stages, finishing a run) without training anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_trainer.checkpoint import CHECKPOINT_FILE, TrainState, write_checkpoint
from finetune_trainer.model import StartingWeights
from finetune_trainer.sealing import Keyring


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    state: TrainState,
    fingerprint: str,
    *,
    keyring: Keyring | None = None,
    frozen_from: StartingWeights | None = None,
    scaler: torch.amp.GradScaler | None = None,
    rng: list[dict[str, Any]] | None = None,
) -> Path:
    """``model``'s checkpoint in ``directory`` (made if missing), with a fresh SGD optimizer (momentum 0.9, over
    the parameters that train, as a probe stage's is), a constant scheduler and ``scaler`` (by default a CPU
    run's disabled one); sealed with ``keyring`` and bound to ``directory``'s name, the name it is stored
    under. Returns the checkpoint file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    write_checkpoint(
        directory,
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        scaler=scaler or torch.amp.GradScaler("cpu", enabled=False),
        state=state,
        fingerprint=fingerprint,
        rng=rng,
        keyring=keyring,
        name=directory.name,
        frozen_from=frozen_from,
    )
    return directory / CHECKPOINT_FILE
