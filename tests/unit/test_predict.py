"""`finetune predict`: artifacts of a tiny model in, top-k labels with probabilities out; tampered or
missing files and unreadable images give one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finetune_operator.api.fields import display_width
from finetune_trainer.inputs import InputSpec
from finetune_trainer.metrics_log import EpochRecord, append_metrics, read_metrics
from finetune_trainer.model_card import load_model_card
from finetune_trainer.predict import image_transform, load_for_inference, predict_command
from tests.support.tiny_model import write_tiny_artifacts
from tests.support.torch_files import bomb, never_loaded

CLASSES = ["cat", "dog", "hamster-long-name"]
INPUT = InputSpec(
    image_size=32,
    resize_size=36,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    interpolation="bilinear",
    grayscale_to_rgb=False,
)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    run = write_tiny_artifacts(tmp_path_factory.mktemp("out"), CLASSES, INPUT, labels=[0, 1, 2, 0])
    return run.run_dir, run.model


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = [folder / "photo.png", folder / "scan.jpg", folder / "icon.png"]
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), "RGB").save(paths[0])
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), "L").save(paths[1])
    Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8), "RGBA").save(paths[2])
    return paths


def run(model: Path | str, paths: Sequence[Path | str], top_k: int = 3) -> int:
    return predict_command(argparse.Namespace(model=str(model), images=[str(p) for p in paths], top_k=top_k))


def parse(out: str) -> dict[str, list[tuple[str, float]]]:
    """``path`` lines, each followed by ``  label  probability`` lines."""
    result: dict[str, list[tuple[str, float]]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("  "):
            label, prob = line.strip().rsplit(maxsplit=1)
            result[current].append((label, float(prob)))
        else:
            current = line
            result[current] = []
    return result


@pytest.mark.parametrize("top_k", [1, 2, 10])
def test_prints_top_k_labels_with_sorted_probabilities(
    model_dir: tuple[Path, nn.Module], images: list[Path], top_k: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(model_dir[0], images, top_k) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    predictions = parse(captured.out)
    assert list(predictions) == [str(p) for p in images]  # in the order given
    for top in predictions.values():
        assert len(top) == min(top_k, len(CLASSES))
        labels, probs = zip(*top, strict=True)
        assert set(labels) <= set(CLASSES)
        assert len(set(labels)) == len(labels)
        assert list(probs) == sorted(probs, reverse=True)
        assert all(0 <= p <= 1 for p in probs)
        assert sum(probs) <= 1 + 1e-3  # printed with 4 decimals
        if top_k >= len(CLASSES):
            assert sum(probs) == pytest.approx(1, abs=1e-3)


def test_probabilities_line_up_whatever_the_class_names_widths(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Wide (CJK) names take two terminal columns a character: padded by characters, their probabilities came out
    further right than an ASCII name's."""
    names = ["猫", "dog", "仓鼠仓鼠"]
    run_dir = write_tiny_artifacts(tmp_path / "out", names, INPUT, labels=[0, 1, 2, 0]).run_dir
    assert run(run_dir, [images[0]], 3) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(rows) == 3
    # Every probability is printed as 0.dddd: the rows line up when each takes the same columns.
    assert len({display_width(row) for row in rows}) == 1, rows


