"""``dataset.jpegDecode: gpu``: the streaming pipeline ships each file's bytes and the training worker decodes a
batch on its GPU (nvJPEG through ``torchvision.io.decode_jpeg``, one batched call), then resizes and augments
there, each image under ``seeding.seeded_sample`` as on the CPU path.

Why: a ResNet-50 in bf16 wants ~3,000 images/s per GPU, 15–30 cores of PIL decoding; nvJPEG does it on the card.
A batch holding a corrupt JPEG is decoded again one JPEG at a time on the device: only the corrupt one is lost.
Files that are not JPEGs (PNG, BMP, TIFF, PPM, …) are decoded one by one by PIL on the CPU, as on the CPU path,
and moved; an unreadable one is ``None`` and handled as ``streaming`` handles one (replaced in training, dropped
in validation), as is one too large once its short side is resized (``image_bounds``, from the header: nvJPEG
would decode a 1×60,000 JPEG and the resize make 232×13,920,000 pixels on the card). Runs on the CPU too
(``device="cpu"``), which is how the unit tests exercise it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from finetune_trainer.image_bounds import OversizedImage, check_resize
from finetune_trainer.image_folder import READ_ERRORS, decode_image
from finetune_trainer.seeding import seeded_sample

__all__ = ["decode_on_device", "transform_on_device"]

_JPEG_MAGIC = (0xFF, 0xD8)


def _is_jpeg(data: Tensor) -> bool:
    return len(data) > 2 and (int(data[0]), int(data[1])) == _JPEG_MAGIC


def _decode_jpegs(tensors: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """The JPEGs decoded on ``device`` in one batched call; when it fails (one corrupt file fails the whole call),
    each one alone on the same device, so that only the failing ones are None and the batch stays on the card."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out: list[Tensor | None] = []
    for data in tensors:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


def _decode_other(data: bytes, device: torch.device, resize: int | None) -> Tensor | None:
    """A file that is not a JPEG, decoded by PIL on the CPU (BMP, TIFF, PPM, PGM: every listed image type, which
    ``torchvision.io.decode_image`` is not) as a 3×H×W uint8 RGB tensor moved to ``device``; None if unreadable or
    too large once resized to ``resize``."""
    try:
        image = decode_image(data, resize)
    except READ_ERRORS:
        return None
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().to(device)


def _oversized_jpeg(data: bytes, resize: int | None) -> bool:
    """Whether a JPEG's header (read by PIL, nothing decoded) declares a size too large once resized to ``resize``.
    A header PIL cannot read is left to nvJPEG, which decides what it can decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_resize(img.size, resize)
    except OversizedImage:
        return True
    except READ_ERRORS:
        return False
    return False


def decode_on_device(blobs: Sequence[Any], device: torch.device, resize: int | None = None) -> list[Tensor | None]:
    """Each file's bytes as a 3×H×W uint8 RGB tensor on ``device``, or None where it cannot be decoded or would be too
    large once its short side is resized to ``resize`` (the transform's, ``image_bounds``)."""
    raw = [bytes(b) for b in blobs]
    tensors = [torch.from_numpy(np.frombuffer(b, dtype=np.uint8).copy()) for b in raw]
    out: list[Tensor | None] = [None] * len(tensors)
    jpegs = [i for i, t in enumerate(tensors) if _is_jpeg(t) and not (resize is not None and _oversized_jpeg(raw[i], resize))]
    if jpegs:
        for i, image in zip(jpegs, _decode_jpegs([tensors[i] for i in jpegs], device), strict=True):
            out[i] = image
    for i, data in enumerate(raw):
        if i not in jpegs and data and not _is_jpeg(tensors[i]):
            out[i] = _decode_other(data, device, resize)
    return out


def transform_on_device(
    images: Sequence[Tensor], keys: Sequence[int], transform: Callable[[Any], Tensor], seed: int, epoch: int | None
) -> Tensor:
    """``transform`` of each image where it lies (seeded by ``(seed, epoch, key)`` in training), stacked."""
    out = []
    for image, key in zip(images, keys, strict=True):
        if epoch is None:
            out.append(transform(image))
        else:
            with seeded_sample(seed, epoch, int(key)):
                out.append(transform(image))
    return torch.stack(out)
