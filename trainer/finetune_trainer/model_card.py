"""The model card, ``model.json``: what a trained model is, how to feed it, how good it is, checksums.

The human-readable ``README.md`` beside it is a rendering of this same typed card (``model_card_md``),
never a second source of truth: what it shows (data counts, recipe, per-class metrics, warnings) is here.

``ModelCard`` is typed (pydantic, camelCase on the wire like the API): ``artifacts`` builds and writes
it last, so its presence means the artifact directory is complete; ``load_model_card`` reads it back,
validated, for ``finetune predict`` and for reusing a head when a job starts from an earlier job's
``model.pt``. A card that does not validate is an ``ArtifactError`` naming the file and the fields.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from finetune_operator.api.base import WireModel
from finetune_operator.api.protection import ArtifactProtection
from finetune_trainer import storage
from finetune_trainer.errors import ArtifactError, exception_line
from finetune_trainer.inputs import InputSpec
from finetune_trainer.metrics_log import EpochRecord

__all__ = [
    "CARD_FILE",
    "CARD_SCHEMA_VERSION",
    "MODEL_FILE",
    "Architecture",
    "BestEpoch",
    "CardData",
    "CardEvaluation",
    "CardMetrics",
    "CardPart",
    "CardRecipe",
    "ClassMetrics",
    "FileEntry",
    "JobRef",
    "ModelCard",
    "NoWeights",
    "TorchvisionWeights",
    "UriWeights",
    "Versions",
    "WeightsSource",
    "load_model_card",
    "parse_model_card",
    "read_card_bytes",
]

CARD_FILE: Final = "model.json"
MODEL_FILE: Final = "model.pt"
"""The fine-tuned state_dict: the one file every card lists."""
CARD_SCHEMA_VERSION: Final = 1
_SHOWN_PROBLEMS: Final = 6


class CardPart(WireModel):
    """A part of the card. A card written by a newer trainer may carry keys this version does not know:
    they are ignored rather than refused (WireModel forbids them, which suits manifests, not files that
    outlive the trainer version that wrote them), so that an older `finetune predict` still serves it."""

    model_config = ConfigDict(extra="ignore")


class JobRef(CardPart):
    name: str
    namespace: str | None
    uid: str | None


class Architecture(CardPart):
    name: str
    """The torchvision model name, enough to rebuild it (``torchvision.models.get_model``)."""
    family: str | None = None
    class_name: str | None = Field(None, alias="class")
    parameters: int | None = None


class NoWeights(CardPart):
    source: Literal["none"] = "none"


class UriWeights(CardPart):
    source: Literal["uri"] = "uri"
    uri: str


class TorchvisionWeights(CardPart):
    source: Literal["torchvision"] = "torchvision"
    name: str
    """The weights enum member it resolved to, e.g. ``ResNet18_Weights.IMAGENET1K_V1``."""
    requested: str
    """As the spec named them, e.g. ``DEFAULT``."""


WeightsSource = Annotated[NoWeights | UriWeights | TorchvisionWeights, Field(discriminator="source")]


def _epoch_record(value: Any) -> EpochRecord:
    if isinstance(value, EpochRecord):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError(
            "epoch_record", "expected an epoch record (an object), not {kind}", {"kind": type(value).__name__}
        )
    try:
        return EpochRecord.from_wire(value)
    except (KeyError, TypeError, ValueError) as e:
        raise PydanticCustomError("epoch_record", "not an epoch record ({error})", {"error": exception_line(e)}) from None


# A line of metrics.jsonl, in metrics.jsonl's own wire form (EpochRecord.to_wire / from_wire).
WireEpochRecord = Annotated[EpochRecord, PlainValidator(_epoch_record), PlainSerializer(EpochRecord.to_wire)]


class BestEpoch(CardPart):
    val_accuracy: float | None
    epoch: int | None


class CardMetrics(CardPart):
    final: WireEpochRecord | None
    """The last epoch's line of metrics.jsonl."""
    best: BestEpoch
    shipped: WireEpochRecord | None = None
    """The line of the epoch whose weights ``model.pt`` holds: the best epoch's (absent in cards
    written before model.pt held the best weights, when it held the last epoch's)."""
    epochs: int


class ClassMetrics(CardPart):
    """One class of the final evaluation."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int


class CardEvaluation(CardPart):
    """The headline numbers of ``evaluation.json`` (named by ``report``) and its per-class lines."""

    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_f1: float
    num_samples: int
    report: str
    classes: list[ClassMetrics] = Field(default_factory=list)
    """In class order (absent in cards written before the README card)."""
    min_accuracy: float | None = None
    """``spec.evaluation.minAccuracy``, the gate the best validation accuracy was held to."""


class CardData(CardPart):
    """Where the images came from and how many each split had."""

    format: str
    train_uri: str | None = None
    validation_uri: str | None = None
    train_images: int | None = None
    validation_images: int | None = None
    ingest: str | None = None
    """How the images reached the workers: `streaming` (Ray Data, listed not copied) or `mapStyle` (absent for digits/fake
    and in older cards)."""


class CardRecipe(CardPart):
    """How the model was trained: the spec's choices and what the defaults chose from the data (``recipe``)."""

    strategy: str
    epochs: int
    batch_size: int | None
    passes_per_epoch: int | None = None
    optimizer: str
    learning_rate: float
    scheduler: str
    chosen: str | None = None
    """What the automatic defaults chose and why (``BatchPlan.chosen``); null when the spec set the batch size."""


class Versions(CardPart):
    python: str
    torch: str
    torchvision: str | None
    ray: str | None
    finetune_operator: str