def test_probabilities_are_the_models(
    model_dir: tuple[Path, nn.Module], images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, original = model_dir
    loaded, transform, class_names = load_for_inference(str(directory))
    assert class_names == CLASSES
    assert not loaded.training
    with Image.open(images[0]) as image:
        x = transform(image).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(original(x), dim=1)[0]
        torch.testing.assert_close(torch.softmax(loaded(x), dim=1)[0], expected)
    assert run(directory, [images[0]], 3) == 0
    top = parse(capsys.readouterr().out)[str(images[0])]
    assert top[0][0] == CLASSES[int(expected.argmax())]
    assert top[0][1] == pytest.approx(float(expected.max()), abs=1e-4)


@pytest.mark.parametrize(
    ("mode", "size", "grey"),
    [
        ("RGB", (50, 40), False),
        ("L", (30, 30), False),
        ("RGBA", (24, 20), False),
        ("P", (64, 32), False),
        ("RGB", (40, 40), True),
    ],
)
def test_image_transform_gives_normalised_rgb_of_the_card_size(mode: str, size: tuple[int, int], grey: bool) -> None:
    spec = InputSpec(
        image_size=32, resize_size=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", grayscale_to_rgb=grey
    )
    image = Image.new("RGB", size, (200, 30, 90)).convert(mode)
    x = image_transform(spec)(image)
    assert x.shape == (3, 32, 32)
    assert x.dtype == torch.float32
    assert -1 <= float(x.min()) <= float(x.max()) <= 1  # (v - 0.5) / 0.5 of values in [0, 1]
    if grey or mode == "L":
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


# ------------------------------------------------------------------------------------------ errors
def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_tampered_model_is_refused(
    model_dir: tuple[Path, nn.Module], images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "pets"
    shutil.copytree(model_dir[0], copy)
    data = bytearray((copy / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.pt").write_bytes(bytes(data))
    assert run(copy, images[:1]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_error_line(captured.err)
    assert re.fullmatch(
        rf"error: {re.escape(str(copy / 'model.pt'))}: sha256 \w+… does not match the model card's \w+…; .*", line
    )


def test_a_model_pt_that_would_inflate_is_refused_before_torch_load(
    model_dir: tuple[Path, nn.Module],
    images: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unsigned card lists whatever sha256 the file has: a model.pt whose entry inflates to GBs in torch.load."""
    copy = tmp_path / "pets"
    shutil.copytree(model_dir[0], copy)
    data = bomb()
    (copy / "model.pt").write_bytes(data)
    card = json.loads((copy / "model.json").read_text())
    card["files"]["model.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (copy / "model.json").write_text(json.dumps(card))
    monkeypatch.setattr(torch, "load", never_loaded)
    assert run(copy, images[:1]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {copy / 'model.pt'}: a zip archive with a compressed entry ('archive/data/0': ")
    assert line.endswith(
        "accepted: torch.save's own archive, its entries stored uncompressed, adding up to no more than the file"
    )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no-card", "no model card; --model must be the artifact directory of a finished job"),
        ("no-model", "model.pt: missing; the model card lists it"),
        ("other-architecture", "cannot rebuild architecture 'not_a_model'"),
        ("long-architecture", "cannot rebuild architecture 'xxxxxxxx"),  # and the line is short (below): it was 2 MB
        ("zero-std", "std"),  # an unsigned card edited by hand: a torchvision ValueError traceback before
        # Four means for the three channels predict feeds: a RuntimeError traceback at the first image.
        ("mean-of-four", "input.mean: 4 values; accepted: 1 (every channel) or 3 (R, G, B)"),
        # Past what a FineTuneJob can set (dataset.imageSize ≤ 1024): ~3 GB per image, a torch allocation traceback.
        ("huge-image-size", "input.imageSize: 16384; accepted: 1 to 1024 (the most dataset.imageSize allows)"),
        # 1171 = round(1024 × 342/299): Inception V3's preset, the largest resize/crop ratio of the catalog.
        ("huge-resize-size", "input.resizeSize: 1172; accepted: 1 to 1171 (dataset.imageSize 1024 scaled by"),
        # The weights of another architecture, or of another number of classes: the line ended in torch's cut-off
        # "Error(s) in loading state_dict for MobileNetV3:".
        (
            "weights-of-another-architecture",
            "model.pt: does not match architecture mobilenet_v3_small with 3 classes: missing features.0.0.weight, "
            "features.0.1.weight, features.0.1.bias, … (244 in all); unexpected conv1.weight, bn1.weight, bn1.bias, … "
            "(122 in all)",
        ),
        (
            "another-number-of-classes",
            "model.pt: does not match architecture resnet18 with 4 classes: wrong shape fc.weight [3, 512]≠[4, 512], "
            "fc.bias [3]≠[4]",
        ),
    ],
)
def test_broken_artifact_directory(
    model_dir: tuple[Path, nn.Module],
    images: list[Path],
    tmp_path: Path,
    damage: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    copy = tmp_path / "pets"
    shutil.copytree(model_dir[0], copy)
    if damage == "no-card":
        (copy / "model.json").unlink()
    elif damage == "no-model":
        (copy / "model.pt").unlink()
    elif damage in ("zero-std", "mean-of-four", "huge-image-size", "huge-resize-size", "another-number-of-classes"):
        card = json.loads((copy / "model.json").read_text())
        if damage == "zero-std":
            card["input"]["std"] = [0.0, 0.2, 0.2]
        elif damage == "mean-of-four":
            card["input"]["mean"] = [0.5, 0.5, 0.5, 0.5]
        elif damage == "huge-image-size":
            card["input"]["imageSize"] = 16384
        elif damage == "huge-resize-size":
            card["input"]["resizeSize"] = 1172
        else:
            card["classNames"].append("ferret")
        (copy / "model.json").write_text(json.dumps(card))
    else:
        name = {"weights-of-another-architecture": "mobilenet_v3_small", "long-architecture": "x" * 10**6}.get(
            damage, "not_a_model"
        )
        card = (copy / "model.json").read_text().replace('"name": "resnet18"', f'"name": "{name}"', 1)
        (copy / "model.json").write_text(card)
    assert run(copy, images[:1]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line
    assert len(line) < 600


def test_unreadable_images_are_named_and_the_rest_predicted(
    model_dir: tuple[Path, nn.Module], images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"
    assert run(model_dir[0], [images[0], missing, text, tmp_path, images[1]]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.splitlines() == [
        f"error: {missing}: no such file",
        f"error: {text}: not a readable image (UnidentifiedImageError: cannot identify image file {str(text)!r})",
        f"error: {tmp_path}: is a directory, not an image",
    ]
    assert list(parse(captured.out)) == [str(images[0]), str(images[1])]


def test_an_image_over_pils_pixel_limit_is_one_line_not_a_traceback(
    model_dir: tuple[Path, nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIL's DecompressionBombError (past twice MAX_IMAGE_PIXELS: ~358 Mpx) is an Exception of its own, and escaped."""
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (100, 100)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels: past twice the limit, as a real bomb is
    assert run(model_dir[0], [bomb]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {bomb}: not a readable image (DecompressionBombError: Image size (10000 pixels) exceeds")


def test_an_image_past_pils_warning_limit_is_one_line_not_a_warning_dump(
    model_dir: tuple[Path, nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between MAX_IMAGE_PIXELS and twice it (89-179 Mpx), PIL only warns: a two-line DecompressionBombWarning dump on
    stderr, then the image decoded anyway (a 12 KB PNG of 100 Mpx took 2 GB)."""
    import warnings

    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (100, 100)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10,000 pixels: past the limit, not past twice it
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # as outside pytest: shown, once
        assert run(model_dir[0], [bomb]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {bomb}: not a readable image (DecompressionBombWarning: Image size (10000 pixels) exceeds")


def test_decoded_images_are_not_held_while_the_next_are_read(
    model_dir: tuple[Path, nn.Module], images: list[Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch held 32 decoded images before any was shrunk: 32 copies of one small 81 Mpx PNG took 8 GB."""
    import gc
    import weakref

    from finetune_trainer import predict as predict_module

    opened: list[weakref.ref[Image.Image]] = []
    original = predict_module._open_image

    def open_image(path: str, *rest: Any) -> Image.Image:
        gc.collect()
        assert [ref for ref in opened if ref() is not None] == [], "a decoded image is still held"
        image = original(path, *rest)
        opened.append(weakref.ref(image))
        return image

    monkeypatch.setattr(predict_module, "_open_image", open_image)
    assert run(model_dir[0], images * 3) == 0
    assert len(parse(capsys.readouterr().out)) == len(images)  # the same three paths, each printed three times


def test_bad_top_k(model_dir: tuple[Path, nn.Module], images: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(model_dir[0], images, top_k=0) == 2
    assert one_error_line(capsys.readouterr().err) == "error: --top-k 0: must be at least 1"


def test_finetune_predict_cli(model_dir: tuple[Path, nn.Module], images: list[Path]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")])}
    command = [
        sys.executable,
        "-m",
        "finetune_operator.cli",
        "predict",
        "--model",
        str(model_dir[0]),
        str(images[0]),
        "--top-k",
        "2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    top = parse(done.stdout)[str(images[0])]
    assert len(top) == 2
    assert {label for label, _ in top} <= set(CLASSES)


def test_object_store_artifacts_round_trip(images: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The remote branch (stage locally, upload, card last), against fsspec's in-memory filesystem."""
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    root = "memory://finetune-test-bucket/out"
    # The spec accepts only real stores (s3://); the resolved root is where the trainer writes, here in memory.
    run_dir = f"{root}/remote"
    try:
        append_metrics(run_dir, EpochRecord(1, "fine-tune", 1.0, 1.1, 0.5, None, 10.0, 1.0, 1e-3))
        append_metrics(run_dir, EpochRecord(1, "fine-tune", 0.9, 1.0, 0.6, None, 10.0, 1.0, 1e-3))
        assert [r.val_accuracy for r in read_metrics(run_dir)] == [0.6]
        artifacts = write_tiny_artifacts(
            "s3://finetune-test-bucket/out", CLASSES, INPUT, job_name="remote", output_root=root, best_val_accuracy=0.6
        ).artifacts
        assert artifacts.model_uri == f"{root}/remote/model.pt"
        stored = sorted(p.rsplit("/", 1)[-1] for p in memory.ls("/finetune-test-bucket/out/remote", detail=False))
        assert stored == sorted(
            [
                "model.pt",
                "model.json",
                "metrics.jsonl",
                "evaluation.json",
                "confusion_matrix.png",
                "training_curves.png",
                "README.md",
            ]
        )
        card = load_model_card(run_dir)
        assert card.files["model.pt"].sha256 == artifacts.sha256
        assert card.metrics is not None and card.metrics.final is not None
        assert card.metrics.final.val_accuracy == 0.6
        assert run(run_dir, images[:1], 2) == 0
        assert len(parse(capsys.readouterr().out)[str(images[0])]) == 2
    finally:
        if memory.exists("/finetune-test-bucket"):
            memory.rm("/finetune-test-bucket", recursive=True)


def test_class_names_from_a_card_cannot_drive_the_terminal(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The names come from model.json, written by whoever handed over the model: an escape sequence (here: clear the
    screen), a newline that forges an output line, or a name of 100,000 characters that pads every line to its width."""
    names = ["\x1b[2J\x1b[Hcat", "dog\nimages/forged.png", "x" * 100_000]
    run_dir = write_tiny_artifacts(tmp_path, names, INPUT, labels=[0, 1, 2, 0]).run_dir
    assert run(run_dir, images[:1], top_k=3) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J\\x1b[Hcat" in out
    assert out.count("\n") == 4 and "dog\\nimages/forged.png" in out  # the image's line and its three classes
    # The 100,000-character name is printed cut, 64 characters and '…' (it was printed whole).
    assert max(len(line) for line in out.splitlines()) < 100
    assert f"  {'x' * 64}…  " in out


@pytest.mark.parametrize(
    ("name", "printed"),
    [
        ("cat", "cat"),
        ("x" * 64, "x" * 64),
        ("x" * 65, "x" * 64 + "…"),
        ("é" * 200, "é" * 64 + "…"),
        ("x" * 60 + "\x1b[2J", "x" * 60 + "\\x1b" + "…"),  # cut between escapes, never inside one
        ("\n" * 100, "\\n" * 32 + "…"),
    ],
    ids=["short", "64", "65", "wide-letters", "escape-at-the-cut", "only-escapes"],
)
def test_printed_class_names_are_escaped_and_cut(name: str, printed: str) -> None:
    from finetune_trainer.display import shown_name

    assert shown_name(name, 64) == printed
