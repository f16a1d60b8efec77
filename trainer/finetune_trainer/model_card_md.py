"""The human-readable model card, ``README.md``: a rendering of the typed ``ModelCard``, in the Hugging Face
model-card style (YAML front matter with license, tags, metrics and a ``model-index``, then the sections).

Nothing is computed here that the typed card does not hold, so ``model.json`` stays the one source of truth.
Every string a user controls (class names, job name, URIs, warnings) goes through ``md_text`` in the body,
never inside a code span (where escapes do not apply), and ``_yaml_str`` in the front matter, so that a
class called ``</td><script>`` or ``---`` can neither inject markdown/HTML nor end the front matter.
Pure: no torch; called by ``artifacts``.
"""

from __future__ import annotations

import json
import string
from typing import Final

from finetune_trainer.model_card import ModelCard, TorchvisionWeights, UriWeights

__all__ = ["README_FILE", "md_text", "render_readme"]

README_FILE: Final = "README.md"
_ENTITIES: Final = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
_MAX_SHOWN: Final = 200
"""Characters of one user string shown in the body; the full value is in model.json."""


def md_text(value: object) -> str:
    """``value`` as inert inline markdown text: HTML's special characters as entities, every other ASCII
    punctuation mark backslash-escaped (CommonMark allows it for all of them, so no emphasis, link, table
    cell break or heading can start), line breaks and other control characters as spaces."""
    text = str(value)
    if len(text) > _MAX_SHOWN:
        text = text[:_MAX_SHOWN] + "…"
    out: list[str] = []
    for ch in text:
        if ch in _ENTITIES:
            out.append(_ENTITIES[ch])
        elif ch in string.punctuation:
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(" ")
    return "".join(out)


