"""Artifacts of a finished job: the files, the model card and its checksums, the exports, the metrics log,
the evaluation numbers and the plots. One tiny resnet18 (3 classes, 32×32, random weights) is written
once per module; the tests read what it left behind."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import resnet18

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import Artifacts, FineTuneJobSpec
from finetune_trainer import artifacts as art
from finetune_trainer import storage
from finetune_trainer.errors import ArtifactError
from finetune_trainer.evaluation import EvalResult, evaluation_report
from finetune_trainer.exports import check_exports
from finetune_trainer.inputs import InputSpec
from finetune_trainer.metrics_log import EpochRecord, append_metrics, read_metrics
from finetune_trainer.model_card import MODEL_FILE, FileEntry, load_model_card
from finetune_trainer.plots import plot_training_curves
from finetune_trainer.verify import verify_artifacts

CLASSES = ["zero", "one", "two"]
INPUT = InputSpec(
    image_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear", grayscale_to_rgb=True
)
EXPECTED_FILES = [
    "model.pt",
    "model.torchscript.pt",
    "evaluation.json",
    "confusion_matrix.png",
    "training_curves.png",
    "README.md",
]


def make_config(
    root: Path, exports: tuple[str, ...] = ("state_dict", "torchscript"), model: dict[str, str] | None = None
) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18", **(model or {})},
            "dataset": {"format": "digits", "classes": [0, 1, 2], "imageSize": 32},
            "output": {"uri": str(root), "exports": list(exports)},
            "strategy": {"method": "lp-ft", "probeEpochs": 2},
            "hyperparameters": {"epochs": 4},
        }
    )
    return TrainerConfig(job_name="digits-demo", namespace="ml", job_uid="uid-123", spec=spec, output_root=str(root))


def record(epoch: int, stage: str = "fine-tune", acc: float = 0.5, **kw: Any) -> EpochRecord:
    values: dict[str, Any] = dict(
        train_loss=1.0 / epoch,
        val_loss=1.2 / epoch,
        val_accuracy=acc,
        val_top5=None,
        images_per_second=100.0,
        epoch_seconds=1.0,
        lr=1e-3,
    )
    return EpochRecord(epoch=epoch, stage=stage, **(values | kw))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = resnet18(num_classes=len(CLASSES))
    return model.eval()


EVAL = EvalResult(y_true=[0, 0, 0, 1, 1, 2, 2, 2], y_pred=[0, 0, 1, 1, 1, 2, 0, 2], class_names=CLASSES)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainerConfig, nn.Module, Artifacts]:
    cfg = make_config(tmp_path_factory.mktemp("out"))
    for n, (stage, acc) in enumerate([("probe", 0.5), ("probe", 0.6), ("fine-tune", 0.8), ("fine-tune", 0.75)], 1):
        append_metrics(cfg.run_dir, record(n, stage, acc))
    model = tiny_model()
    # Wrapped as a distributed run hands it over: the artifacts must hold the plain model's keys.
    artifacts = art.write_artifacts(
        cfg.run_dir,
        model=nn.DataParallel(model),
        cfg=cfg,
        class_names=CLASSES,
        input_spec=INPUT,
        evaluation=EVAL,
        best_val_accuracy=0.8,
        best_epoch=3,
        checkpoint_uri="/ckpt/checkpoint_000002",
        shipped_epoch=3,
    )
    return cfg, model, artifacts


def run_dir(written: tuple[TrainerConfig, nn.Module, Artifacts]) -> Path:
    return Path(written[0].run_dir)


def card_of(written: tuple[TrainerConfig, nn.Module, Artifacts]) -> dict[str, Any]:
    """model.json as JSON: what other tools read, so the wire format is asserted on it."""
    card: dict[str, Any] = json.loads((run_dir(written) / "model.json").read_text())
    return card


# ------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("name", [*EXPECTED_FILES, "model.json", "metrics.jsonl"])
def test_every_file_exists(written: tuple[TrainerConfig, nn.Module, Artifacts], name: str) -> None:
    path = run_dir(written) / name
    assert path.is_file()
    assert path.stat().st_size > 0


def test_nothing_but_the_artifacts_is_left(written: tuple[TrainerConfig, nn.Module, Artifacts]) -> None:
    assert sorted(p.name for p in run_dir(written).iterdir()) == sorted([*EXPECTED_FILES, "model.json", "metrics.jsonl"])


def test_card_checksums_match_every_file(written: tuple[TrainerConfig, nn.Module, Artifacts]) -> None:
    files = card_of(written)["files"]
    assert sorted(files) == sorted(EXPECTED_FILES)  # every file written, the card itself excluded
    for name, entry in files.items():
        path = run_dir(written) / name
        assert entry == {"sha256": storage.sha256_file(path), "bytes": path.stat().st_size}, name


def test_returned_artifacts(written: tuple[TrainerConfig, nn.Module, Artifacts]) -> None:
    _, _, artifacts = written
    root = run_dir(written)
    assert artifacts.model_uri == str(root / "model.pt")
    assert artifacts.model_card_uri == str(root / "model.json")
    assert artifacts.checkpoint_uri == "/ckpt/checkpoint_000002"
    assert artifacts.sha256 == storage.sha256_file(root / "model.pt")
    assert artifacts.exports == {"state_dict": str(root / "model.pt"), "torchscript": str(root / "model.torchscript.pt")}
    assert artifacts.class_names == CLASSES


def test_model_pt_loads_into_a_fresh_model_with_identical_outputs(written: tuple[TrainerConfig, nn.Module, Artifacts]) -> None:
    _, model, _ = written
    state = torch.load(run_dir(written) / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # unwrapped from the DataParallel/DDP wrapper
    fresh = resnet18(num_classes=3)
    fresh.load_state_dict(state)  # strict: every key, every shape
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_torchscript_export_loads_and_matches(written: tuple[TrainerConfig, nn.Module, Artifacts]) -> None:
    _, model, _ = written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(run_dir(written) / "model.torchscript.pt"))  # type: ignore[no-untyped-call]
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export's example
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_model_card_content(written: tuple[TrainerConfig, nn.Module, Artifacts]) -> None:
    cfg, model, _ = written
    card = card_of(written)
    assert card["architecture"] == {
        "name": "resnet18",
        "family": "resnet",
        "class": "ResNet",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    assert card["weights"] == {"source": "none"}
    assert (card["numClasses"], card["classNames"]) == (3, CLASSES)
    assert InputSpec.model_validate(card["input"]) == INPUT
    assert card["job"] == {"name": "digits-demo", "namespace": "ml", "uid": "uid-123"}
    assert card["metrics"]["final"] == record(4, "fine-tune", 0.75).to_wire()
    assert card["metrics"]["best"] == {"valAccuracy": 0.8, "epoch": 3}
    # model.pt holds epoch 3's weights: the card gives that epoch's line, not only the last one's.
    assert card["metrics"]["shipped"] == record(3, "fine-tune", 0.8).to_wire()
    assert card["metrics"]["epochs"] == 4
    assert card["evaluation"]["accuracy"] == pytest.approx(6 / 8)
    assert card["evaluation"]["numSamples"] == 8
    assert card["exports"] == {"state_dict": "model.pt", "torchscript": "model.torchscript.pt"}
    assert FineTuneJobSpec.model_validate(card["spec"]) == cfg.spec
    assert set(card["versions"]) == {"python", "torch", "torchvision", "ray", "finetuneOperator"}
    assert card["versions"]["torch"] == torch.__version__
    assert card["createdAt"].endswith("Z")


def test_model_card_keys_in_order(written: tuple[TrainerConfig, nn.Module, Artifacts]) -> None:
    card = card_of(written)
    assert list(card) == [
        "schemaVersion",
        "createdAt",
        "job",
        "architecture",
        "weights",
        "numClasses",
        "classNames",
        "input",
        "data",
        "recipe",
        "metrics",
        "evaluation",
        "warnings",
        "exports",
        "spec",
        "versions",
        "files",
        "protection",
    ]
    assert card["protection"] == {
        "encrypted": False,
        "encryptionKeyId": None,
        "serverSideEncryption": None,
        "serverSideKey": None,
        "signed": False,
        "signingKeyId": None,
    }
    assert card["schemaVersion"] == 1
    assert card["input"] == {
        "imageSize": 32,
        "resizeSize": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bilinear",
        "grayscaleToRgb": True,
        "channels": 3,
        "layout": "NCHW",
        "valueRange": [0, 1],
    }
    assert list(card["metrics"]) == ["final", "best", "shipped", "epochs"]
    assert list(card["evaluation"]) == [
        "accuracy",
        "macroPrecision",
        "macroRecall",
        "macroF1",
        "weightedF1",
        "numSamples",
        "report",
        "classes",
        "minAccuracy",
    ]


def test_model_card_loads_typed_and_writes_back_the_same_text(written: tuple[TrainerConfig, nn.Module, Artifacts]) -> None:
    cfg, _, artifacts = written
    card = load_model_card(cfg.run_dir)
    assert card.architecture.name == "resnet18"
    assert card.architecture.class_name == "ResNet"
    assert card.class_names == CLASSES
    assert card.input == INPUT
    assert card.files[MODEL_FILE] == FileEntry(sha256=artifacts.sha256, size=(run_dir(written) / MODEL_FILE).stat().st_size)
    assert card.metrics is not None and card.metrics.final == record(4, "fine-tune", 0.75)
    assert card.to_json() == (run_dir(written) / "model.json").read_text()


def test_model_card_of_a_newer_trainer_loads(tmp_path: Path) -> None:
    """Keys this version does not know, at the top and inside parts, are ignored, not refused."""
    card: dict[str, Any] = {
        "schemaVersion": 2,
        "architecture": {"name": "resnet18", "quantized": False},
        "classNames": ["a", "b"],
        "input": {**INPUT.to_wire(), "channelsLast": True},
        "files": {"model.pt": {"sha256": "0" * 64, "bytes": 7, "storageClass": "cold"}},
        "signature": "…",
    }
    (tmp_path / "model.json").write_text(json.dumps(card))
    loaded = load_model_card(str(tmp_path))
    assert (loaded.schema_version, loaded.class_names, loaded.input) == (2, ["a", "b"], INPUT)
    assert loaded.files["model.pt"].size == 7


def test_evaluation_json_is_the_report(written: tuple[TrainerConfig, nn.Module, Artifacts]) -> None:
    report = json.loads((run_dir(written) / "evaluation.json").read_text())
    assert report == json.loads(json.dumps(evaluation_report(EVAL)))


@pytest.mark.parametrize("name", ["confusion_matrix.png", "training_curves.png"])
def test_plots_are_real_pngs(written: tuple[TrainerConfig, nn.Module, Artifacts], name: str) -> None:
    path = run_dir(written) / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000  # a drawing, not an empty canvas
    with Image.open(path) as image:
        assert image.width >= 500
        assert image.height >= 400
        assert len(image.getcolors(maxcolors=1_000_000) or []) > 50


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({}, {"source": "none"}),
        ({"weights": "DEFAULT"}, {"source": "torchvision", "name": "ResNet18_Weights.IMAGENET1K_V1", "requested": "DEFAULT"}),
        (
            {"weights": "IMAGENET1K_V1"},
            {"source": "torchvision", "name": "ResNet18_Weights.IMAGENET1K_V1", "requested": "IMAGENET1K_V1"},
        ),
        ({"weightsUri": "s3://bucket/job1/model.pt"}, {"source": "uri", "uri": "s3://bucket/job1/model.pt"}),
    ],
)
def test_weights_source_in_card(tmp_path: Path, weights: dict[str, str], expected: dict[str, str]) -> None:
    assert art._weights_source(make_config(tmp_path, model=weights)).to_wire() == expected


# ------------------------------------------------------------------------------------------ errors
def test_onnx_export_or_clear_error(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, exports=("state_dict", "onnx"))
    kwargs: dict[str, Any] = dict(
        model=tiny_model(),
        cfg=cfg,
        class_names=CLASSES,
        input_spec=INPUT,
        evaluation=EVAL,
        best_val_accuracy=None,
        best_epoch=None,
        checkpoint_uri=None,
    )
    try:
        import onnx
    except ImportError:
        with pytest.raises(
            ArtifactError, match=r"onnx package is not installed.*pip install onnx.*remove 'onnx' from spec\.output\.exports"
        ):
            art.write_artifacts(cfg.run_dir, **kwargs)
        assert not (Path(cfg.run_dir) / "model.json").exists()  # failed before writing anything
        return
    artifacts = art.write_artifacts(cfg.run_dir, **kwargs)
    assert artifacts.exports["onnx"] == f"{cfg.run_dir}/model.onnx"
    onnx.checker.check_model(f"{cfg.run_dir}/model.onnx")


def test_onnx_missing_is_a_clear_error_even_where_onnx_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(ArtifactError, match="install it"):
        check_exports(["state_dict", "onnx"])
    check_exports(["state_dict", "torchscript"])


def test_class_names_must_fit_the_model(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, exports=("state_dict",))
    names = [*CLASSES, "three"]
    with pytest.raises(ArtifactError, match=r"outputs \[2, 3\] for a batch of 2 but there are 4 class names"):
        art.write_artifacts(
            cfg.run_dir,
            model=tiny_model(),
            cfg=cfg,
            class_names=names,
            input_spec=INPUT,
            evaluation=replace(EVAL, class_names=names),
            best_val_accuracy=None,
            best_epoch=None,
            checkpoint_uri=None,
        )
    assert not (Path(cfg.run_dir) / "model.pt").exists()  # staged files are not published


# The least a card must hold: what predict and head reuse read.
CARD: dict[str, Any] = {
    "architecture": {"name": "resnet18"},
    "classNames": ["a", "b"],
    "input": INPUT.to_wire(),
    "files": {"model.pt": {"sha256": "0" * 64, "bytes": 7}},
}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no model card; --model must be the artifact directory"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a model card (a JSON list"),
        (
            '{"architecture": {}, "classNames": [], "input": {}, "files": {}}',
            "not a model card: missing architecture.name, input.imageSize, input.resizeSize, input.mean, input.std, "
            "input.interpolation, input.grayscaleToRgb; files: no entry for model.pt",
        ),
        ('{"classNames": []}', "not a model card: missing architecture, input, files"),
        (
            '{"architecture": {"name": "x"}, "classNames": [], "input": {}, "files": {"model.pt": {}}}',
            "missing input.imageSize, input.resizeSize, input.mean, input.std, input.interpolation, input.grayscaleToRgb, "
            "files.model.pt.sha256, files.model.pt.bytes",
        ),
        (
            json.dumps({**CARD, "classNames": "abc", "architecture": {"name": 7}}),
            "not a model card: architecture.name: Input should be a valid string; classNames: Input should be a valid array",
        ),
        (json.dumps({**CARD, "input": {**CARD["input"], "mean": "grey"}}), "input.mean: Input should be a valid array"),
        # Strict: a value of the wrong JSON type is refused, not converted (true was read as an image size of 1).
        (json.dumps({**CARD, "input": {**CARD["input"], "imageSize": True}}), "input.imageSize: Input should be a valid integer"),
        (json.dumps({**CARD, "numClasses": "2"}), "numClasses: Input should be a valid integer"),
        (json.dumps({**CARD, "weights": {"source": "hub"}}), "weights: Input tag 'hub' found using 'source' does not match"),
        (
            json.dumps({**CARD, "metrics": {"final": {"stage": "probe"}, "best": {}, "epochs": 1}}),
            "metrics.final: not an epoch record (KeyError: 'epoch')",
        ),
        # A card is read before its signature can vouch for anything: each of these was a traceback.
        ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested deeper than Python's JSON reader goes)"),
        ('{"numClasses": ' + "9" * 5000 + "}", "not valid JSON (Exceeds the limit (4300 digits) for integer string"),
    ],
)
def test_load_model_card_errors(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "model.json").write_text(content)
    with pytest.raises(ArtifactError, match=re.escape(message)) as info:
        load_model_card(str(tmp_path))
    assert str(tmp_path / "model.json") in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["../../dev/zero", "../model.pt", "/etc/passwd", "sub/model.pt", "..", ".", ""])
def test_a_card_may_list_only_files_of_its_own_directory(tmp_path: Path, name: str) -> None:
    """verify and predict read every name the card lists beside it: '../../dev/zero' read until memory ran out,
    '../../etc/passwd' read a file outside the artifact directory (and its sha256 said whether it was a guess)."""
    files = {**CARD["files"], name: {"sha256": "0" * 64, "bytes": 1}}
    (tmp_path / "model.json").write_text(json.dumps({**CARD, "files": files}))
    with pytest.raises(ArtifactError, match=re.escape(f"files: {name!r} is not a file name of the artifact directory")):
        load_model_card(str(tmp_path))


def test_a_card_with_a_negative_size_is_refused(tmp_path: Path) -> None:
    files = {**CARD["files"], "model.pt": {"sha256": "0" * 64, "bytes": -1}}
    (tmp_path / "model.json").write_text(json.dumps({**CARD, "files": files}))
    with pytest.raises(ArtifactError, match=re.escape("files.model.pt.bytes: Input should be greater than or equal to 0")):
        load_model_card(str(tmp_path))


@pytest.mark.parametrize("swapped", ["model.pt", "model.json", "model.json.sig"])
def test_a_file_swapped_for_an_endless_one_is_refused_unread(
    written: tuple[TrainerConfig, nn.Module, Artifacts], tmp_path: Path, swapped: str
) -> None:
    """An artifact directory someone hands over with model.pt (or the card, or its signature) linked to /dev/zero:
    verify and predict read it until memory ran out (std::bad_alloc; the signature had no bound at all). A device is
    no plain file: refused before a byte of it is read."""
    copy = copy_of(written, tmp_path)
    (copy / swapped).unlink(missing_ok=True)
    (copy / swapped).symlink_to("/dev/zero")
    message = "a character device, not a plain file"
    with pytest.raises(ArtifactError, match=re.escape(f"{copy / swapped}: cannot read: {message}")):
        verify_artifacts(str(copy), read=["model.pt"])


def copy_of(written: tuple[TrainerConfig, nn.Module, Artifacts], tmp_path: Path) -> Path:
    """A copy of the artifact directory, to damage."""
    copy = tmp_path / "artifacts"
    copy.mkdir()
    for path in run_dir(written).iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


@pytest.mark.timeout(30)
@pytest.mark.parametrize("swapped", ["model.pt", "model.json", "model.json.sig"])
def test_a_file_swapped_for_a_fifo_is_refused_not_waited_on(
    written: tuple[TrainerConfig, nn.Module, Artifacts], tmp_path: Path, swapped: str
) -> None:
    """A FIFO under an artifact's name (someone who can write the shared volume): opening it waited for a writer
    for ever, and `finetune verify` or `predict` with it."""
    copy = copy_of(written, tmp_path)
    (copy / swapped).unlink(missing_ok=True)
    os.mkfifo(copy / swapped)
    with pytest.raises(ArtifactError, match=re.escape(f"{copy / swapped}: cannot read: a FIFO, not a plain file")):
        verify_artifacts(str(copy), read=["model.pt"])


@pytest.mark.parametrize("size", [10**15, 2**64])
def test_a_card_listing_a_huge_size_reads_no_more_than_the_file_holds(
    written: tuple[TrainerConfig, nn.Module, Artifacts], tmp_path: Path, size: int
) -> None:
    """The size a card lists bounds what is read; it was also what Python allocated up front (MemoryError, and
    OverflowError past 2**63: tracebacks). A file whose bytes match but whose size does not is refused too."""
    copy = copy_of(written, tmp_path)
    card = json.loads((copy / "model.json").read_text())
    card["files"]["model.pt"]["bytes"] = size
    (copy / "model.json").write_text(json.dumps(card))
    held = (copy / "model.pt").stat().st_size
    message = f"{copy / 'model.pt'}: {held} bytes, but the model card lists {size}"
    with pytest.raises(ArtifactError, match=re.escape(message)):
        verify_artifacts(str(copy), read=["model.pt"])


def test_a_signature_file_too_large_to_be_one_is_not_read_whole(
    written: tuple[TrainerConfig, nn.Module, Artifacts], tmp_path: Path
) -> None:
    copy = copy_of(written, tmp_path)
    (copy / "model.json.sig").write_bytes(b" " * ((64 << 10) + 1))
    with pytest.raises(ArtifactError, match=re.escape("model.json.sig: larger than 64 KiB, so not a signature file")):
        verify_artifacts(str(copy))


def test_least_card_loads(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text(json.dumps(CARD))
    card = load_model_card(str(tmp_path))
    assert (card.architecture.name, card.class_names, card.input) == ("resnet18", ["a", "b"], INPUT)
    assert (card.metrics, card.weights, card.versions) == (None, None, None)


# ----------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize(
    ("epochs", "expected"),
    [
        ([1, 2, 3], [(1, 0), (2, 1), (3, 2)]),
        ([1, 2, 2], [(1, 0), (2, 2)]),  # epoch 2 re-reported after a resume: replaced, not duplicated
        ([1, 2, 3, 2], [(1, 0), (2, 3)]),  # resumed from epoch 1's checkpoint: the abandoned epoch 3 goes too
        ([1, 2, 3, 2, 3], [(1, 0), (2, 3), (3, 4)]),
    ],
)
def test_append_metrics_is_idempotent_per_epoch(tmp_path: Path, epochs: list[int], expected: list[tuple[int, int]]) -> None:
    run = str(tmp_path / "job")
    for i, epoch in enumerate(epochs):
        append_metrics(run, record(epoch, lr=float(i)))  # lr tells the attempts apart
    assert [(r.epoch, int(r.lr)) for r in read_metrics(run)] == expected
    lines = (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(expected)


def test_metrics_round_trip_with_nan_as_null(tmp_path: Path) -> None:
    run = str(tmp_path)
    append_metrics(run, record(1, "probe", val_top5=0.9, train_loss=math.nan))
    raw = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert raw["trainLoss"] is None  # strict JSON
    assert set(raw) == {
        "epoch",
        "stage",
        "trainLoss",
        "valLoss",
        "valAccuracy",
        "valTop5",
        "imagesPerSecond",
        "epochSeconds",
        "lr",
    }
    (back,) = read_metrics(run)
    assert math.isnan(back.train_loss)
    assert replace(back, train_loss=0.0) == record(1, "probe", val_top5=0.9, train_loss=0.0)


def test_read_metrics(tmp_path: Path) -> None:
    assert read_metrics(str(tmp_path)) == []
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "stage": "probe"}\n\n{"oops": 1}\n')
    with pytest.raises(ArtifactError, match=r"metrics\.jsonl line 3: not an epoch record"):
        read_metrics(str(tmp_path))


# -------------------------------------------------------------------------------------- evaluation
def test_evaluation_report_hand_computed() -> None:
    # true 0 0 0 1 1 2 / predicted 0 0 1 1 2 2:
    #   class 0: TP 2, FP 0, FN 1 → P 1,   R 2/3, F1 2·(2/3)/(5/3) = 0.8
    #   class 1: TP 1, FP 1, FN 1 → P 1/2, R 1/2, F1 1/2
    #   class 2: TP 1, FP 1, FN 0 → P 1/2, R 1,   F1 2/3
    report = evaluation_report(EvalResult([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"]))
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["numSamples"] == 6
    expected = [("a", 1.0, 2 / 3, 0.8, 3), ("b", 0.5, 0.5, 0.5, 2), ("c", 0.5, 1.0, 2 / 3, 1)]
    for row, (name, p, r, f1, support) in zip(report["classes"], expected, strict=True):
        assert row["name"] == name
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p, r, f1, support))
    assert report["macroAvg"]["precision"] == pytest.approx(2 / 3)
    assert report["macroAvg"]["recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert report["macroAvg"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert report["weightedAvg"]["f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert report["weightedAvg"]["recall"] == pytest.approx(report["accuracy"])  # support-weighted recall is accuracy
    assert report["confusionMatrix"]["matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report["confusionMatrix"]["labels"] == ["a", "b", "c"]


def test_evaluation_report_class_never_predicted_or_absent() -> None:
    # Class "c" is never predicted (precision 0, not NaN); class "d" never occurs (support 0).
    report = evaluation_report(EvalResult([0, 1, 2, 2], [0, 1, 0, 1], ["a", "b", "c", "d"]))
    c, d = report["classes"][2], report["classes"][3]
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 2)
    assert (d["precision"], d["recall"], d["f1"], d["support"]) == (0.0, 0.0, 0.0, 0)
    assert report["macroAvg"]["precision"] == pytest.approx((0.5 + 0.5 + 0 + 0) / 4)
    assert report["accuracy"] == pytest.approx(0.5)
    json.dumps(report, allow_nan=False)  # no NaN anywhere


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [([0, 1], [0], "y_true has 2 labels but y_pred has 1"), ([0, 3], [0, 1], r"labels \[3\] are outside 0\.\.2")],
)
def test_evaluation_report_rejects_bad_labels(y_true: list[int], y_pred: list[int], message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        evaluation_report(EvalResult(y_true, y_pred, ["a", "b", "c"]))


@pytest.mark.parametrize(
    "records",
    [
        [],
        [record(1)],
        [record(n, "probe" if n <= 3 else "fine-tune", 0.1 * n, val_top5=min(1.0, 0.3 * n)) for n in range(1, 9)],
        [record(1, train_loss=math.nan), record(2, val_accuracy=math.nan)],
    ],
    ids=["empty", "one-epoch", "lp-ft-with-top5", "diverged"],
)
def test_training_curves_draw_any_history(tmp_path: Path, records: list[EpochRecord]) -> None:
    path = tmp_path / "curves.png"
    plot_training_curves(records, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert path.stat().st_size > 5_000
