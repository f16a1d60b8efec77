"""Drawings of a run, for people: training curves per epoch and the validation confusion matrix.

Pure functions of the records a run keeps (``metrics_log``, ``evaluation``); they use a bare
matplotlib Figure with its own Agg canvas, never pyplot's global state, so they are safe in any thread
and any Ray worker.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Final

from finetune_operator.api.fields import display_width
from finetune_trainer.display import shown_name
from finetune_trainer.evaluation import EvalResult
from finetune_trainer.metrics_log import EpochRecord

__all__ = ["plot_confusion_matrix", "plot_training_curves"]

_STAGE_LABELS: Final = {"probe": "linear probe (frozen backbone)", "fine-tune": "fine-tune (all layers)"}
_STAGE_SHADE: Final = {"probe": "#eef3fb", "fine-tune": "#ffffff"}
_MAX_LABEL: Final = 32
"""Characters of a class name on the confusion matrix's axes; the whole names are in the model card."""


def _save(fig: Any, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # A bare Figure with its own Agg canvas: no pyplot global state, safe outside the main thread.
    FigureCanvasAgg(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, facecolor="white")


def _stage_spans(records: list[EpochRecord]) -> list[tuple[str, float, float]]:
    spans: list[tuple[str, float, float]] = []
    for r in records:
        if spans and spans[-1][0] == r.stage:
            spans[-1] = (r.stage, spans[-1][1], r.epoch + 0.5)
        else:
            spans.append((r.stage, r.epoch - 0.5, r.epoch + 0.5))
    return spans


def plot_training_curves(records: list[EpochRecord], path: str) -> None:
    """Three panels over epochs: train/validation loss (log scale when it spans more than 20×), validation
    accuracy (top-5 too when recorded, the best epoch starred), learning rate; stages are shaded and the
    probe→fine-tune switch is marked."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, MaxNLocator, PercentFormatter

    fig = Figure(figsize=(14, 4.6), layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.75]})
    if not records:
        ax_acc.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax_acc.transAxes)
        _save(fig, path)
        return
    epochs = [r.epoch for r in records]
    style = {"marker": "o", "markersize": 3.5, "linewidth": 1.8}
    ax_loss.plot(epochs, [r.train_loss for r in records], label="train", color="#1f77b4", **style)
    ax_loss.plot(epochs, [r.val_loss for r in records], label="validation", color="#d62728", **style)
    ax_acc.plot(epochs, [100 * r.val_accuracy for r in records], label="validation top-1", color="#2ca02c", **style)
    if any(r.val_top5 is not None for r in records):
        top5 = [math.nan if r.val_top5 is None else 100 * r.val_top5 for r in records]
        ax_acc.plot(epochs, top5, label="validation top-5", color="#9467bd", linestyle="--", **style)
    best = max((r for r in records if math.isfinite(r.val_accuracy)), key=lambda r: r.val_accuracy, default=None)
    if best is not None:
        ax_acc.plot(
            [best.epoch],
            [100 * best.val_accuracy],
            marker="*",
            markersize=15,
            color="#ff7f0e",
            linestyle="none",
            label=f"best {100 * best.val_accuracy:.2f}% (epoch {best.epoch})",
            zorder=5,
            clip_on=False,  # the best epoch is often the last one, at the panel's edge
        )
    loss_title = "loss"
    losses = [v for r in records for v in (r.train_loss, r.val_loss) if math.isfinite(v)]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
        # A first epoch far off (a randomly initialised head: validation loss 60+) flattens a linear axis.
        ax_loss.set_yscale("log")
        loss_title = "loss (log scale)"
    ax_lr.plot(epochs, [r.lr for r in records], color="#7f7f7f", **style)
    if all(r.lr > 0 for r in records) and max(r.lr for r in records) / min(r.lr for r in records) > 20:
        ax_lr.set_yscale("log")

    spans = _stage_spans(records)
    for ax in (ax_loss, ax_acc, ax_lr):
        for i, (stage, start, end) in enumerate(spans):
            ax.axvspan(start, end, color=_STAGE_SHADE.get(stage, "#f5f5f5"), zorder=0)
            if i:
                ax.axvline(start, color="#444444", linestyle=":", linewidth=1.2, zorder=1)
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        # Whole epochs only; MaxNLocator alone falls back to fractions when there are one or two epochs.
        ax.xaxis.set_major_locator(FixedLocator(epochs) if len(epochs) <= 12 else MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    if len(spans) > 1:
        # Stage names over the accuracy panel, where the switch matters most.
        for stage, start, end in spans:
            ax_acc.text(
                (start + end) / 2,
                1.01,
                _STAGE_LABELS.get(stage, stage),
                transform=ax_acc.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="#444444",
            )
    ax_loss.set_title(loss_title)
    ax_acc.set_title("accuracy", pad=16 if len(spans) > 1 else 6)
    ax_lr.set_title("learning rate")
    ax_loss.legend(loc="best")
    ax_acc.legend(loc="best")
    ax_acc.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    lo = min(100 * r.val_accuracy for r in records if math.isfinite(r.val_accuracy)) if best else 0.0
    ax_acc.set_ylim(max(0.0, lo - 5), 101)
    _save(fig, path)


def plot_confusion_matrix(result: EvalResult, path: str) -> None:
    """Counts per (true, predicted) class, coloured by the fraction of the true class (so that rare
    classes are as readable as common ones); counts are printed in the cells up to 30 classes."""
    from matplotlib.figure import Figure
    from sklearn.metrics import confusion_matrix

    n = len(result.class_names)
    counts = confusion_matrix(result.y_true, result.y_pred, labels=list(range(n)))
    rows = counts.sum(axis=1, keepdims=True)
    fractions = counts / rows.clip(min=1)
    side = min(18.0, max(5.0, 1.6 + 0.55 * n))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = list(range(n))
    # Names from folder names or a card: escaped and cut, since a long one squeezed the matrix to nothing (and one of
    # 100,000 characters took matplotlib 27 s to lay out), and a control character has no glyph.
    names = [shown_name(name, _MAX_LABEL) for name in result.class_names]
    # Tilted labels only when upright ones would collide: long names or many classes.
    tilt = max(map(display_width, names), default=0) * min(n, 40) > 60  # columns: a wide character takes two
    # As written, not mathtext: a name between two '$' ('$\foo$', a legal folder name) failed savefig.
    ax.set_xticks(ticks, names, rotation=45 if tilt else 0, ha="right" if tilt else "center", parse_math=False)
    ax.set_yticks(ticks, names, parse_math=False)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    dark = fractions[i, j] > 0.55
                    ax.text(
                        j,
                        i,
                        str(counts[i, j]),
                        ha="center",
                        va="center",
                        fontsize=9 if n <= 15 else 7,
                        color="white" if dark else "#222222",
                    )
    total = int(counts.sum())
    accuracy = float(counts.trace()) / total if total else 0.0
    ax.set_title(f"confusion matrix: {total} validation images, accuracy {100 * accuracy:.2f}%")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    _save(fig, path)