def _yaml_str(value: object) -> str:
    # A JSON string is a YAML double-quoted scalar: one line, everything escaped, nothing can end the block.
    return json.dumps(str(value), ensure_ascii=True)


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _front_matter(card: ModelCard) -> list[str]:
    job = card.job.name if card.job else card.architecture.name
    tags = ["image-classification", "torchvision", "finetune-operator", card.architecture.name]
    if card.architecture.family:
        tags.append(card.architecture.family)
    lines = ["---", "license: other", "library_name: pytorch", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {_yaml_str(tag)}" for tag in dict.fromkeys(tags)]
    if card.weights is not None and isinstance(card.weights, TorchvisionWeights):
        lines.append(f"base_model: {_yaml_str('torchvision/' + card.weights.name)}")
    ev = card.evaluation
    if ev is not None:
        lines += ["metrics:", "- accuracy", "- f1", "model-index:", f"- name: {_yaml_str(job)}", "  results:"]
        lines += ["  - task:", "      type: image-classification", "      name: Image Classification"]
        lines += ["    dataset:", f"      name: {_yaml_str(_data_source(card))}", "      type: imagefolder"]
        lines += ["    metrics:"]
        for kind, value, name in [
            ("accuracy", ev.accuracy, "Validation accuracy"),
            ("f1", ev.macro_f1, "Macro F1"),
            ("precision", ev.macro_precision, "Macro precision"),
            ("recall", ev.macro_recall, "Macro recall"),
        ]:
            lines += [f"    - type: {kind}", f"      value: {value:.6g}", f"      name: {name}"]
    return [*lines, "---", ""]


def _data_source(card: ModelCard) -> str:
    data = card.data
    if data is None:
        return "unknown"
    return data.train_uri or data.format


def _weights_line(card: ModelCard) -> str:
    w = card.weights
    if isinstance(w, TorchvisionWeights):
        return f"torchvision {md_text(w.name)} (requested as {md_text(w.requested)})"
    if isinstance(w, UriWeights):
        return f"from {md_text(w.uri)}"
    return "none (trained from scratch)" if w is not None else "not recorded"


def _per_class_table(card: ModelCard) -> list[str]:
    ev = card.evaluation
    if ev is None or not ev.classes:
        return ["No per-class evaluation was recorded.", ""]
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {md_text(c.name)} | {c.precision:.4f} | {c.recall:.4f} | {c.f1:.4f} | {c.support} |" for c in ev.classes]
    lines.append(f"| macro average | {ev.macro_precision:.4f} | {ev.macro_recall:.4f} | {ev.macro_f1:.4f} | {ev.num_samples} |")
    return [*lines, ""]


def _limitations(card: ModelCard) -> list[str]:
    items: list[str] = []
    ev = card.evaluation
    if ev is not None:
        per_class = min((c.support for c in ev.classes), default=None)
        smallest = f", the smallest class {per_class}" if per_class is not None else ""
        items.append(
            f"Evaluated on {ev.num_samples} validation images{smallest}: the numbers above carry that much sampling error."
        )
        # The gate judges what ships (``gate.check_accuracy_gate``): the best epoch's weights, or the last epoch's.
        shipped = card.metrics.shipped if card.metrics else None
        other = shipped is not None and card.metrics is not None and shipped.epoch != card.metrics.best.epoch
        judged = shipped if other else (card.metrics.best if card.metrics else None)
        best = judged.val_accuracy if judged is not None else None
        what = "validation accuracy of the shipped model (not the best epoch's)" if other else "best validation accuracy"
        if ev.min_accuracy is not None and (best is None or best < ev.min_accuracy):
            items.append(
                f"**Below the accuracy gate**: {what} {_num(best)} is below "
                f"minAccuracy {ev.min_accuracy:g}; this model was not promoted."
            )
    items += [f"**Warning**: {md_text(w)}" for w in card.warnings]
    items.append("Trained and evaluated only on the classes listed above; other inputs still get one of them.")
    return [*(f"- {item}" for item in items), ""]


def render_readme(card: ModelCard, *, confusion_matrix: str | None) -> str:
    """The README.md text of ``card``; ``confusion_matrix`` is the file name of its image, if written."""
    job = card.job.name if card.job else card.architecture.name
    out = _front_matter(card)
    out += [f"# {md_text(job)}", ""]
    out += [
        f"Image classification: a fine-tuned torchvision {md_text(card.architecture.name)} that sorts "
        f"{card.input.image_size}×{card.input.image_size} RGB images into {len(card.class_names)} classes. "
        "Generated from `model.json`, which holds every number below.",
        "",
        "## Classes",
        "",
        *(f"{i}. {md_text(name)}" for i, name in enumerate(card.class_names)),
        "",
        "## Data",
        "",
    ]
    data = card.data
    if data is None:
        out += ["Not recorded.", ""]
    else:
        out += [
            f"- format: {md_text(data.format)}",
            f"- training images: {md_text(data.train_uri or data.format)}",
            f"- validation images: {md_text(data.validation_uri or 'held out from the training images')}",
            "",
            "| split | images |",
            "|---|---:|",
            f"| train | {data.train_images if data.train_images is not None else '—'} |",
            f"| validation | {data.validation_images if data.validation_images is not None else '—'} |",
            "",
        ]
    out += ["## Recipe", "", f"- model: {md_text(card.architecture.name)}", f"- weights: {_weights_line(card)}"]
    recipe = card.recipe
    if recipe is not None:
        out += [
            f"- strategy: {md_text(recipe.strategy)}",
            f"- epochs: {recipe.epochs}, batch size {recipe.batch_size if recipe.batch_size is not None else '—'}"
            + (
                f", {recipe.passes_per_epoch} passes over the training images per epoch"
                if (recipe.passes_per_epoch or 1) > 1
                else ""
            ),
            f"- optimizer: {md_text(recipe.optimizer)}, learning rate {recipe.learning_rate:g}, "
            f"{md_text(recipe.scheduler)} schedule",
            f"- chosen by the defaults: {md_text(recipe.chosen) if recipe.chosen else 'nothing (the spec set the batch size)'}",
        ]
    out += ["", "## Metrics", ""]
    if card.evaluation is not None:
        ev = card.evaluation
        best = card.metrics.best if card.metrics else None
        out += [
            f"Final evaluation of the shipped weights on {ev.num_samples} validation images: accuracy {ev.accuracy:.4f}, "
            f"macro F1 {ev.macro_f1:.4f}, weighted F1 {ev.weighted_f1:.4f}"
            + (f" (best epoch {best.epoch})." if best and best.epoch is not None else "."),
            "",
        ]
    out += _per_class_table(card)
    if confusion_matrix is not None:
        out += [f"![Confusion matrix]({confusion_matrix})", ""]
    out += ["## Limitations", ""]
    out += _limitations(card)
    return "\n".join(out)
