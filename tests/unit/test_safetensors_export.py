"""`spec.output.exports: [safetensors]`: model.safetensors holds exactly model.pt's tensors, its metadata
names the architecture and the classes, and `finetune predict --format safetensors` serves it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune_trainer import storage
from finetune_trainer.errors import ArtifactError
from finetune_trainer.inputs import InputSpec
from finetune_trainer.predict import load_for_inference, predict, predict_command
from tests.support.tiny_model import write_tiny_artifacts

CLASSES = ["cat", "dog", "hamster"]
INPUT = InputSpec(
    image_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear", grayscale_to_rgb=False
)
REPO = Path(__file__).resolve().parents[2]


def write(root: Path, exports: list[str]) -> Path:
    return write_tiny_artifacts(root, CLASSES, INPUT, output={"exports": exports}, labels=[0, 1, 2, 0]).run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("out"), ["state_dict", "safetensors"])


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8), "RGB").save(path)
    return path


def test_safetensors_holds_the_same_tensors_as_model_pt(run_dir: Path) -> None:
    pt = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    st = load_file(run_dir / "model.safetensors")
    assert list(st) and sorted(st) == sorted(pt)
    for key, tensor in pt.items():
        assert st[key].dtype == tensor.dtype and torch.equal(st[key], tensor), key


def test_safetensors_metadata_names_architecture_and_classes(run_dir: Path) -> None:
    with safe_open(str(run_dir / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["architecture"] == "resnet18"
    assert json.loads(metadata["classNames"]) == CLASSES


def test_card_lists_the_export_with_its_checksum(run_dir: Path) -> None:
    card = json.loads((run_dir / "model.json").read_text())
    assert card["exports"] == {"state_dict": "model.pt", "safetensors": "model.safetensors"}
    assert card["files"]["model.safetensors"]["sha256"] == storage.sha256_file(run_dir / "model.safetensors")


def test_predict_from_safetensors_gives_model_pt_outputs(run_dir: Path, image: Path) -> None:
    from_pt, transform, names = load_for_inference(str(run_dir), "state_dict")
    from_st, _, st_names = load_for_inference(str(run_dir), "safetensors")
    assert names == st_names == CLASSES
    with Image.open(image) as im:
        assert predict(from_st, transform, [im], 3) == predict(from_pt, transform, [im], 3)


def test_finetune_predict_format_safetensors_cli(run_dir: Path, image: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")])}
    command = [
        sys.executable,
        "-m",
        "finetune_operator.cli",
        "predict",
        "--model",
        str(run_dir),
        "--format",
        "safetensors",
        str(image),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(image) and len(lines) == 1 + len(CLASSES)


def test_format_not_exported_is_one_line(tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = write(tmp_path, ["state_dict"])
    assert not (plain / "model.safetensors").exists()
    assert predict_command(argparse.Namespace(model=str(plain), images=[str(image)], top_k=1, format="safetensors")) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        f"error: {plain / 'model.safetensors'}: the model card lists no model.safetensors; the job did not export "
        "safetensors (spec.output.exports), use --format state_dict"
    ]


def test_safetensors_of_another_architecture_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "pets"
    shutil.copytree(run_dir, copy)
    save_file(load_file(copy / "model.safetensors"), str(copy / "model.safetensors"), metadata={"architecture": "vgg11"})
    card = json.loads((copy / "model.json").read_text())
    card["files"]["model.safetensors"]["sha256"] = storage.sha256_file(copy / "model.safetensors")
    card["files"]["model.safetensors"]["bytes"] = (copy / "model.safetensors").stat().st_size
    (copy / "model.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="metadata names architecture 'vgg11' but the model card 'resnet18'"):
        load_for_inference(str(copy), "safetensors")


def test_a_relaunch_without_an_export_removes_the_earlier_one(tmp_path: Path) -> None:
    """output.exports is not part of the spec's fingerprint, so a relaunch may drop one: the earlier launch's
    model.safetensors (old weights under a model file's name, unlisted by the new card) stayed beside the new card."""
    from finetune_trainer.verify import verify_artifacts

    first = write(tmp_path, ["state_dict", "safetensors"])
    assert (first / "model.safetensors").exists()
    again = write(tmp_path, ["state_dict"])
    assert again == first and not (again / "model.safetensors").exists()
    verify_artifacts(str(again))  # nothing unlisted, nothing missing
