"""What a finished job leaves behind in its run directory: ``write_artifacts``.

Owns the artifact layout under ``<output.uri>/<job name>/``::

    metrics.jsonl          one line per epoch (``metrics_log``, every epoch, rank 0)
    model.pt               the fine-tuned state_dict (always): the weights of the shipped epoch, which
                           evaluation.json, the plots' confusion matrix and the card's metrics.shipped
                           describe (the caller chooses it: the best epoch's, see ``finish``)
    model.torchscript.pt   TorchScript export (``exports: [torchscript]``), verified to load and match
    model.onnx             ONNX export (``exports: [onnx]``; needs the onnx package)
    model.safetensors      the same tensors as model.pt, no pickle (``exports: [safetensors]``), metadata
                           naming the architecture and the classes
    evaluation.json        per-class precision/recall/F1, averages, confusion matrix (``evaluation``)
    confusion_matrix.png   the same, drawn (``plots``)
    training_curves.png    loss, accuracy and learning rate per epoch, from metrics.jsonl (``plots``)
    README.md              the same card for people (``model_card_md``), Hugging Face style; listed in
                           model.json's files like every other artifact
    model.json             the model card (``model_card``): what the model is, how to feed it, how good
                           it is, checksums of every file staged (whatever files are there at the end)
    model.json.sig         its Ed25519 signature (``spec.output.sign``; ``protect``, ``signing``)

With ``spec.output.encryption.clientSide`` the model files are encrypted in the stage before they are
summed (``protect.seal_staged``); with ``serverSide`` every upload asks the store for its KMS encryption.

``model.json`` is written last, so its presence means the rest is complete. Everything is staged in a
private local temporary directory first (never in the run dir: clear weights must not reach the output
store) and then copied (local run dir, atomically per file) or uploaded (s3://, gs://) into place. A relaunch
that stages the very model already published there, verified (``_already_published``), rewrites nothing: every
file would change in place (sealed afresh), and a kill midway would leave the old card beside new files, no
model verifying where one did. Called by the training loop once training ends; ``predict`` reads the card back
with ``load_model_card``.
"""

from __future__ import annotations

import json
import platform
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

import finetune_operator
from finetune_operator.api import catalog
from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.timestamps import utc_now
from finetune_operator.api.v1alpha1 import Artifacts
from finetune_trainer import storage
from finetune_trainer.errors import ArtifactError
from finetune_trainer.evaluation import EvalResult, evaluation_report
from finetune_trainer.exports import EXPORT_FILES, SAFETENSORS_FILE, check_exports, export_model, export_safetensors
from finetune_trainer.inputs import InputSpec
from finetune_trainer.metrics_log import EpochRecord, read_metrics
from finetune_trainer.model_card import (
    CARD_FILE,
    MODEL_FILE,
    Architecture,
    BestEpoch,
    CardData,
    CardEvaluation,
    CardMetrics,
    CardRecipe,
    ClassMetrics,
    FileEntry,
    JobRef,
    ModelCard,
    NoWeights,
    TorchvisionWeights,
    UriWeights,
    Versions,
    WeightsSource,
    load_model_card,
    read_card_bytes,
)
from finetune_trainer.model_card_md import README_FILE, render_readme
from finetune_trainer.plots import plot_confusion_matrix, plot_training_curves
from finetune_trainer.protect import keyring_for, protection_of, seal_staged, server_side_key, sign_staged, signing_key_for
from finetune_trainer.sealing import is_sealed_file, sealed_key_id
from finetune_trainer.signing import SIGNATURE_FILE, SignatureError, public_key_id, verify_card
from finetune_trainer.verify import read_signature_file, verify_artifacts

__all__ = ["RunFacts", "unwrap_model", "write_artifacts"]

EVALUATION_FILE: Final = "evaluation.json"
CONFUSION_PNG: Final = "confusion_matrix.png"
CURVES_PNG: Final = "training_curves.png"
_UNSTABLE: Final = {"created_at", "files", "warnings"}
"""What a card of the same model may differ in when staged again: when it was written, its files' bytes (sealed
afresh, safetensors' header in another order) and the warnings (of the attempt that trained, not of one that only
finishes); ``_already_published`` compares the rest, and the files' names."""


