"""`finetune predict`: classify images with the artifact directory of a finished job.

Everything needed comes from the model card (``model.json``): the architecture to rebuild, the class
names in output order, and the evaluation transforms the model was validated with. The weights come from
``model.pt`` or, with ``--format safetensors``, from ``model.safetensors`` (no pickle at all); either is
verified (``verify``: the card's signature, the file's sha256, decryption when it is encrypted) before it
is loaded, so a truncated or swapped file is reported as such rather than as a puzzling shape error.
An image whose short-side resize would be too large (``image_bounds``: a 1×100,000 strip) is refused from
its header. User errors (missing directory, bad image) are one line on stderr and exit status 2; called by
``finetune_trainer.cli``.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from collections.abc import Callable
from typing import Any, Final, cast

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision.transforms import v2 as T

from finetune_operator.api.fields import display_width, quote
from finetune_trainer import storage
from finetune_trainer.display import padded, shown_name
from finetune_trainer.errors import ArtifactError, exception_line
from finetune_trainer.image_bounds import OversizedImage, check_resize, short_side_resize
from finetune_trainer.inputs import InputSpec
from finetune_trainer.model_card import CARD_FILE, MODEL_FILE, load_model_card
from finetune_trainer.verify import verify_artifacts

__all__ = ["image_transform", "load_for_inference", "predict", "predict_command"]

_BATCH = 32


def image_transform(spec: InputSpec) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image of any mode → the normalised ``3×S×S`` tensor the model was validated on: the training
    run's own evaluation transform (``data.eval_transform``), so that predict and validation cannot drift."""
    from finetune_trainer.data import eval_transform

    # A Compose, not a closure over one: the readers find its resize there (image_bounds.short_side_resize).
    return cast(Callable[[Image.Image], torch.Tensor], T.Compose([_rgb, *eval_transform(spec).transforms]))


def _rgb(image: Image.Image) -> Image.Image:
    # RGB first: palette, RGBA and 16-bit files would otherwise reach Normalize with 1, 2 or 4 channels.
    return image.convert("RGB")


def _weights(data: bytes, uri: str, weights_format: str, card_architecture: str) -> dict[str, torch.Tensor]:
    if weights_format == "safetensors":
        from finetune_trainer.exports import read_safetensors

        state, metadata = read_safetensors(data, uri)
        named = metadata.get("architecture")
        if named is not None and named != card_architecture:
            raise ArtifactError(f"{uri}: its metadata names architecture {named!r} but the model card {card_architecture!r}")
        return state
    source = io.BytesIO(data)
    try:
        # Verified is not vouched for: an unsigned card lists whatever sha256 the file has, and it may inflate to GBs.
        storage.check_torch_archive(source)
    except storage.UnsafeArchive as e:
        raise ArtifactError(f"{uri}: {e}") from None
    # weights_only: unpickling a model file must never run code.
    return cast(dict[str, torch.Tensor], torch.load(source, map_location="cpu", weights_only=True))


def load_for_inference(
    artifact_dir: str, weights_format: str = "state_dict", *, require_signed: bool | None = None
) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor], list[str]]:
    """``(model in eval mode on CPU, image transform, class names)`` from an artifact directory (a path or
    an s3:// / gs:// URI), its weights from ``model.pt`` (``state_dict``) or ``model.safetensors``
    (``safetensors``). Raises ArtifactError when the card or the weights file is missing or does not match."""
    from finetune_trainer.exports import EXPORT_FILES
    from finetune_trainer.model import build_model, state_mismatch

    if weights_format not in ("state_dict", "safetensors"):
        raise ArtifactError(f"--format {weights_format!r}: accepted: state_dict (model.pt), safetensors (model.safetensors)")
    file_name = EXPORT_FILES[weights_format]
    uri = storage.join(artifact_dir, file_name)
    if file_name != MODEL_FILE and file_name not in load_model_card(artifact_dir).files:
        raise ArtifactError(
            f"{uri}: the model card lists no {file_name}; the job did not export {weights_format} "
            f"(spec.output.exports), use --format state_dict"
        )
    # The card's signature (required when FINETUNE_REQUIRE_SIGNED=true), the file's sha256 and, when it is
    # encrypted, its decryption: all before a byte of it is loaded.
    verified = verify_artifacts(artifact_dir, only=[file_name], read=[file_name], require_signed=require_signed)
    card, data = verified.card, verified.contents[file_name]
    class_names = card.class_names
    name = card.architecture.name
    try:
        model = build_model(name, None, len(class_names))
    except ValueError as e:
        # Both name the card's value, which may be a megabyte long: shortened.
        reason = quote(str(e), 120).strip("'")
        raise ArtifactError(
            f"{storage.join(artifact_dir, CARD_FILE)}: cannot rebuild architecture {quote(name)}: {reason}"
        ) from None
    try:
        state = _weights(data, uri, weights_format, name)
        # Checked before loading: torch's error is many lines, of which one line showed only its first.
        problems = state_mismatch(model.state_dict(), state) if isinstance(state, dict) else ""
        if problems:
            raise ArtifactError(f"{uri}: does not match architecture {name} with {len(class_names)} classes: {problems}")
        model.load_state_dict(state)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{uri}: does not load into {name} with {len(class_names)} classes: {exception_line(e)}") from None
    spec = card.input
    try:
        transform = image_transform(spec)
    except ValueError as e:
        raise ArtifactError(f"{storage.join(artifact_dir, CARD_FILE)}: input spec {spec} is not usable: {e}") from None
    return model.eval(), transform, class_names