class FileEntry(CardPart):
    sha256: str
    """Of the bytes as stored: the ciphertext of an encrypted file, so sums are checked without the key."""
    size: int = Field(alias="bytes", ge=0)
    # Left out of the card for files in the clear: cards of unencrypted runs read as they always did.
    encryption_key_id: str | None = Field(None, exclude_if=lambda value: value is None)
    """The file is encrypted (``sealing``) with this key id; None: stored in the clear."""


def _lists_the_model(files: dict[str, FileEntry]) -> dict[str, FileEntry]:
    if MODEL_FILE not in files:
        raise PydanticCustomError("model_file", "no entry for {name}", {"name": MODEL_FILE})
    # verify and predict read each name beside the card: '../../dev/zero' read until memory ran out, and
    # '../../etc/passwd' a file outside the directory (the trainer writes plain names only).
    for name in files:
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise PydanticCustomError(
                "file_name",
                "{name} is not a file name of the artifact directory (a plain name: no '/', not '..')",
                {"name": repr(name[:120])},
            )
    return files


class ModelCard(CardPart):
    """The card. What ``predict`` and head reuse need is required (architecture, classes, input, files
    with ``model.pt``); the rest is optional on read, so that a hand-written card loads as it always did.
    The trainer writes every part."""

    schema_version: int = CARD_SCHEMA_VERSION
    created_at: str | None = None
    job: JobRef | None = None
    architecture: Architecture
    weights: WeightsSource | None = None
    num_classes: int | None = None
    class_names: list[str]
    """In output order: index i of the logits is ``class_names[i]``."""
    input: InputSpec
    data: CardData | None = None
    recipe: CardRecipe | None = None
    metrics: CardMetrics | None = None
    evaluation: CardEvaluation | None = None
    warnings: list[str] = Field(default_factory=list)
    """What the run warned about (BatchNorm collapse, a checkpoint it could not use), oldest first."""
    exports: dict[str, str] = Field(default_factory=dict)
    """Export format → file name in the artifact directory."""
    spec: dict[str, Any] | None = None
    """The job's spec as the API writes it (kept as plain JSON, so a card of another API version loads)."""
    versions: Versions | None = None
    files: Annotated[dict[str, FileEntry], AfterValidator(_lists_the_model)]
    """Every file of the artifact directory but the card itself (and its signature), with its checksum and size."""
    protection: ArtifactProtection | None = None
    """Encrypted, signed, by which key ids; an unsigned card says ``signed: false`` (absent in older cards)."""

    def to_json(self) -> str:
        """The card as written to ``model.json``: every key, unset ones as null (unlike ``to_wire``)."""
        return json.dumps(self.model_dump(by_alias=True, mode="json"), indent=2) + "\n"


def _problems(error: ValidationError) -> str:
    """One line for a validation error: the missing fields together, then each other problem."""

    def where(loc: tuple[int | str, ...]) -> str:
        return ".".join(map(str, loc)) or "the card"

    errors = error.errors()
    missing = [where(e["loc"]) for e in errors if e["type"] == "missing"]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + [
        f"{where(e['loc'])}: {e['msg']}" for e in errors if e["type"] != "missing"
    ]
    more = f"; … ({len(problems)} problems in all)" if len(problems) > _SHOWN_PROBLEMS else ""
    return "; ".join(problems[:_SHOWN_PROBLEMS]) + more


MAX_CARD_BYTES: Final = 16 << 20
"""Largest model card read (16 MiB): ImageNet-21k's class names fit in under one."""


def read_card_bytes(artifact_dir: str) -> bytes:
    """The exact bytes of an artifact directory's card (what its signature covers)."""
    uri = storage.join(artifact_dir, CARD_FILE)
    try:
        data = storage.read_bytes(uri, at_most=MAX_CARD_BYTES)
        if len(data) > MAX_CARD_BYTES:
            raise ArtifactError(f"{uri}: larger than {MAX_CARD_BYTES >> 20} MiB, so not a model card (one is a few KiB)")
        return data
    except FileNotFoundError:
        raise ArtifactError(
            f"{uri}: no model card; --model must be the artifact directory of a finished job (<output.uri>/<job name>)"
        ) from None
    except OSError as e:
        raise ArtifactError(f"{uri}: cannot read: {e}") from None


def load_model_card(artifact_dir: str) -> ModelCard:
    """The model card of an artifact directory (path or URI), validated."""
    return parse_model_card(read_card_bytes(artifact_dir), storage.join(artifact_dir, CARD_FILE))


def parse_model_card(data: bytes, uri: str) -> ModelCard:
    """A card's bytes (read from ``uri``) as a validated ModelCard; ArtifactError naming ``uri`` otherwise."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{uri}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{uri}: not valid JSON ({e})") from None
    except RecursionError:  # json's reader recurses per level: a card is a few levels deep
        raise ArtifactError(f"{uri}: not valid JSON (nested deeper than Python's JSON reader goes)") from None
    except ValueError as e:  # a number past Python's 4300-digit limit; its advice (set_int_max_str_digits) is not ours
        raise ArtifactError(f"{uri}: not valid JSON ({str(e).split(';', 1)[0]})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{uri}: not a model card (a JSON {type(raw).__name__}, expected an object)")
    try:
        # Strict, as JSON: the card is JSON, and a value of the wrong type (imageSize: true) is not quietly converted.
        return ModelCard.model_validate_json(data, strict=True)
    except ValidationError as e:
        raise ArtifactError(f"{uri}: not a model card: {_problems(e)}") from None