@dataclass(frozen=True)
class RunFacts:
    """What only the training loop knows, for the card: the training images, what the defaults chose
    (``recipe.BatchPlan``) and the warnings the run gave."""

    train_images: int | None = None
    passes: int | None = None
    chosen: str | None = None
    warnings: list[str] = field(default_factory=list)
    ingest: str | None = None
    """``streaming`` or ``mapStyle`` (``listing.choose_ingest``) for an imagefolder dataset."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        else:
            return model


# --------------------------------------------------------------------------------------- model card
def _versions() -> Versions:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return Versions(
        python=platform.python_version(),
        torch=torch.__version__,
        torchvision=version("torchvision"),
        ray=version("ray"),
        finetune_operator=finetune_operator.__version__,
    )


def _weights_source(cfg: TrainerConfig) -> WeightsSource:
    spec = cfg.spec.model
    if spec.weights_uri is not None:
        return UriWeights(uri=spec.weights_uri)
    if spec.weights is None:
        return NoWeights()
    info = catalog.load_catalog().get(spec.name)
    resolved = info.resolve_weights(spec.weights) if info else None
    return TorchvisionWeights(name=resolved.name if resolved else spec.weights, requested=spec.weights)


def _file_entry(path: Path) -> FileEntry:
    key_id = sealed_key_id(path) if is_sealed_file(path) else None
    return FileEntry(sha256=storage.sha256_file(path), size=path.stat().st_size, encryption_key_id=key_id)


def _published(staged: Path, card: ModelCard) -> list[str]:
    """The files to move or upload, in order: the signature before the card, the card last."""
    signature = [SIGNATURE_FILE] if (staged / SIGNATURE_FILE).exists() else []
    return [*card.files, *signature, CARD_FILE]


def _data(cfg: TrainerConfig, facts: RunFacts, validation_images: int) -> CardData:
    ds = cfg.spec.dataset
    return CardData(
        format=ds.format,
        train_uri=cfg.public_uri(ds.train_uri),
        validation_uri=cfg.public_uri(ds.validation_uri),
        train_images=facts.train_images,
        validation_images=validation_images,
        ingest=facts.ingest,
    )


def _recipe(cfg: TrainerConfig, facts: RunFacts) -> CardRecipe:
    spec = cfg.spec
    hp = spec.hyperparameters
    return CardRecipe(
        strategy=spec.strategy.method,
        epochs=hp.epochs,
        batch_size=hp.batch_size,
        passes_per_epoch=facts.passes,
        optimizer=hp.optimizer,
        learning_rate=hp.learning_rate,
        scheduler=hp.scheduler,
        chosen=facts.chosen,
    )


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
    shipped_epoch: int | None,
    facts: RunFacts,
) -> tuple[ModelCard, str]:
    """Write every artifact into the local directory ``out``; return the model card (also written) and the sha256
    of model.pt as it was before sealing (what ``_already_published`` compares)."""
    model = unwrap_model(model)
    state = {k.removeprefix("module."): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / MODEL_FILE)
    weights = storage.sha256_file(out / MODEL_FILE)
    formats = list(cfg.spec.output.exports)
    export_model(model, input_spec.image_size, len(class_names), formats, out)
    if "safetensors" in formats:
        export_safetensors(state, out / SAFETENSORS_FILE, architecture=cfg.spec.model.name, class_names=class_names)

    report = evaluation_report(evaluation)
    (out / EVALUATION_FILE).write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion_matrix(evaluation, str(out / CONFUSION_PNG))
    plot_training_curves(records, str(out / CURVES_PNG))

    keyring, signing = keyring_for(cfg), signing_key_for(cfg)
    if keyring is not None:
        seal_staged(out, keyring)
    # Whatever the stage holds now (dot files are temporaries): the card lists, and the signature covers, every file.
    files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != CARD_FILE)
    info = catalog.load_catalog().get(cfg.spec.model.name)
    card = ModelCard(
        created_at=utc_now(),
        job=JobRef(name=cfg.job_name, namespace=cfg.namespace, uid=cfg.job_uid),
        architecture=Architecture(
            name=cfg.spec.model.name,
            family=info.family if info else None,
            class_name=type(model).__name__,
            parameters=sum(p.numel() for p in model.parameters()),
        ),
        weights=_weights_source(cfg),
        num_classes=len(class_names),
        class_names=list(class_names),
        input=input_spec,
        data=_data(cfg, facts, report["numSamples"]),
        recipe=_recipe(cfg, facts),
        metrics=CardMetrics(
            final=records[-1] if records else None,
            best=BestEpoch(val_accuracy=best_val_accuracy, epoch=best_epoch),
            shipped=next((r for r in records if r.epoch == shipped_epoch), None),
            epochs=len(records),
        ),
        evaluation=CardEvaluation(
            accuracy=report["accuracy"],
            macro_precision=report["macroAvg"]["precision"],
            macro_recall=report["macroAvg"]["recall"],
            macro_f1=report["macroAvg"]["f1"],
            weighted_f1=report["weightedAvg"]["f1"],
            num_samples=report["numSamples"],
            report=EVALUATION_FILE,
            classes=[ClassMetrics.model_validate(c) for c in report["classes"]],
            min_accuracy=cfg.spec.evaluation.min_accuracy,
        ),
        warnings=list(facts.warnings),
        exports={f: EXPORT_FILES[f] for f in formats},
        spec=cfg.spec.to_wire(),
        versions=_versions(),
        files={name: _file_entry(out / name) for name in files},
        protection=protection_of(cfg, keyring, signing),
    )
    # README.md renders the card as it stands (it cannot hold its own checksum), then joins its file list.
    (out / README_FILE).write_text(render_readme(card, confusion_matrix=CONFUSION_PNG), encoding="utf-8")
    card = card.model_copy(update={"files": {**card.files, README_FILE: _file_entry(out / README_FILE)}})
    (out / CARD_FILE).write_text(card.to_json())
    if signing is not None:
        sign_staged(out, CARD_FILE, signing)
    return card, weights


def _already_published(run_dir: str, card: ModelCard, weights: str, signing: Ed25519PrivateKey | None) -> ModelCard | None:
    """The card in ``run_dir`` when it is ``card`` but for what ``_UNSTABLE`` names, everything it lists verifies,
    its model.pt holds the same bytes as the staged one before sealing (``weights``, their sha256) and, for a signed
    job, its signature verifies with this job's key (``signing``); else None."""
    try:
        published = load_model_card(run_dir)
    except ArtifactError:
        return None  # none yet, or not one: publish

    def stable(c: ModelCard) -> dict[str, Any]:
        return c.model_dump(mode="json", exclude=_UNSTABLE) | {"files": sorted(c.files)}

    if stable(published) != stable(card):
        return None
    try:
        # Whole: a mix left by a publication killed midway (files beside a card they do not match) is published again.
        verified = verify_artifacts(run_dir, read=[MODEL_FILE])
        if signing is not None:
            # verify_artifacts checks a signature only with the verifier's keys, which the trainer has not: a
            # signature missing, or left by a publication killed before its card, is repaired by publishing again.
            public = signing.public_key()
            signature = read_signature_file(run_dir)
            verify_card(read_card_bytes(run_dir), signature, {public_key_id(public): public}, storage.join(run_dir, CARD_FILE))
    except (ArtifactError, SignatureError, OSError):
        return None
    return published if storage.sha256_bytes(verified.contents[MODEL_FILE]) == weights else None


