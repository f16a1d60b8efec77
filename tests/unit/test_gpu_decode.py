"""``jpegDecode: gpu``'s decoding (``gpu_decode.decode_on_device``) on the CPU, and on CUDA where there is one:
every listed image type is read (non-JPEGs by PIL), and one corrupt JPEG costs only itself, the rest of its batch
still decoded by ``decode_jpeg`` on the device (from the adversarial review of issue 14: F4, F10)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_trainer.gpu_decode import decode_on_device

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")),
]


def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (8, 8), 128 if mode == "L" else (10, 20, 30)).save(buffer, fmt)
    return buffer.getvalue()


def _jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(shade).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("fmt", "mode"), [("BMP", "RGB"), ("TIFF", "RGB"), ("PPM", "RGB"), ("PPM", "L"), ("PNG", "RGB")])
def test_device_decode_reads_every_listed_image_format(fmt: str, mode: str, device: str) -> None:
    (image,) = decode_on_device([_encoded(fmt, mode)], torch.device(device))
    assert image is not None and image.shape == (3, 8, 8) and image.dtype == torch.uint8
    assert image.device.type == device
    expected = (128, 128, 128) if mode == "L" else (10, 20, 30)
    assert tuple(int(v) for v in image[:, 0, 0]) == expected


@pytest.mark.parametrize("device", DEVICES)
def test_one_corrupt_jpeg_does_not_send_its_whole_batch_to_cpu_decoding(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    import torchvision.io

    real_jpeg, jpeg_calls = torchvision.io.decode_jpeg, []
    real_image, image_calls = torchvision.io.decode_image, []

    def counted_jpeg(data: Any, *args: Any, **kwargs: Any) -> Any:
        jpeg_calls.append((len(data) if isinstance(data, list) else 1, str(kwargs.get("device"))))
        return real_jpeg(data, *args, **kwargs)

    def counted_image(data: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        image_calls.append(len(data))
        return real_image(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", counted_jpeg)
    monkeypatch.setattr(torchvision.io, "decode_image", counted_image)
    blobs = [_jpeg(1), b"\xff\xd8\xff\xe0 not really a jpeg", _jpeg(2), _jpeg(3)]
    out = decode_on_device(blobs, torch.device(device))
    assert [image is None for image in out] == [False, True, False, False]
    assert image_calls == [], "a JPEG of the batch left the device path for decode_image"
    # One batched call that fails, then each JPEG alone, all on the decode device.
    assert jpeg_calls == [(4, device)] + [(1, device)] * 4
    for image, blob in zip(out, blobs, strict=True):
        if image is not None:
            assert image.device.type == device
            assert torch.equal(image.cpu(), real_jpeg(torch.frombuffer(bytearray(blob), dtype=torch.uint8)))