def _open_image(path: str, resize: int | None = None) -> Image.Image:
    try:
        # Past MAX_IMAGE_PIXELS PIL only warns (a two-line dump) and decodes it anyway (a 12 KB PNG of 100 Mpx: 2 GB).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # From the header, before decoding: a 1x100000 PNG of a few KB resized to 232 was 5.4 Gpx (16 GB).
                check_resize(image.size, resize)
                image.load()
                loaded: Image.Image = image  # Pillow's context manager is typed loosely
                return loaded
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: is a directory, not an image") from None
    except OversizedImage as e:
        raise ArtifactError(f"{path}: {e}") from None
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        # PIL raises UnidentifiedImageError for non-images, OSError/SyntaxError for truncated ones, and
        # DecompressionBombError (an Exception, nothing more specific) past twice its MAX_IMAGE_PIXELS.
        raise ArtifactError(f"{path}: not a readable image ({exception_line(e)})") from None


def _read_input(path: str, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """The model's input for the image at ``path``: its decoded pixels are let go at once, so that a batch holds
    small tensors, never 32 decoded photos (32 copies of one small 81 Mpx PNG took 8 GB)."""
    image = _open_image(path, short_side_resize(transform))
    try:
        return transform(image)
    finally:
        image.close()


def predict(
    model: nn.Module, transform: Callable[[Image.Image], torch.Tensor], images: list[Image.Image], top_k: int
) -> list[list[tuple[int, float]]]:
    """For each image, the ``top_k`` (class index, probability) pairs, most probable first; ``OversizedImage`` (a
    ValueError) for an image too large once resized (``image_bounds``), before any is transformed."""
    resize = short_side_resize(transform)
    for image in images:
        check_resize(image.size, resize)
    return _top_k(model, [transform(im) for im in images], top_k)


def _top_k(model: nn.Module, inputs: list[torch.Tensor], top_k: int) -> list[list[tuple[int, float]]]:
    """``predict`` of inputs already transformed."""
    results: list[list[tuple[int, float]]] = []
    with torch.inference_mode():
        for start in range(0, len(inputs), _BATCH):
            batch = torch.stack(inputs[start : start + _BATCH])
            probs = torch.softmax(model(batch).float(), dim=1)
            values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
            results += [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(indices, values, strict=True)]
    return results


_MAX_NAME: Final = 64
"""Visible characters printed of a class name, escapes counted: a card's 100,000-character name is cut, then '…'."""


def predict_command(args: argparse.Namespace | Any) -> int:
    """``finetune predict --model DIR IMAGE... [--top-k K] [--format state_dict|safetensors]``: per image,
    its name and then the top-k ``label  probability`` lines. Images that cannot be read are reported and
    skipped; exit 2 if any."""
    top_k: int = args.top_k
    if top_k < 1:
        print(f"error: --top-k {top_k}: must be at least 1", file=sys.stderr)
        return 2
    try:
        # --require-signed only tightens: FINETUNE_REQUIRE_SIGNED=true still applies without it.
        model, transform, class_names = load_for_inference(
            args.model,
            getattr(args, "format", None) or "state_dict",
            require_signed=True if getattr(args, "require_signed", False) else None,
        )
    except (ArtifactError, storage.StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shown = [shown_name(name, _MAX_NAME) for name in class_names]
    width = max(map(display_width, shown))
    failed = 0
    # A chunk at a time: thousands of images on the command line must not all sit in memory at once.
    for start in range(0, len(args.images), _BATCH):
        readable: list[tuple[str, torch.Tensor]] = []
        for path in args.images[start : start + _BATCH]:
            try:
                readable.append((path, _read_input(path, transform)))
            except ArtifactError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
        tops = _top_k(model, [image for _, image in readable], top_k)
        for (path, _), top in zip(readable, tops, strict=True):
            print(path)
            for index, prob in top:
                print(f"  {padded(shown[index], width)}  {prob:.4f}")
    return 2 if failed else 0
