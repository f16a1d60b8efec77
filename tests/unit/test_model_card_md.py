"""README.md, the model card for people: rendered from the typed card alone, Hugging Face front matter that
parses, and user-controlled strings (class names, job name, URIs, warnings) that inject nothing."""

from __future__ import annotations

import html
from typing import Any

import pytest
import yaml
from markdown_it import MarkdownIt

from finetune_trainer.model_card import ModelCard
from finetune_trainer.model_card_md import md_text, render_readme

HOSTILE = [
    "</td><script>alert(1)</script>",
    "a | b",
    "---",
    "x\n---\nlicense: mit",
    "[click](javascript:alert(1))",
    "![pixel](http://evil.example/p.png)",
    "**bold** _it_ `code`",
    "# heading",
    "<img src=x onerror=alert(1)>",
    "quote \" and ' and &amp;",
    "back\\slash",
    "1. list",
]
JOB = 'evil"job\n---\n<b>x</b>'


def card(class_names: list[str], **extra: Any) -> ModelCard:
    n = len(class_names)
    raw: dict[str, Any] = {
        "job": {"name": JOB, "namespace": "ml", "uid": None},
        "architecture": {"name": "resnet18", "family": "resnet"},
        "weights": {"source": "torchvision", "name": "ResNet18_Weights.IMAGENET1K_V1", "requested": "DEFAULT"},
        "classNames": class_names,
        "input": {
            "imageSize": 32,
            "resizeSize": 32,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "interpolation": "bilinear",
            "grayscaleToRgb": False,
        },
        "data": {"format": "imagefolder", "trainUri": "s3://bkt/[x](y)", "trainImages": 120, "validationImages": 30},
        "recipe": {
            "strategy": "full",
            "epochs": 5,
            "batchSize": 8,
            "passesPerEpoch": 3,
            "optimizer": "adamw",
            "learningRate": 0.001,
            "scheduler": "cosine",
            "chosen": "batch size 8 (automatic: 120 training images; 3 passes per epoch)",
        },
        "metrics": {"final": None, "best": {"valAccuracy": 0.5, "epoch": 4}, "epochs": 5},
        "evaluation": {
            "accuracy": 0.5,
            "macroPrecision": 0.4,
            "macroRecall": 0.45,
            "macroF1": 0.42,
            "weightedF1": 0.43,
            "numSamples": 10 * n,
            "report": "evaluation.json",
            "classes": [
                {"name": c, "precision": 0.25, "recall": 0.5, "f1": 1 / 3, "support": 10 + i} for i, c in enumerate(class_names)
            ],
            "minAccuracy": 0.9,
        },
        "warnings": ["BatchNorm <collapse> | see [docs](http://x)"],
        "files": {"model.pt": {"sha256": "0" * 64, "bytes": 1}},
    }
    raw.update(extra)
    return ModelCard.model_validate(raw)


def split(text: str) -> tuple[dict[str, Any], str]:
    lines = text.split("\n")
    assert lines[0] == "---"
    end = lines.index("---", 1)
    assert lines.count("---") == 2, "only the front matter's own fences may be a bare ---"
    front = yaml.safe_load("\n".join(lines[1:end]))
    assert isinstance(front, dict)
    return front, "\n".join(lines[end + 1 :])


def test_front_matter_is_hugging_face_yaml_and_keeps_hostile_names_intact() -> None:
    front, _ = split(render_readme(card(HOSTILE), confusion_matrix="confusion_matrix.png"))
    assert front["license"] == "other"
    assert front["pipeline_tag"] == "image-classification"
    assert {"image-classification", "torchvision", "resnet18"} <= set(front["tags"])
    assert front["metrics"] == ["accuracy", "f1"]
    (entry,) = front["model-index"]
    assert entry["name"] == JOB  # escaped, not truncated or mangled
    metrics = {m["type"]: m["value"] for m in entry["results"][0]["metrics"]}
    assert metrics == {"accuracy": 0.5, "f1": 0.42, "precision": 0.4, "recall": 0.45}
    assert entry["results"][0]["dataset"]["name"] == "s3://bkt/[x](y)"


def rendered(text: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(split(text)[1])


def test_hostile_names_inject_no_markup() -> None:
    out = rendered(render_readme(card(HOSTILE), confusion_matrix="confusion_matrix.png"))
    assert "<script" not in out and "<b>" not in out and "<a " not in out
    assert out.count("<img") == 1 and 'src="confusion_matrix.png"' in out  # the confusion matrix, nothing else
    assert out.count("<h1>") == 1 and "<strong>" in out  # only the card's own emphasis (the gate line)


def test_per_class_table_has_one_intact_row_per_class() -> None:
    out = rendered(render_readme(card(HOSTILE), confusion_matrix=None))
    body = out.split("<th>class</th>", 1)[1].split("</tbody>", 1)[0]
    rows = body.split("<tr>")[1:]  # the body rows
    assert len(rows) == len(HOSTILE) + 1  # the classes, then the macro average
    for name, row in zip(HOSTILE, rows, strict=False):
        cells = row.split("<td")[1:]
        assert len(cells) == 5, row
        text = html.unescape(cells[0].split(">", 1)[1].split("</td>", 1)[0])
        assert text == " ".join(name.splitlines())  # line breaks become spaces, the rest reads as written
    assert "<img" not in out


def test_sections_come_from_the_card() -> None:
    text = render_readme(card(["zero", "one"]), confusion_matrix="confusion_matrix.png")
    _, body = split(text)
    for heading in ["## Classes", "## Data", "## Recipe", "## Metrics", "## Limitations"]:
        assert heading in body
    assert "| train | 120 |" in body and "| validation | 30 |" in body
    assert "| zero | 0.2500 | 0.5000 | 0.3333 | 10 |" in body
    assert "3 passes over the training images per epoch" in body
    assert "batch size 8 \\(automatic\\: 120 training images\\; 3 passes per epoch\\)" in body
    assert "Evaluated on 20 validation images, the smallest class 10" in body
    assert "**Below the accuracy gate**: best validation accuracy 0.5000 is below minAccuracy 0.9" in body
    assert "**Warning**: BatchNorm &lt;collapse&gt; \\| see \\[docs\\]\\(http\\:\\/\\/x\\)" in body


@pytest.mark.parametrize(
    ("extra", "absent"),
    [
        (
            {"evaluation": None, "data": None, "recipe": None, "warnings": []},
            ["**Warning**", "Below the accuracy gate", "| train |"],
        ),
        ({"metrics": {"final": None, "best": {"valAccuracy": 0.95, "epoch": 4}, "epochs": 5}}, ["Below the accuracy gate"]),
    ],
)
def test_least_card_and_passed_gate_render_without_those_lines(extra: dict[str, Any], absent: list[str]) -> None:
    text = render_readme(card(["a", "b"], **extra), confusion_matrix=None)
    split(text)
    for line in absent:
        assert line not in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [("plain name", "plain name"), ("a|b", "a\\|b"), ("<x>", "&lt;x&gt;"), ("l1\nl2\r", "l1 l2 "), ("x" * 300, "x" * 200 + "…")],
)
def test_md_text(value: str, expected: str) -> None:
    assert md_text(value) == expected
