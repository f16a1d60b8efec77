"""A streamed validation set that begins with a run of unreadable images, on a real Ray with one CPU: Ray Data
batches a block of 64 that holds nothing readable together with the next, normal one (before, the first block's
placeholder array had another dtype and shape, and Ray Data failed the run with a traceback); the worker drops
and counts them, and the job fails with the one-line unreadable-limit error naming some of them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune_trainer import driver
from finetune_trainer.errors import TrainerError
from tests.slow.conftest import MakeConfig

pytestmark = pytest.mark.slow

CLASSES = ("circle", "square")
UNREADABLE = 70
"""More than a block (64 rows) in a row, at the start of the validation list: one block has nothing readable."""


@pytest.fixture(scope="module")
def one_cpu_ray() -> Iterator[None]:
    """One logical CPU, held by the training worker: decode tasks run beside it without a reservation."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def _images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.default_rng(seed + i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"good-{i:02d}.png")


def test_a_block_of_unreadable_validation_images_is_counted_and_fails_the_job_in_one_line(
    one_cpu_ray: None, make_config: MakeConfig, tmp_path: Path
) -> None:
    for label, name in enumerate(CLASSES):
        _images(tmp_path / "train" / name, 6, 100 * label)
        _images(tmp_path / "val" / name, 4, 1000 + 100 * label)
    for i in range(UNREADABLE):  # listed before the good ones ("00.jpg" < "good-00.png")
        (tmp_path / "val" / "circle" / f"{i:02d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG's magic, then nothing")
    cfg = make_config(
        "stream-unreadable",
        dataset={
            "format": "imagefolder",
            "classes": None,
            "maxPerClass": None,
            "trainUri": str(tmp_path / "train"),
            "validationUri": str(tmp_path / "val"),
            "ingest": "streaming",
        },
        strategy={"preciseBatchNorm": False},
        hyperparameters={"epochs": 1, "batchSize": 8},
    )
    with pytest.raises(TrainerError) as info:
        driver.run(cfg, local=True)

    message = str(info.value)
    assert "\n" not in message
    circle = tmp_path / "val" / "circle"
    # All 70 counted (the training images read count too); the first files named; the limit said.
    assert message.startswith(f"dataset: {UNREADABLE} of "), message
    assert f"cannot be decoded (e.g. {circle}/00.jpg, {circle}/01.jpg, {circle}/02.jpg); at most 1% may be" in message
