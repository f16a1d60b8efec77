"""Which checkpoint a relaunched run resumes from, and which one its shipped model comes from.

``resume_from`` reads the checkpoint Ray Train hands back (its latest) and, when that one is corrupt
(``checkpoint.CorruptCheckpoint``: truncated, altered, unreadable), the checkpoints of earlier epochs beside it
in the run directory, newest first (never one Ray never registered or a fallback abandoned): the first usable one wins,
and each one skipped becomes a warning for the job's status. Only when none is usable does the run fail, in one
line naming each and why.
After a fallback the run's ``lineage`` moves past every checkpoint name on disk, so that re-run epochs
never write into (and Ray's retention never deletes) the directory of an abandoned one.

``read_weights`` loads one named checkpoint's model weights (the best epoch's, for ``model.pt``).
Ray's ``Checkpoint`` reaches local paths and object stores alike; ``as_directory`` downloads when needed.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Final

import pyarrow.fs
import ray.train

from finetune_trainer import storage
from finetune_trainer.checkpoint import CorruptCheckpoint, full_weights, read_checkpoint
from finetune_trainer.errors import TrainerError
from finetune_trainer.model import StartingWeights

__all__ = ["Resumed", "order_candidates", "read_weights", "resume_from", "unregistered"]

_NAME: Final = re.compile(r"^checkpoint_epoch_(\d+)(?:_r(\d+))?$")


class Resumed:
    """A usable checkpoint's content (``read_checkpoint``'s dict) and the warnings of those skipped."""

    def __init__(self, data: dict[str, Any], warnings: list[str]) -> None:
        self.data = data
        self.warnings = warnings


def _key(name: str) -> tuple[int, int] | None:
    """(epoch, lineage) of a checkpoint directory name; None for anything else."""
    match = _NAME.match(name)
    return None if match is None else (int(match[1]), int(match[2] or 0))


def order_candidates(latest: str, names: list[str]) -> list[str]:
    """``latest`` first, then the checkpoint names among ``names`` of earlier epochs, newest (epoch, lineage) first.
    Left out (``unregistered``): a later epoch's, or the same epoch's of another lineage, and an older lineage's from
    an epoch a newer lineage (the latest's included) re-ran. Ray Train never registered them (rank 0 renamed one into
    place, or Ray's copy began, and the attempt died before ``ray.train.report`` recorded it), or a fallback abandoned
    them; resuming from one would skip an epoch whose report never happened (its MLflow points, its status) and
    disagree with Ray's own checkpoint manager."""
    skipped = set(unregistered(latest, names))
    keyed = [(key, n) for n in set(names) if n != latest and n not in skipped and (key := _key(n)) is not None]
    return [latest, *(n for _, n in sorted(keyed, reverse=True))]


def unregistered(latest: str, names: list[str]) -> list[str]:
    """The checkpoint names among ``names`` that ``order_candidates`` leaves out, in name order. A newer lineage
    began after an older one's epoch it resumed from, so an older lineage's checkpoint at or after the first epoch
    a newer lineage has on disk was abandoned. (Retention may have deleted a newer lineage's first checkpoints;
    its first one left on disk then bounds its start from above.)"""
    top = _key(latest)
    if top is None:
        return []
    keys = {n: k for n in set(names) if (k := _key(n)) is not None} | {latest: top}
    first: dict[int, int] = {}  # lineage -> the first epoch of it on disk
    for epoch, lineage in keys.values():
        first[lineage] = min(epoch, first.get(lineage, epoch))

    def abandoned(epoch: int, lineage: int) -> bool:
        return any(newer > lineage and start <= epoch for newer, start in first.items())

    return sorted(n for n, (e, lin) in keys.items() if n != latest and (e >= top[0] or abandoned(e, lin)))


def _siblings(checkpoint: ray.train.Checkpoint) -> list[str]:
    parent = posixpath.dirname(checkpoint.path.rstrip("/"))
    # Ray resolves a checkpoint's filesystem when it is built: never None here.
    assert checkpoint.filesystem is not None
    infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    return [info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory]


def _read(checkpoint: ray.train.Checkpoint, fingerprint: str, run_dir: str, encrypted: bool) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        # The stored name, not the local copy's: a sealed checkpoint is bound to the name it was written under.
        name = posixpath.basename(checkpoint.path.rstrip("/"))
        return read_checkpoint(directory, fingerprint, run_dir, encrypted=encrypted, name=name)


def resume_from(latest: ray.train.Checkpoint, fingerprint: str, run_dir: str, *, encrypted: bool = False) -> Resumed:
    """The newest usable checkpoint, starting with ``latest``; TrainerError (one line) when none is, or when
    one cannot be decrypted (``read_checkpoint``; ``encrypted``: the job encrypts its checkpoints)."""
    latest_name = posixpath.basename(latest.path.rstrip("/"))
    try:
        return Resumed(_read(latest, fingerprint, run_dir, encrypted), [])
    except CorruptCheckpoint as e:
        problems = [str(e)]
    names = _siblings(latest)
    parent = posixpath.dirname(latest.path.rstrip("/"))
    for name in order_candidates(latest_name, names)[1:]:
        candidate = ray.train.Checkpoint(path=posixpath.join(parent, name), filesystem=latest.filesystem)
        try:
            data = _read(candidate, fingerprint, run_dir, encrypted)
        except CorruptCheckpoint as e:
            problems.append(str(e))
            continue
        state = data["train_state"]
        # Past every lineage on disk: the abandoned checkpoints keep their names, the re-run gets new ones.
        state.lineage = 1 + max(k[1] for n in names if (k := _key(n)) is not None)
        warnings = [f"{p}; resumed from checkpoint {name} (epoch {state.epoch})" for p in problems]
        return Resumed(data, warnings)
    ignored = unregistered(latest_name, names)
    # Named, since deleting the folder deletes them too: a user may want to look at one before starting over.
    never = f"; not resumed from, never reported: {', '.join(ignored)}" if ignored else ""
    raise TrainerError(
        f"output: no usable checkpoint in {run_dir}: {'; '.join(problems)}{never}; "
        "delete that folder to start over, or rename the job or change output.uri"
    )


def read_weights(
    run_dir: str, name: str, fingerprint: str, *, encrypted: bool = False, start: StartingWeights | None = None
) -> dict[str, Any]:
    """The whole model state_dict of checkpoint ``name`` in ``run_dir`` (CorruptCheckpoint if unusable); a
    frozen-backbone checkpoint's on top of ``start``, the starting weights (``checkpoint.full_weights``)."""
    checkpoint = ray.train.Checkpoint(path=storage.join(run_dir, name))
    return full_weights(_read(checkpoint, fingerprint, run_dir, encrypted), start, f"checkpoint {name}")
