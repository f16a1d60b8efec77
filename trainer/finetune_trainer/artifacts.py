"""What a finished job leaves behind in its run directory, and the per-epoch metrics log it grows from.

Owns the artifact layout under ``<output.uri>/<job name>/``::

    metrics.jsonl          one line per epoch (``append_metrics``, every epoch, rank 0)
    model.pt               the fine-tuned state_dict (always)
    model.torchscript.pt   TorchScript export (``exports: [torchscript]``), verified to load and match
    model.onnx             ONNX export (``exports: [onnx]``; needs the onnx package)
    evaluation.json        per-class precision/recall/F1, averages, confusion matrix
    confusion_matrix.png   the same, drawn
    training_curves.png    loss, accuracy and learning rate per epoch, from metrics.jsonl
    model.json             the model card: what the model is, how to feed it, how good it is, checksums

``model.json`` is written last, so its presence means the rest is complete. Everything is staged in a
local directory first and then moved (local run dir) or uploaded (s3://, gs://) into place. Called by
the training loop once training ends; ``predict`` reads the card back with ``load_model_card``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
import platform
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

import finetune_operator
from finetune_operator.api import catalog
from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.timestamps import utc_now
from finetune_operator.api.v1alpha1 import Artifacts
from finetune_trainer import storage
from finetune_trainer.errors import ArtifactError
from finetune_trainer.plots import plot_confusion_matrix, plot_training_curves

__all__ = [
    "CARD_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "EpochRecord",
    "EvalResult",
    "InputSpec",
    "append_metrics",
    "check_exports",
    "evaluation_report",
    "load_model_card",
    "plot_confusion_matrix",
    "plot_training_curves",
    "read_metrics",
    "unwrap_model",
    "write_artifacts",
]

METRICS_FILE: Final = "metrics.jsonl"
MODEL_FILE: Final = "model.pt"
CARD_FILE: Final = "model.json"
EVALUATION_FILE: Final = "evaluation.json"
CONFUSION_PNG: Final = "confusion_matrix.png"
CURVES_PNG: Final = "training_curves.png"
EXPORT_FILES: Final = {"state_dict": MODEL_FILE, "torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
CARD_SCHEMA_VERSION: Final = 1


# ---------------------------------------------------------------------------------------- records
@dataclass
class EpochRecord:
    """One finished epoch, as the loop reports it; one line of ``metrics.jsonl`` (camelCase keys)."""

    epoch: int
    stage: str
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_top5: float | None
    images_per_second: float
    epoch_seconds: float
    lr: float

    def to_wire(self) -> dict[str, Any]:
        # A diverged loss is NaN, which strict JSON readers (jq, JavaScript) reject: written as null.
        return {_camel(k): (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> EpochRecord:
        def num(key: str) -> float:
            value = raw.get(key)
            return math.nan if value is None else float(value)

        top5 = raw.get("valTop5")
        return cls(
            epoch=int(raw["epoch"]),
            stage=str(raw.get("stage", "")),
            train_loss=num("trainLoss"),
            val_loss=num("valLoss"),
            val_accuracy=num("valAccuracy"),
            val_top5=None if top5 is None else float(top5),
            images_per_second=num("imagesPerSecond"),
            epoch_seconds=num("epochSeconds"),
            lr=num("lr"),
        )


@dataclass
class InputSpec:
    """How images must be prepared for the model: resize the short side to ``resize_size``, centre-crop
    ``image_size``, scale to [0, 1], normalise with ``mean``/``std``; grayscale data is replicated to RGB."""

    image_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    grayscale_to_rgb: bool

    def to_wire(self) -> dict[str, Any]:
        return {_camel(k): (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> InputSpec:
        return cls(
            image_size=int(raw["imageSize"]),
            resize_size=int(raw["resizeSize"]),
            mean=tuple(float(x) for x in raw["mean"]),
            std=tuple(float(x) for x in raw["std"]),
            interpolation=str(raw["interpolation"]),
            grayscale_to_rgb=bool(raw["grayscaleToRgb"]),
        )


@dataclass
class EvalResult:
    """Final predictions on the validation set; labels are indices into ``class_names``."""

    y_true: list[int]
    y_pred: list[int]
    class_names: list[str]


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.capitalize() for part in rest)


# ------------------------------------------------------------------------------------- metrics log
def append_metrics(run_dir: str, record: EpochRecord) -> None:
    """Add ``record`` to ``<run_dir>/metrics.jsonl``. A resumed run re-reports epochs it had already
    reported before it stopped: the record replaces that epoch and drops any later ones (they belong to
    the abandoned attempt), so the log is always one line per epoch of the run that continues."""
    kept = [r for r in read_metrics(run_dir) if r.epoch < record.epoch]
    lines = [json.dumps(r.to_wire()) for r in [*kept, record]]
    # Rewritten whole (it is a few KiB): atomic locally, one PUT on object stores, which cannot append.
    storage.write_text(storage.join(run_dir, METRICS_FILE), "\n".join(lines) + "\n")


def read_metrics(run_dir: str) -> list[EpochRecord]:
    """The records of ``<run_dir>/metrics.jsonl`` in epoch order; none if the file does not exist yet."""
    uri = storage.join(run_dir, METRICS_FILE)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        return []
    records: dict[int, EpochRecord] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = EpochRecord.from_wire(json.loads(line))
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{uri} line {n}: not an epoch record ({e}): {line[:80]!r}") from None
        records[record.epoch] = record
    return [records[k] for k in sorted(records)]


# --------------------------------------------------------------------------------------- evaluation
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


# ------------------------------------------------------------------------------------------- exports
def check_exports(formats: list[str]) -> None:
    """Fail fast — call it before training — when an export format cannot be produced here."""
    unknown = [f for f in formats if f not in EXPORT_FILES]
    if unknown:
        raise ArtifactError(f"unknown export format(s) {unknown}; accepted: {', '.join(EXPORT_FILES)}")
    if "onnx" in formats and importlib.util.find_spec("onnx") is None:
        raise ArtifactError(
            "spec.output.exports lists 'onnx' but the onnx package is not installed in this trainer image; "
            "install it (pip install onnx onnxscript) or remove 'onnx' from spec.output.exports"
        )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        else:
            return model


def _verify(name: str, expected: torch.Tensor, got: torch.Tensor) -> None:
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else f"shape {list(got.shape)}"
        raise ArtifactError(f"{name} export does not reproduce the model's outputs (max difference {diff})")


def _export_torchscript(model: nn.Module, example: torch.Tensor, expected: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream, yet TorchScript is still what many serving stacks load.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            module: Any = torch.jit.script(model)  # keeps control flow, so any batch size works
        except Exception:
            module = torch.jit.trace(model, example, check_trace=False)  # type: ignore[no-untyped-call]
        module.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    with torch.no_grad():
        _verify("torchscript", expected, loaded(example))


def _export_onnx(model: nn.Module, example: torch.Tensor, expected: torch.Tensor, path: Path) -> None:
    import onnx

    # torch's default (dynamo) exporter needs onnxscript; without it the TorchScript-based one still works.
    dynamo = importlib.util.find_spec("onnxscript") is not None
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=dynamo,
        external_data=False,
    )
    onnx.checker.check_model(str(path))
    if importlib.util.find_spec("onnxruntime") is not None:
        onnxruntime = importlib.import_module("onnxruntime")  # optional, untyped
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"image": example.numpy()})
        _verify("onnx", expected, torch.from_numpy(logits))


# --------------------------------------------------------------------------------------- model card
def _versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "ray": version("ray"),
        "finetuneOperator": finetune_operator.__version__,
    }


def _weights_source(cfg: TrainerConfig) -> dict[str, Any]:
    spec = cfg.spec.model
    if spec.weights_uri is not None:
        return {"source": "uri", "uri": spec.weights_uri}
    if spec.weights is None:
        return {"source": "none"}
    info = catalog.load_catalog().get(spec.name)
    resolved = info.resolve_weights(spec.weights) if info else None
    return {"source": "torchvision", "name": resolved.name if resolved else spec.weights, "requested": spec.weights}


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": storage.sha256_file(path), "bytes": path.stat().st_size}


def _stage(
    out: Path,
    *,
    model: nn.Module,
    cfg: TrainerConfig,
    class_names: list[str],
    input_spec: InputSpec,
    evaluation: EvalResult,
    records: list[EpochRecord],
    best_val_accuracy: float | None,
    best_epoch: int | None,
) -> dict[str, Any]:
    """Write every artifact into the local directory ``out``; return the model card (also written)."""
    model = unwrap_model(model)
    state = {k.removeprefix("module."): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / MODEL_FILE)

    # Exports and checks run on a CPU copy in eval mode: the caller's model is left as it was.
    cpu_model = copy.deepcopy(model).cpu().eval()
    example = torch.randn(2, 3, input_spec.image_size, input_spec.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = cpu_model(example)
    if expected.ndim != 2 or expected.shape[1] != len(class_names):
        raise ArtifactError(
            f"the model outputs {list(expected.shape)} for a batch of 2 but there are {len(class_names)} class names"
        )
    formats = list(cfg.spec.output.exports)
    if "torchscript" in formats:
        _export_torchscript(cpu_model, example, expected, out / EXPORT_FILES["torchscript"])
    if "onnx" in formats:
        _export_onnx(cpu_model, example, expected, out / EXPORT_FILES["onnx"])

    report = evaluation_report(evaluation)
    (out / EVALUATION_FILE).write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion_matrix(evaluation, str(out / CONFUSION_PNG))
    plot_training_curves(records, str(out / CURVES_PNG))

    files = [MODEL_FILE, *(EXPORT_FILES[f] for f in formats if f != "state_dict"), EVALUATION_FILE, CONFUSION_PNG, CURVES_PNG]
    info = catalog.load_catalog().get(cfg.spec.model.name)
    card: dict[str, Any] = {
        "schemaVersion": CARD_SCHEMA_VERSION,
        "createdAt": utc_now(),
        "job": {"name": cfg.job_name, "namespace": cfg.namespace, "uid": cfg.job_uid},
        "architecture": {
            "name": cfg.spec.model.name,
            "family": info.family if info else None,
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "weights": _weights_source(cfg),
        "numClasses": len(class_names),
        "classNames": list(class_names),
        "input": input_spec.to_wire() | {"channels": 3, "layout": "NCHW", "valueRange": [0, 1]},
        "metrics": {
            "final": records[-1].to_wire() if records else None,
            "best": {"valAccuracy": best_val_accuracy, "epoch": best_epoch},
            "epochs": len(records),
        },
        "evaluation": {
            "accuracy": report["accuracy"],
            "macroPrecision": report["macroAvg"]["precision"],
            "macroRecall": report["macroAvg"]["recall"],
            "macroF1": report["macroAvg"]["f1"],
            "weightedF1": report["weightedAvg"]["f1"],
            "numSamples": report["numSamples"],
            "report": EVALUATION_FILE,
        },
        "exports": {f: EXPORT_FILES[f] for f in formats},
        "spec": cfg.spec.model_dump(by_alias=True, mode="json", exclude_none=True),
        "versions": _versions(),
        "files": {name: _file_entry(out / name) for name in files},
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card


def write_artifacts(
    run_dir: str,
    *,
    model: nn.Module,
    cfg: TrainerConfig,
    class_names: list[str],
    input_spec: InputSpec,
    evaluation: EvalResult,
    best_val_accuracy: float | None,
    best_epoch: int | None,
    checkpoint_uri: str | None,
) -> Artifacts:
    """Write the model, its exports, the evaluation, the plots and the model card into ``run_dir`` (a path
    or an s3:// / gs:// URI) and return what the FineTuneJob status records about them."""
    check_exports(list(cfg.spec.output.exports))
    if list(evaluation.class_names) != list(class_names):
        raise ArtifactError(f"evaluation class names {evaluation.class_names[:5]} differ from the model's {class_names[:5]}")
    records = read_metrics(run_dir)
    kwargs: dict[str, Any] = dict(
        model=model,
        cfg=cfg,
        class_names=class_names,
        input_spec=input_spec,
        evaluation=evaluation,
        records=records,
        best_val_accuracy=best_val_accuracy,
        best_epoch=best_epoch,
    )
    if storage.is_remote(run_dir):
        # Object stores: stage in a local temporary directory, then upload; the card goes last.
        with tempfile.TemporaryDirectory(prefix="finetune-artifacts-") as tmp:
            card = _stage(Path(tmp), **kwargs)
            for name in [*card["files"], CARD_FILE]:
                storage.upload_file(Path(tmp) / name, storage.join(run_dir, name))
    else:
        target = storage.local_path(run_dir)
        target.mkdir(parents=True, exist_ok=True)
        # Staged inside run_dir so that each file moves into place with an atomic same-filesystem rename.
        staging = Path(tempfile.mkdtemp(prefix=".artifacts-", dir=target))
        try:
            card = _stage(staging, **kwargs)
            for name in [*card["files"], CARD_FILE]:
                (staging / name).replace(target / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    public = cfg.public_uri
    return Artifacts(
        model_uri=public(storage.join(run_dir, MODEL_FILE)),
        model_card_uri=public(storage.join(run_dir, CARD_FILE)),
        checkpoint_uri=public(checkpoint_uri),
        sha256=card["files"][MODEL_FILE]["sha256"],
        exports={fmt: str(public(storage.join(run_dir, name))) for fmt, name in card["exports"].items()},
        class_names=list(class_names),
    )


def load_model_card(artifact_dir: str) -> dict[str, Any]:
    """The model card of an artifact directory (path or URI), checked to hold what ``predict`` needs."""
    uri = storage.join(artifact_dir, CARD_FILE)
    try:
        card = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise ArtifactError(
            f"{uri}: no model card; --model must be the artifact directory of a finished job (<output.uri>/<job name>)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{uri}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{uri}: not valid JSON ({e})") from None
    if not isinstance(card, dict):
        raise ArtifactError(f"{uri}: not a model card (a JSON {type(card).__name__}, expected an object)")
    missing = [key for key in ("architecture", "classNames", "input", "files") if key not in card]
    if not missing:
        missing += [f"architecture.{k}" for k in ("name",) if k not in card["architecture"]]
        missing += [f"files.{MODEL_FILE}"] if MODEL_FILE not in card["files"] else []
    if missing:
        raise ArtifactError(f"{uri}: not a model card: missing {', '.join(missing)}")
    try:
        InputSpec.from_wire(card["input"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{uri}: not a model card: bad input spec ({type(e).__name__}: {e})") from None
    return card
