"""What a training checkpoint holds, and how a relaunched run takes it back.

Rank 0 writes one ``checkpoint.pt`` per epoch into ``<run dir>/checkpoint_epoch_NNNN`` (in a local or
mounted run directory directly, complete before it is renamed into place; into a temporary directory that
Ray Train uploads for an object store: ``worker_report``) and hands it to ``ray.train.report``; Ray Train
remembers it in the run's snapshot, so a relaunch of the same job (same ``RunConfig(name, storage_path)``)
gets it back from ``ray.train.get_checkpoint()``. The file holds the unwrapped model's state_dict (of a frozen-backbone
stage only what trains, with the starting weights' reference and sha256 under ``base``: see
``stored_weights``), the optimizer, the
scheduler, the AMP scaler, where training stood (epoch, stage, best metric, epochs without
improvement), every worker's random generators (``seeding.rng_state``, absent before they were kept)
and the spec fingerprint: a checkpoint written for another spec is refused, not resumed (the run stops).
With ``spec.output.encryption.clientSide`` the file is encrypted (``sealing``) before it leaves the
worker, and a resumed run decrypts it with the same keyring; the sealed file is bound to its checkpoint's
name (``checkpoint_binding``), so an older checkpoint copied over a newer one is
refused, not resumed (the run stops). Beside it, ``checkpoint.sha256`` holds the
file's checksum (of the bytes as stored): a truncated or altered copy, or an encrypted one without its checksum
(an incomplete copy), is refused as corrupt (``CorruptCheckpoint``), so that the caller can fall back to an older
one (``resume``).

The best epoch follows Ray Train's retention rule (``CheckpointConfig(checkpoint_score_attribute=
"val_accuracy", order="max")``): on equal scores the later report ranks higher, so the checkpoint the
status names is always the one Ray keeps. Early stopping counts per stage: a stage starts with a fresh
patience, and a stage that stopped early never skips the next one.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

import torch
import torch.utils.serialization

from finetune_operator.api.fields import quote
from finetune_trainer import storage
from finetune_trainer.errors import TrainerError, exception_line
from finetune_trainer.model import StartingWeights, head_module_names
from finetune_trainer.sealing import MAGIC, Keyring, is_sealed, seal_file, unseal_bytes

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKSUM_FILE",
    "CorruptCheckpoint",
    "TrainState",
    "checkpoint_binding",
    "checkpoint_dir_name",
    "full_weights",
    "read_checkpoint",
    "restore_model",
    "restore_training",
    "stored_weights",
    "write_checkpoint",
]

CHECKPOINT_FILE: Final = "checkpoint.pt"
CHECKSUM_FILE: Final = "checkpoint.sha256"
_FORMAT: Final = 1


class CorruptCheckpoint(TrainerError):
    """A checkpoint that cannot be used: missing, truncated, or not what was written (one line)."""


_DAMAGED: Final = (
    pickle.UnpicklingError, RuntimeError, EOFError, LookupError, ValueError, TypeError, AttributeError, struct.error,
)  # fmt: skip
"""What torch.load (weights_only) raised on damaged or forged archives (random bytes, text or a cut pickle as the
archive's data.pkl, zips of other members, bit-flipped checkpoints, pickles of other objects or of torch's own rebuild
functions called with forged arguments), besides an OSError (read_checkpoint's, as a file that cannot be read): the
types a damaged checkpoint is known by. Anything that is no archive is refused before (``storage.check_torch_archive``).
Anything else (MemoryError, a bug's NameError or AssertionError) is no verdict on the file and
stops the run rather than falling back to an older checkpoint."""


@dataclass
class TrainState:
    """Where training stands after ``epoch`` epochs (1-based, 0 before the first)."""

    epoch: int = 0
    stage: str = "starting"
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    """Epochs of the current stage since its last improvement, for early stopping."""
    stopped_early: bool = False
    """The current stage (``stage``) stopped early; the next stage still runs."""
    stage_best: float | None = None
    """The best accuracy of the current stage: what an improvement must beat (by ``min_delta``)."""
    best_checkpoint: str | None = None
    """The directory name of the best epoch's checkpoint (``checkpoint_dir_name``)."""
    lineage: int = 0
    """How many times this run resumed from an older checkpoint than its latest (a corrupt one):
    re-run epochs get new checkpoint names, never those of the abandoned ones."""

    def enter_stage(self, name: str) -> None:
        """Start stage ``name``: a fresh patience (a plateau of the probe says nothing about fine-tuning)."""
        if self.stage != name:
            self.stage, self.bad_epochs, self.stage_best, self.stopped_early = name, 0, None, False

    def stage_done(self, name: str, last: int) -> bool:
        """Whether stage ``name`` (ending at epoch ``last``) has nothing left to train."""
        return self.epoch >= last or (self.stopped_early and self.stage == name)

    def observe(self, epoch: int, val_accuracy: float, min_delta: float) -> None:
        """Record epoch ``epoch``'s accuracy. The best is the maximum, the later epoch on ties (Ray's
        retention rule, see the module docstring); an improvement (for patience) must beat the stage's
        best by more than ``min_delta``."""
        if self.stage_best is None or val_accuracy - self.stage_best > min_delta:
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        if self.stage_best is None or val_accuracy > self.stage_best:
            self.stage_best = val_accuracy
        if self.best_val_accuracy is None or val_accuracy >= self.best_val_accuracy:
            self.best_val_accuracy, self.best_epoch = val_accuracy, epoch
            self.best_checkpoint = checkpoint_dir_name(epoch, self.lineage)
        self.epoch = epoch


def checkpoint_dir_name(epoch: int, lineage: int = 0) -> str:
    """The checkpoint's directory under the run dir: named by epoch, so the best one can be found again,
    and by lineage after a fallback (``TrainState.lineage``)."""
    return f"checkpoint_epoch_{epoch:04d}" + (f"_r{lineage}" if lineage else "")


def checkpoint_binding(name: str) -> str:
    """What a sealed checkpoint says it is (``sealing``'s ``bind``): its directory name. (The spec fingerprint is
    inside the encrypted payload, so it is authenticated already.)"""
    return f"checkpoint {name}/{CHECKPOINT_FILE}"


@contextmanager
def _without_zip_crc32() -> Iterator[None]:
    """``torch.save`` without the CRC32 it computes for every record of its zip file: a third of the CPU of saving
    a checkpoint (bench/README.md, "The whole epoch with 2 workers"), and it protects nothing here. ``torch.load``
    never checks it (a flipped byte loads silently either way); the checksum file, checked before every load,
    is what catches a truncated or altered checkpoint. The setting is process-wide: restored on the way out."""
    config = torch.utils.serialization.config.save
    before, config.compute_crc32 = config.compute_crc32, False
    try:
        yield
    finally:
        config.compute_crc32 = before


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
    keyring: Keyring | None = None,
    name: str | None = None,
    frozen_from: StartingWeights | None = None,
) -> None:
    """Write the checkpoint file and its checksum into ``directory``; encrypted with ``keyring``'s current
    key when given (``sealing``; the checksum is of the encrypted bytes) and bound to ``name``, the
    directory name it is stored under (by default ``checkpoint_dir_name`` of the state's epoch and lineage).
    ``frozen_from``: the model's backbone is frozen at these starting weights; only what trains is stored."""
    weights, base = stored_weights(model, frozen_from)
    content = {
        "format": _FORMAT,
        "model": weights,
        "base": base,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "train_state": dataclasses.asdict(state),
        "fingerprint": fingerprint,
        "rng": rng,
    }
    path = Path(directory) / CHECKPOINT_FILE
    if keyring is None:
        # Hashed as it is written: reading the file back for its checksum cost as much as writing it.
        with open(path, "wb") as f, _without_zip_crc32():
            writer = storage.HashingWriter(f)
            # torch.save needs only write() (and flush()) of a file object: typed IO[bytes], hence the cast.
            torch.save(content, cast(BinaryIO, writer))
        digest = writer.hexdigest()
    else:
        with _without_zip_crc32():
            torch.save(content, path)
        # Encrypted in place before it is stored: no clear copy reaches the run dir.
        sealed = Path(directory) / f".{CHECKPOINT_FILE}.sealed"
        bind = checkpoint_binding(name or checkpoint_dir_name(state.epoch, state.lineage))
        seal_file(path, sealed, keyring, bind=bind)
        sealed.replace(path)
        digest = storage.sha256_file(path)
    (Path(directory) / CHECKSUM_FILE).write_text(digest + "\n")


def read_checkpoint(
    directory: str | Path, fingerprint: str, run_dir: str, *, encrypted: bool = False, name: str | None = None
) -> dict[str, Any]:
    """The checkpoint in ``directory`` (as written by ``write_checkpoint``; ``name``: the directory name it is
    stored under, by default ``directory``'s) with ``train_state`` as a TrainState, on the CPU;
    CorruptCheckpoint when it is unreadable, fails its checksum or is encrypted without one, a TrainerError when
    it belongs to another spec, was sealed as another checkpoint, cannot be decrypted (key missing or wrong: the
    ``FINETUNE_ENCRYPTION_KEY`` keyring decrypts it) or is in the clear while ``encrypted`` is asked for."""
    path = Path(directory) / CHECKPOINT_FILE
    name = name or Path(directory).name
    expected = _expected_checksum(Path(directory), name)
    try:
        # Opened once, a plain file only: a FIFO in its place waited for a writer for ever, /dev/zero was hashed for ever.
        with storage.open_regular(path) as f:
            data = _load(f, name, expected, encrypted)
    except OSError as e:  # missing, a directory or a FIFO (open_regular), a read that failed
        raise CorruptCheckpoint(f"checkpoint {name}: {CHECKPOINT_FILE} is unreadable: {exception_line(e)}") from None
    if not isinstance(data, dict):
        raise CorruptCheckpoint(f"checkpoint {name}: {CHECKPOINT_FILE} holds a {type(data).__name__}, not a checkpoint")
    found_fp = data.get("fingerprint")
    if found_fp != fingerprint:
        raise TrainerError(
            f"output: {run_dir} holds checkpoints of a different spec "
            f"(fingerprint {quote(found_fp)}, this job {quote(fingerprint)}); "
            "a relaunch resumes only the same training spec: delete that folder, or rename the job or change output.uri"
        )
    data["train_state"] = _train_state(data, name)
    return data


def _expected_checksum(directory: Path, name: str) -> str | None:
    """The checksum file's sha256, None without one (written before checksums: torch.load's own checks are all there
    is); read to 128 bytes at most (a link to /dev/zero was read until memory ran out)."""
    try:
        raw = storage.read_bytes(str(directory / CHECKSUM_FILE), at_most=128)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CorruptCheckpoint(f"checkpoint {name}: cannot read {CHECKSUM_FILE}: {exception_line(e)}") from None
    return raw.decode("utf-8", "replace").strip()


def _load(f: BinaryIO, name: str, expected: str | None, encrypted: bool) -> Any:
    """What the open checkpoint file ``f`` holds, its checksum checked (``expected``) and decrypted when sealed."""
    if expected is not None and (found := storage.sha256_stream(f)) != expected:
        raise CorruptCheckpoint(
            f"checkpoint {name}: {CHECKPOINT_FILE} has sha256 {found[:12]}…, written as {expected[:12]}… "
            f"({os.fstat(f.fileno()).st_size} bytes; truncated or altered)"
        )
    f.seek(0)
    source: BinaryIO | io.BytesIO = f
    if is_sealed(f.read(len(MAGIC))):
        if expected is None:
            # Every sealed checkpoint was written with its checksum (sealing came after checksums): without one it
            # is an incomplete copy (Ray's copy into the run dir killed between the two files, the data maybe cut
            # short), whose decryption failure would be taken for a key problem below and stop the run.
            raise CorruptCheckpoint(
                f"checkpoint {name}: {CHECKPOINT_FILE} is encrypted but has no {CHECKSUM_FILE} (an incomplete copy)"
            )
        # The checksum matched, so a failure here is the key (missing, wrong): a TrainerError that stops
        # the run in one line, never a silent fallback to an older checkpoint or a fresh start.
        # A checkpoint sealed as another one (an older one copied over it) stops the run too: a store someone
        # tampers with is not one to fall back in silently.
        f.seek(0)
        label, bind = f"checkpoint {name}/{CHECKPOINT_FILE}", checkpoint_binding(name)
        source = io.BytesIO(unseal_bytes(f.read(), Keyring.from_env(), label, expect=bind))
    elif encrypted:
        raise TrainerError(
            f"checkpoint {name}: {CHECKPOINT_FILE} is not encrypted, but spec.output.encryption.clientSide is true; "
            "refusing a checkpoint this job did not write (delete it, or turn encryption off)"
        )
    try:
        # Before torch.load: a hostile run dir can hold a file (and its checksum) that inflates to many GB.
        storage.check_torch_archive(source, legacy=False)  # the trainer writes archives only
    except storage.UnsafeArchive as e:
        raise CorruptCheckpoint(f"checkpoint {name}: {CHECKPOINT_FILE} is {e}") from None
    try:
        # weights_only: a checkpoint is data; loading it must not be able to run code. map_location:
        # tensors saved on a GPU load anywhere; restore_training and load_state_dict move them.
        return torch.load(source, map_location="cpu", weights_only=True)
    except _DAMAGED as e:
        # c10's CPU allocator fails with a RuntimeError: memory running out, as a MemoryError is, not a damaged file.
        if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
            raise
        raise CorruptCheckpoint(f"checkpoint {name}: {CHECKPOINT_FILE} is unreadable: {exception_line(e)}") from None


def _train_state(data: dict[str, Any], name: str) -> TrainState:
    """The checkpoint's TrainState; CorruptCheckpoint when what it holds is not one (a hand-made file of the right
    fingerprint: a KeyError or TypeError traceback, later or at once)."""
    raw = data.get("train_state")
    fields = {f.name: f for f in dataclasses.fields(TrainState)}
    problem = "" if isinstance(raw, dict) else f"train state: a {type(raw).__name__}"
    for key, value in raw.items() if isinstance(raw, dict) else ():
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            problem = f"train state: unknown key {quote(key)}"
        elif not _fits(value, field.type):
            problem = f"train state: {key} {quote(value)}"
    for part in ("model", "optimizer", "scheduler", "scaler"):
        if not problem and not isinstance(data.get(part), dict):
            problem = f"{part}: a {type(data.get(part)).__name__}"
    if problem:
        raise CorruptCheckpoint(f"checkpoint {name}: {CHECKPOINT_FILE} is not a checkpoint of this trainer ({problem})")
    return TrainState(**cast(dict[str, Any], raw))


def _fits(value: object, annotation: object) -> bool:
    """Whether ``value`` fits a TrainState field annotated ``annotation`` (a string: ``from __future__ import annotations``)."""
    text = str(annotation)
    if value is None:
        return "None" in text
    if isinstance(value, bool):
        return text.startswith("bool")
    if isinstance(value, int):
        return text.startswith(("int", "float"))
    if isinstance(value, float):
        return text.startswith("float")
    return isinstance(value, str) and text.startswith("str")


def stored_weights(model: torch.nn.Module, frozen_from: StartingWeights | None) -> tuple[dict[str, Any], dict[str, str] | None]:
    """(the tensors a checkpoint stores of ``model``, its ``base`` entry). The whole state_dict and None, unless
    the backbone is frozen at ``frozen_from`` (a probe stage, which comes first: nothing trained the backbone
    before): then the trainable parameters, the head, and the buffers that moved away from the starting weights
    (BatchNorm statistics in train mode without freezeBatchNorm), with the reference and sha256 of those
    weights. A frozen parameter is not compared: no optimizer holds it, so it cannot have moved, and comparing
    would copy the whole model off the GPU every epoch, which is what this saves."""
    state = model.state_dict()
    if frozen_from is None:
        return state, None
    assert frozen_from.state is not None, "the rank that writes checkpoints keeps the starting weights"
    start, params = frozen_from.state, dict(model.named_parameters())
    kept = {
        key: value
        for key, value in state.items()
        if key not in start or (params[key].requires_grad if key in params else not torch.equal(value.detach().cpu(), start[key]))
    }
    return kept, {"reference": frozen_from.reference, "sha256": frozen_from.sha256}


def _check_base(data: dict[str, Any], start: StartingWeights | None, what: str) -> dict[str, str] | None:
    base: dict[str, str] | None = data.get("base")
    if base is None:
        return None
    if start is None or start.sha256 != base["sha256"]:
        now = "no starting weights" if start is None else f"{start.reference} (sha256 {start.sha256[:12]}…)"
        raise TrainerError(
            f"{what}: stores only what trains on top of {base['reference']} (sha256 {base['sha256'][:12]}…), "
            f"but this job starts from {now}; restore those weights, or delete the run's folder to start over"
        )
    return base


def full_weights(data: dict[str, Any], start: StartingWeights | None, what: str = "checkpoint") -> dict[str, Any]:
    """The whole model state_dict of checkpoint ``data`` (``read_checkpoint``'s dict): its own when it is a full
    one, else ``start``'s copy of the starting weights with the stored part on top; TrainerError (one line,
    naming ``what``) when the checkpoint was written on top of other starting weights than ``start``."""
    if _check_base(data, start, what) is None:
        weights: dict[str, Any] = data["model"]
        return weights
    assert start is not None and start.state is not None, "the caller keeps the starting weights"
    return {**start.state, **data["model"]}


def restore_model(model: torch.nn.Module, data: dict[str, Any], start: StartingWeights | None, what: str = "checkpoint") -> None:
    """Load checkpoint ``data`` into ``model``, freshly built from its starting weights (``start``, their
    fingerprint): a full checkpoint whole, a frozen-backbone one on top after its sha256 is checked
    (a mismatch: TrainerError, one line; never a silently different model)."""
    if _check_base(data, start, what) is None:
        model.load_state_dict(data["model"])
        return
    unexpected = [k for k in data["model"] if k not in model.state_dict()]
    if unexpected:
        raise TrainerError(f"{what}: holds tensors this model does not have ({', '.join(unexpected[:3])})")
    # strict=False lets the frozen backbone come from the rebuilt model (its sha256 was just checked); anything
    # else missing, the head's tensors above all, would stay at its fresh initialisation beside a restored optimizer.
    heads = tuple(f"{h}." for h in head_module_names(model))
    missing = [k for k in model.state_dict() if k not in data["model"] and k.startswith(heads)]
    if missing:
        raise TrainerError(
            f"{what}: lacks tensors that trained ({', '.join(missing[:3])}), which the starting weights do not "
            "hold; the checkpoint is incomplete: delete it (or the run's folder) to start over"
        )
    model.load_state_dict(data["model"], strict=False)


def restore_training(
    data: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> None:
    """Load a checkpoint's optimizer, schedule and AMP scaler (``data`` as ``read_checkpoint`` returns it)
    into those of the resumed run, whatever device and precision either ran with."""
    # The optimizer casts its floating state to each parameter's dtype and device: a CPU checkpoint
    # resumes on a GPU (and back) once the model is on its device. How the update runs (a fused kernel or torch's
    # foreach) is this run's choice for its devices (optim._fusable), not the checkpoint's: put in its groups before
    # the load, which places the step counters by those flags (on the parameter's device for a fused kernel).
    kernels = {key: optimizer.defaults[key] for key in ("fused", "foreach") if key in optimizer.defaults}
    saved = data["optimizer"]
    optimizer.load_state_dict({**saved, "param_groups": [{**group, **kernels} for group in saved["param_groups"]]})
    scheduler.load_state_dict(data["scheduler"])
    # A disabled scaler (CPU, bf16 or fp32) saves {}, which an enabled one (fp16 on a GPU) refuses to
    # load: it starts from its initial scale instead, as a fresh fp16 run does.
    if data["scaler"]:
        scaler.load_state_dict(data["scaler"])
