"""The per-epoch metrics log of a run, ``<run dir>/metrics.jsonl``: one ``EpochRecord`` per line.

Appended by rank 0 every epoch (``append_metrics``), read back for the training curves, the model card
and the driver's result (``read_metrics``). Keys are camelCase, like every other file we write; a
non-finite number (a diverged loss) is written as null, which strict JSON readers accept.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Final

from pydantic.alias_generators import to_camel

from finetune_trainer import storage
from finetune_trainer.errors import ArtifactError

__all__ = ["METRICS_FILE", "EpochRecord", "MetricsLog", "append_metrics", "read_metrics"]

METRICS_FILE: Final = "metrics.jsonl"


@dataclass
class EpochRecord:
    """One finished epoch, as the loop reports it; one line of ``metrics.jsonl`` (camelCase keys)."""

    epoch: int
    stage: str
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_top5: float | None
    images_per_second: float
    epoch_seconds: float
    lr: float

    def to_wire(self) -> dict[str, Any]:
        # A diverged loss is NaN, which strict JSON readers (jq, JavaScript) reject: written as null.
        return {to_camel(k): (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> EpochRecord:
        """Lenient: a null (a diverged epoch, see ``to_wire``) or absent number reads as NaN."""

        def num(key: str) -> float:
            value = raw.get(key)
            return math.nan if value is None else float(value)

        top5 = raw.get("valTop5")
        return cls(
            epoch=int(raw["epoch"]),
            stage=str(raw.get("stage", "")),
            train_loss=num("trainLoss"),
            val_loss=num("valLoss"),
            val_accuracy=num("valAccuracy"),
            val_top5=None if top5 is None else float(top5),
            images_per_second=num("imagesPerSecond"),
            epoch_seconds=num("epochSeconds"),
            lr=num("lr"),
        )


def append_metrics(run_dir: str, record: EpochRecord) -> None:
    """Add ``record`` to ``<run_dir>/metrics.jsonl``. A resumed run re-reports epochs it had already
    reported before it stopped: the record replaces that epoch and drops any later ones (they belong to
    the abandoned attempt), so the log is always one line per epoch of the run that continues."""
    MetricsLog(run_dir).append(record)


class MetricsLog:
    """``append_metrics`` for a writer that appends every epoch (the loop's rank 0): the file is read once,
    then kept in memory, so that each epoch costs one write (one PUT on an object store) instead of a read
    and a write. Only rank 0 of one attempt writes the file, so the copy in memory stays what is stored."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.records = read_metrics(run_dir)

    def append(self, record: EpochRecord) -> None:
        self.records = [r for r in self.records if r.epoch < record.epoch] + [record]
        _write(self.run_dir, self.records)


def _write(run_dir: str, records: list[EpochRecord]) -> None:
    lines = [json.dumps(r.to_wire()) for r in records]
    # Rewritten whole (it is a few KiB): atomic locally, one PUT on object stores, which cannot append.
    storage.write_text(storage.join(run_dir, METRICS_FILE), "\n".join(lines) + "\n")


def read_metrics(run_dir: str) -> list[EpochRecord]:
    """The records of ``<run_dir>/metrics.jsonl`` in epoch order; none if the file does not exist yet."""
    uri = storage.join(run_dir, METRICS_FILE)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        return []
    records: dict[int, EpochRecord] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = EpochRecord.from_wire(json.loads(line))
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{uri} line {n}: not an epoch record ({e}): {line[:80]!r}") from None
        records[record.epoch] = record
    return [records[k] for k in sorted(records)]
