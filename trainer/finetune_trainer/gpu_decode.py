"""``dataset.jpegDecode: gpu``: the streaming pipeline ships each file's bytes and the training worker decodes a
batch on its GPU (nvJPEG through ``torchvision.io.decode_jpeg``, one batched call), then resizes and augments
there, each image under ``seeding.seeded_sample`` as on the CPU path.

Why: a ResNet-50 in bf16 wants ~3,000 images/s per GPU, 15–30 cores of PIL decoding; nvJPEG does it on the card.
Files that are not JPEGs (PNG, …) are decoded one by one by ``torchvision.io.decode_image`` on the CPU and moved;
an unreadable one is ``None`` and handled as ``streaming`` handles one (replaced in training, dropped in
validation). Runs on the CPU too (``device="cpu"``), which is how the unit tests exercise it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from finetune_trainer.seeding import seeded_sample

__all__ = ["decode_on_device", "transform_on_device"]

_JPEG_MAGIC = (0xFF, 0xD8)


def _is_jpeg(data: Tensor) -> bool:
    return len(data) > 2 and (int(data[0]), int(data[1])) == _JPEG_MAGIC


def decode_on_device(blobs: Sequence[Any], device: torch.device) -> list[Tensor | None]:
    """Each file's bytes as a 3×H×W uint8 RGB tensor on ``device``, or None where it cannot be decoded."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    tensors = [torch.from_numpy(np.frombuffer(bytes(b), dtype=np.uint8).copy()) for b in blobs]
    out: list[Tensor | None] = [None] * len(tensors)
    jpegs = [i for i, t in enumerate(tensors) if _is_jpeg(t)]
    if jpegs:
        try:
            decoded = decode_jpeg([tensors[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpegs, decoded, strict=True):
                out[i] = image
        except RuntimeError:
            pass  # a corrupt JPEG fails the whole call: the rest one by one below, which finds it
    for i, data in enumerate(tensors):
        if out[i] is None and len(data):
            try:
                out[i] = decode_image(data, mode=ImageReadMode.RGB).to(device)
            except RuntimeError:
                out[i] = None
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
