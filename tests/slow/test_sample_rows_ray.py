"""The streaming rows built in Ray Data read tasks (``sample_rows.PositionRows``), on a real local Ray: the rows a
decode task receives are the listing's (names that are not UTF-8 or hold ``::`` included, a list read ``passes``
times, in the epoch's order), an epoch with no position streams nothing, and the read runs in the decode task
(fused), whether a CPU is free or not: an unfused read is one more task and one more object per 64 images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import ray.data
from PIL import Image

from finetune_trainer import streaming
from finetune_trainer.data import eval_transform
from finetune_trainer.inputs import InputSpec
from finetune_trainer.sample_rows import SampleTable
from finetune_trainer.streaming import Decoder, EpochRows

pytestmark = pytest.mark.slow

INPUT = InputSpec(
    image_size=16, resize_size=18, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", grayscale_to_rgb=True
)
NAMES = [b"plain.png", b"\xff-not-utf8.png", "été.png".encode(), b"x::y.png", b"a b.png"]


def listing(root: Path) -> list[tuple[str, int]]:
    """Images named as ``NAMES`` under ``root``, listed as ``os.walk`` gives them (surrogate-escaped str paths)."""
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for label, name in enumerate(NAMES):
        path = os.fsdecode(os.path.join(os.fsencode(root), name))
        Image.new("RGB", (20, 20), (40 * label, 90, 160)).save(path, format="PNG")
        samples.append((path, label % 2))
    return samples


def streamed(samples: list[tuple[str, int]], positions: np.ndarray, decoder: Decoder, per_batch: int) -> list[dict[str, Any]]:
    return list(streaming._stream(EpochRows(SampleTable(samples), positions), decoder, per_batch, False))


def test_the_rows_reach_the_decoder_as_listed_in_the_epochs_order(local_ray: None, tmp_path: Path) -> None:
    samples = listing(tmp_path / "images")
    passes = 3
    positions = np.random.default_rng(3).permutation(len(samples) * passes)
    raw = Decoder(eval_transform(INPUT), seed=0, epoch=None, raw=True)  # hands back path, label and key with the bytes
    batches = streamed(samples, positions, raw, per_batch=4)
    got = [(str(p), int(label), int(key)) for b in batches for p, label, key in zip(b["path"], b["label"], b["key"], strict=True)]
    n = len(samples)
    assert got == [(samples[p % n][0], samples[p % n][1], int(p)) for p in positions]
    assert all(len(data) > 0 for b in batches for data in b["data"])  # every file, the non-UTF-8 name included, read


def test_every_listed_image_decodes_the_non_utf8_name_included(local_ray: None, tmp_path: Path) -> None:
    samples = listing(tmp_path / "images")
    decoder = Decoder(eval_transform(INPUT), seed=0, epoch=None)
    batches = streamed(samples, np.arange(len(samples)), decoder, per_batch=8)
    assert [str(bad) for b in batches for bad in b["bad"]] == [""] * len(samples)
    assert sum(len(b["image"]) for b in batches) == len(samples)


def test_an_epoch_without_positions_streams_nothing(local_ray: None, tmp_path: Path) -> None:
    """A rank's validation shard can be empty (fewer held-out images than workers)."""
    samples = listing(tmp_path / "images")
    assert streamed(samples, np.arange(0, dtype=np.int64), Decoder(eval_transform(INPUT), 0, None), per_batch=8) == []


@pytest.mark.parametrize("free_cpus", [2.0, 0.0], ids=["a-cpu-free", "every-cpu-held"])
def test_the_rows_are_read_in_the_decode_task(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_cpus: float
) -> None:
    """Ray Data's own stats name the operators that ran: one ``Read...->MapBatches(...)`` operator, not two."""
    samples = listing(tmp_path / "images")
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": free_cpus})  # what _decode_resources sees
    seen: list[Any] = []
    iter_batches = ray.data.Dataset.iter_batches

    def recording(self: Any, **kwargs: Any) -> Any:
        seen.append(self)
        return iter_batches(self, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", recording)
    decoder = Decoder(eval_transform(INPUT), seed=0, epoch=None)
    streamed(samples, np.arange(200) % len(samples), decoder, per_batch=8)  # 4 read tasks
    (dataset,) = seen
    stats = dataset.stats()
    assert "ReadPositionRows->MapBatches(BlockDecoder)" in stats, stats
