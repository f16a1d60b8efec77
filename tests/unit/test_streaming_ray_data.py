"""What the streaming path hands Ray Data, without a Ray runtime: every decoded block has one dtype and one image
shape, a block none of whose images can be read included (Ray Data concatenates blocks into batches), and the
decode step is configured with ``map_batches``' named parameters only (Ray 2.60 deprecates the rest)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import ray.data
import torch
from PIL import Image
from ray.data import TaskPoolStrategy
from ray.util.annotations import RayDeprecationWarning

from finetune_trainer import streaming
from finetune_trainer.data import eval_transform
from finetune_trainer.image_folder import StreamedImages
from finetune_trainer.inputs import InputSpec
from finetune_trainer.streaming import Decoder, StreamSource, split_finish

INPUT = InputSpec(
    image_size=16, resize_size=18, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", grayscale_to_rgb=True
)


def rows(root: Path, count: int, readable: bool) -> dict[str, np.ndarray]:
    """A block of ``count`` rows as Ray Data hands it to the decoder: JPEGs of odd sizes, or broken ones."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"{i}.jpg"
        if readable:
            Image.new("RGB", (20 + 3 * i, 17 + i), (i * 30 % 255, 90, 160)).save(path)
        else:
            path.write_bytes(b"\xff\xd8\xff\xe0 a JPEG's magic, then nothing readable")
        paths.append(str(path))
    return {"path": np.asarray(paths, dtype=object), "label": np.arange(count) % 2, "key": np.arange(count)}


@pytest.mark.parametrize("shipped", ["uint8", "float32"], ids=["split-preset", "whole-preset"])
def test_an_evaluation_block_with_nothing_readable_concatenates_with_a_normal_one(tmp_path: Path, shipped: str) -> None:
    """Before: ``np.zeros((n, 1), float32)`` beside ``(n, 3, H, W)`` uint8 blocks, which Ray Data cannot batch together."""
    transform = eval_transform(INPUT)
    per_image = split_finish(transform)[0] if shipped == "uint8" else transform  # what StreamSource ships, or the whole
    good = Decoder(per_image, seed=0, epoch=None)(rows(tmp_path / "good", 3, readable=True))
    broken_rows = rows(tmp_path / "broken", 4, readable=False)
    broken = Decoder(per_image, seed=0, epoch=None)(broken_rows)
    assert good["image"].dtype == np.dtype(shipped) and good["image"].shape == (3, 3, 16, 16)
    assert broken["image"].dtype == good["image"].dtype and broken["image"].shape == (4, 3, 16, 16)
    batch = {k: np.concatenate([good[k], broken[k]]) for k in ("image", "label", "bad")}
    assert batch["image"].shape == (7, 3, 16, 16)
    assert list(batch["bad"]) == ["", "", "", *broken_rows["path"]]  # the consumer drops and counts these four
    assert list(batch["label"]) == [0, 1, 0, 0, 1, 0, 1]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")),
    ],
)
def test_a_device_decoded_batch_with_nothing_readable_has_the_shape_of_the_others(tmp_path: Path, device: str) -> None:
    """``jpegDecode: gpu`` (on the CPU where there is no GPU): before, ``torch.zeros(n, 1)`` on the host."""
    transform = eval_transform(INPUT)
    images = StreamedImages([("/unused.jpg", 0)] * 4, transform)
    where = torch.device(device)
    source = StreamSource(images, images, seed=0, rank=0, world=1, per_worker=4, decode_device=where)
    raw = Decoder(transform, seed=0, epoch=None, raw=True)
    good = source._decode_here(raw(rows(tmp_path / "good", 3, readable=True)), transform, None, where)
    broken = source._decode_here(raw(rows(tmp_path / "broken", 2, readable=False)), transform, None, where)
    assert good["image"].shape == (3, 3, 16, 16)
    assert broken["image"].shape == (2, 3, 16, 16) and broken["image"].dtype == good["image"].dtype
    assert broken["image"].device == good["image"].device
    assert all(broken["bad"])


class Unexecuted(ray.data.Dataset):
    """A Dataset with no plan, never executed: only ``map_batches``' own checks run on it."""

    def __init__(self) -> None:
        pass

    def __del__(self) -> None:
        pass


@pytest.mark.parametrize(
    ("free_cpus", "resources"),
    [(4.0, {"num_cpus": 1, "compute": None}), (0.0, {"num_cpus": 0, "compute": TaskPoolStrategy(size=2)})],
    ids=["a-cpu-free", "every-cpu-held"],
)
def test_the_decode_step_uses_map_batches_named_parameters_only(
    monkeypatch: pytest.MonkeyPatch, free_cpus: float, resources: dict[str, Any]
) -> None:
    """Ray 2.60's public ``map_batches`` on a Dataset that is never executed (no Ray runtime): its deprecation of
    ``**ray_remote_args`` (before: ``scheduling_strategy``) is an error here, and the legacy ``concurrency``
    (before: ``concurrency=2``, deprecated for functions since Ray 2.51) is not used."""
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": free_cpus})
    received: dict[str, Any] = {}

    def build(self: Any, fn: Any, **kwargs: Any) -> Any:  # what map_batches passes on once it has validated
        received.update(kwargs)
        return self

    monkeypatch.setattr(ray.data.Dataset, "map_batches_internal", build)
    dataset = Unexecuted()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        streaming._decoded(dataset, Decoder(eval_transform(INPUT), seed=0, epoch=None), streaming._decode_resources())
    remote = {k: v for k, v in received.items() if v is not None and k not in ("fn", "batch_size", "batch_format")}
    assert received["concurrency"] is None
    assert {"num_cpus": received["num_cpus"], "compute": received["compute"]} == resources
    # Nothing else reaches Ray's remote options (the named ones are all None).
    assert set(remote) <= {"num_cpus", "compute", "zero_copy_batch", "udf_modifying_row_count"}
