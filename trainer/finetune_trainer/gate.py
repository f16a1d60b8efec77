"""The evaluation gate (``spec.evaluation.minAccuracy``): the last word on a finished run, pure and table-tested.

Checked after the run's artifacts are written (``__main__`` on a cluster, ``finetune run`` locally), so a model
that misses the gate is kept for inspection while the job still fails. The failure is the trainer's one
``error:`` line, starting with ``BelowAccuracyGate:``, which the operator turns into the Failed condition's reason
(``finetune_operator.status``): a pipeline branches on ``finetune wait``'s exit code and never promotes the model.
"""

from __future__ import annotations

from typing import Final

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.errors import TrainerError

GATE_REASON: Final = "BelowAccuracyGate"


def check_accuracy_gate(spec: FineTuneJobSpec, best_val_accuracy: float | None, best_epoch: int | None, run_dir: str) -> None:
    """Raise TrainerError (``BelowAccuracyGate: …``) when the best validation accuracy misses ``minAccuracy``."""
    gate = spec.evaluation.min_accuracy
    if gate is None:
        return
    if best_val_accuracy is None:
        raise TrainerError(
            f"{GATE_REASON}: no validation accuracy was recorded, so spec.evaluation.minAccuracy {gate:g} cannot be met; "
            f"the artifacts are kept in {run_dir}"
        )
    if best_val_accuracy < gate:
        at = f" (epoch {best_epoch})" if best_epoch is not None else ""
        raise TrainerError(
            f"{GATE_REASON}: best validation accuracy {best_val_accuracy:.4f}{at} is below spec.evaluation.minAccuracy "
            f"{gate:g}; the model is not promoted, its artifacts are kept in {run_dir}"
        )