def _remove_contradicted(staging: Path, card: ModelCard, run_dir: str) -> None:
    """Remove from ``run_dir`` what ``card`` (staged in ``staging``, or its published twin) would contradict."""
    if not (staging / SIGNATURE_FILE).exists():
        storage.remove(storage.join(run_dir, SIGNATURE_FILE))  # an earlier run's, which this card would contradict
    # An earlier launch's exports that this card does not list (output.exports changed since): old weights under
    # a model file's name, which `finetune verify` calls unlisted and a signed-only consumer refuses.
    for name in sorted(set(EXPORT_FILES.values()) - set(card.files)):
        storage.remove(storage.join(run_dir, name))


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
    shipped_epoch: int | None = None,
    facts: RunFacts | None = None,
) -> Artifacts:
    """Write the model, its exports, the evaluation, the plots and the model card into ``run_dir`` (a path
    or an s3:// / gs:// URI) and return what the FineTuneJob status records about them. ``model`` holds
    the weights of epoch ``shipped_epoch`` and ``evaluation`` is theirs; ``checkpoint_uri`` names their checkpoint."""
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
        shipped_epoch=shipped_epoch,
        facts=facts or RunFacts(),
    )
    # Staged in a private local temporary directory (mode 0700), never under run_dir: with client-side
    # encryption the weights are in the clear until sealed, and a PVC (and its snapshots) must never hold them,
    # not even after a kill mid-export. Each file is then copied into place atomically (local run dir) or
    # uploaded (s3://, gs://); the card goes last. The directory is removed whatever happens.
    with tempfile.TemporaryDirectory(prefix="finetune-artifacts-") as tmp:
        staging = Path(tmp)
        card, weights = _stage(staging, **kwargs)
        published = _already_published(run_dir, card, weights, signing_key_for(cfg))
        _remove_contradicted(staging, card, run_dir)
        if published is not None:
            card = published
        else:
            kms_key = server_side_key(cfg)
            for name in _published(staging, card):
                storage.upload_file(staging / name, storage.join(run_dir, name), kms_key=kms_key)
    public = cfg.public_uri
    return Artifacts(
        model_uri=public(storage.join(run_dir, MODEL_FILE)),
        model_card_uri=public(storage.join(run_dir, CARD_FILE)),
        checkpoint_uri=public(checkpoint_uri),
        sha256=card.files[MODEL_FILE].sha256,
        exports={fmt: str(public(storage.join(run_dir, name))) for fmt, name in card.exports.items()},
        class_names=list(class_names),
        protection=card.protection,
    )
