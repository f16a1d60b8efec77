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


def check_accuracy_gate(
    spec: FineTuneJobSpec,
    best_val_accuracy: float | None,
    best_epoch: int | None,
    run_dir: str,
    shipped: tuple[float | None, int] | None = None,
) -> None:
    """Raise TrainerError (``BelowAccuracyGate: …``) when the model that ships misses ``minAccuracy``: the best
    epoch's, or ``shipped`` (validation accuracy, epoch: the model card's ``metrics.shipped``) when that is another
    epoch's (the best checkpoint was unusable and model.pt holds the last epoch's weights). Gating on the best epoch
    then passed a model.pt below the gate."""
    gate = spec.evaluation.min_accuracy
    if gate is None:
        return
    what = "best validation accuracy"
    if shipped is not None and shipped[1] != best_epoch:
        (best_val_accuracy, best_epoch), what = shipped, "validation accuracy of the shipped model (not the best epoch's)"
    if best_val_accuracy is None:
        raise TrainerError(
            f"{GATE_REASON}: no validation accuracy was recorded, so spec.evaluation.minAccuracy {gate:g} cannot be met; "
            f"the artifacts are kept in {run_dir}"
        )
    if best_val_accuracy < gate:
        at = f" (epoch {best_epoch})" if best_epoch is not None else ""
        raise TrainerError(
            f"{GATE_REASON}: {what} {best_val_accuracy:.4f}{at} is below spec.evaluation.minAccuracy "
            f"{gate:g}; the model is not promoted, its artifacts are kept in {run_dir}"
        )
