"""A weights file's head is reused only when its model card shows the very same classes, in order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_trainer.inputs import InputSpec
from finetune_trainer.loop import _same_classes_as_source


def _artifact_dir(tmp_path: Path, class_names: list[str] | None) -> Path:
    (tmp_path / "model.pt").write_bytes(b"weights")
    if class_names is not None:
        spec = InputSpec(
            image_size=32,
            resize_size=32,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bilinear",
            grayscale_to_rgb=True,
        )
        card = {
            "architecture": {"name": "resnet18"},
            "classNames": class_names,
            "input": spec.to_wire(),
            "files": {"model.pt": {"sha256": "0" * 64, "bytes": 7}},
        }
        (tmp_path / "model.json").write_text(json.dumps(card))
    return tmp_path / "model.pt"


@pytest.mark.parametrize(
    ("source_classes", "target_classes", "reuse"),
    [
        (["0", "1", "2"], ["0", "1", "2"], True),
        (["0", "1", "2", "3", "4"], ["5", "6", "7", "8", "9"], False),  # the demo: same size, other classes
        (["0", "1", "2"], ["2", "1", "0"], False),  # same classes, other order: indices would be wrong
        (None, ["0", "1", "2"], False),  # a bare state_dict says nothing about its classes
    ],
)
def test_head_reuse(tmp_path: Path, source_classes: list[str] | None, target_classes: list[str], reuse: bool) -> None:
    weights = _artifact_dir(tmp_path, source_classes)
    assert _same_classes_as_source(str(weights), target_classes) is reuse


def test_no_weights_file_means_no_reuse() -> None:
    assert _same_classes_as_source(None, ["a", "b"]) is False
