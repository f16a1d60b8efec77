"""A streamed validation set that begins with a run of unreadable images, through Ray Data on a real Ray with one
CPU (the decode tasks run unreserved beside a training worker, as in a small local run): Ray Data batches a block
of 64 that holds nothing readable together with the next, normal one (before, the first block's placeholder array
had another dtype and shape, and Ray Data failed the epoch with a traceback); the worker drops and counts them, and
the epoch's check fails with the one-line unreadable-limit error naming some of them. The StreamSource is driven
directly, without a Ray Train fit: a fit adds a minute and nothing this test looks at (the loop's use of
``end_epoch`` is covered in tests/unit/test_streaming.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.data import build_input_spec, eval_transform
from finetune_trainer.errors import TrainerError
from finetune_trainer.image_folder import StreamedImages
from finetune_trainer.streaming import StreamSource

pytestmark = pytest.mark.slow

UNREADABLE = 70
"""More than a block (64 rows) in a row, at the start of the validation list: one block has nothing readable."""
GOOD = 8


@pytest.fixture(scope="module")
def no_free_cpu_ray() -> Iterator[None]:
    """No free CPU, as when the training workers hold them all: decode tasks go without a reservation."""
    import ray

    ray.init(address="local", num_cpus=0, include_dashboard=False)  # every CPU held: the unreserved branch
    yield
    ray.shutdown()


def test_a_block_of_unreadable_validation_images_is_counted_and_fails_the_epoch_in_one_line(
    no_free_cpu_ray: None, tmp_path: Path
) -> None:
    folder = tmp_path / "val" / "circle"
    folder.mkdir(parents=True)
    samples: list[tuple[str, int]] = []
    for i in range(UNREADABLE):  # listed first: the first block (64 rows) holds nothing readable
        path = folder / f"{i:02d}.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0 a JPEG's magic, then nothing")
        samples.append((str(path), 0))
    for i in range(GOOD):
        path = folder / f"good-{i:02d}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), 0))
    spec = FineTuneJobSpec.model_validate(
        {"model": {"name": "resnet18"}, "dataset": {"imageSize": 16, "trainUri": str(tmp_path)}, "output": {"uri": "/out"}}
    )
    transform = eval_transform(build_input_spec(TrainerConfig(job_name="job", spec=spec, output_root="/out")))
    images = StreamedImages(samples, transform)
    source = StreamSource(images, images, seed=0, rank=0, world=1, per_worker=32)

    batches = list(source.val)  # per_worker 32: validation batches of 64, the first all unreadable

    # The one decode stage may use every CPU: Ray Data's per-operator reservation is off (bench/README.md "Ingest").
    import ray.data

    assert ray.data.DataContext.get_current().op_resource_reservation_enabled is False
    assert sum(len(labels) for _, labels in batches) == GOOD  # each readable image once, the unreadable dropped
    assert all(images_.shape[1:] == (3, 16, 16) and images_.dtype == torch.float32 for images_, _ in batches)
    with pytest.raises(TrainerError) as info:
        source.end_epoch(torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"dataset: {UNREADABLE} of {UNREADABLE + GOOD} images read cannot be decoded"), message
    assert f"(e.g. {folder}/00.jpg, {folder}/01.jpg, {folder}/02.jpg); at most 1% may be" in message

    # Rank 0's final evaluation streams the whole validation set through Ray Data too, with its own count: the same
    # images, labels and pixels as reading them in this process (the map-style fallback; the streamed path normalises
    # the decoded uint8 images in another order of float operations: last-bit differences), the same one-line limit.
    from finetune_trainer.unreadable import Unreadable, readable_batches

    streamed, read_here = Unreadable(), Unreadable()
    final = list(source.evaluation_batches(40, streamed))
    local = list(readable_batches(images, 40, read_here))
    assert sum(len(labels) for _, labels in final) == GOOD
    torch.testing.assert_close(torch.cat([i for i, _ in final]), torch.cat([i for i, _ in local]), atol=1e-5, rtol=0)
    assert torch.equal(torch.cat([lab for _, lab in final]), torch.cat([lab for _, lab in local]))
    for tally in (streamed, read_here):
        with pytest.raises(TrainerError, match=f"^dataset: {UNREADABLE} of {UNREADABLE + GOOD} images read cannot be decoded"):
            tally.check_here()
