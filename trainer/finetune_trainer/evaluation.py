"""The final evaluation of a run: the validation predictions (``EvalResult``) and the report computed
from them (``evaluation_report``), written as ``evaluation.json`` and summarised in the model card."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_trainer.errors import ArtifactError

__all__ = ["EvalResult", "evaluation_report"]


@dataclass
class EvalResult:
    """Final predictions on the validation set; labels are indices into ``class_names``."""

    y_true: list[int]
    y_pred: list[int]
    class_names: list[str]


def evaluation_report(result: EvalResult) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, their macro and support-weighted averages, and the
    confusion matrix (rows: true class, columns: predicted), in class-index order. A class never
    predicted has precision 0 (scikit-learn's ``zero_division=0``), not NaN."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    n = len(result.class_names)
    if len(result.y_true) != len(result.y_pred):
        raise ArtifactError(f"y_true has {len(result.y_true)} labels but y_pred has {len(result.y_pred)}")
    bad = sorted({y for y in [*result.y_true, *result.y_pred] if not 0 <= y < n})
    if bad:
        raise ArtifactError(f"labels {bad[:5]} are outside 0..{n - 1} ({n} class names)")
    labels = list(range(n))
    p, r, f, s = precision_recall_fscore_support(result.y_true, result.y_pred, labels=labels, zero_division=0)
    per_class: list[dict[str, Any]] = [
        {"index": i, "name": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(result.class_names)
    ]
    total = int(s.sum())

    def average(weights: list[float]) -> dict[str, float | int]:
        norm = sum(weights) or 1.0
        return {
            key: sum(w * row[key] for w, row in zip(weights, per_class, strict=True)) / norm
            for key in ("precision", "recall", "f1")
        } | {"support": total}

    correct = sum(t == q for t, q in zip(result.y_true, result.y_pred, strict=True))
    return {
        "accuracy": correct / total if total else 0.0,
        "numSamples": total,
        "classes": per_class,
        "macroAvg": average([1.0] * n),
        "weightedAvg": average([float(x) for x in s]),
        "confusionMatrix": {
            "labels": list(result.class_names),
            "rows": "true class",
            "columns": "predicted class",
            "matrix": confusion_matrix(result.y_true, result.y_pred, labels=labels).tolist(),
        },
    }
