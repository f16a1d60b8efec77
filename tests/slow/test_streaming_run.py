"""The streaming ingest path on a real Ray: Ray Data reads a small ImageFolder (32 px PNGs) from an ``s3://`` bucket
through a real S3 API (moto's server) with the code a cluster runs: two workers train on rank 0's one listing, every
validation image evaluated once, and a run reads it without a copy in the cache directory and resumes after a
failure; a listing that fails on rank 0 ends the run in its one line. A local folder streamed:
tests/slow/test_streaming_cluster.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_trainer import driver
from finetune_trainer.artifacts import read_metrics
from finetune_trainer.errors import TrainerError
from finetune_trainer.image_folder import IMG_EXTENSIONS
from finetune_trainer.listing import list_image_folder
from tests.slow.conftest import MakeConfig
from tests.support.runs import write_image_folder
from tests.support.s3 import S3, s3_server

pytestmark = pytest.mark.slow

CLASSES = ("circle", "square")
PER_CLASS = 12


@pytest.fixture(scope="module")
def s3_ray() -> Iterator[S3]:
    """moto's S3 first, then a local Ray whose workers (and their Ray Data tasks) get its AWS_* variables."""
    import os

    import ray

    with s3_server("data") as s3:
        env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
        try:
            yield s3
        finally:
            ray.shutdown()


def test_an_s3_dataset_is_streamed_not_downloaded_and_resumes(s3_ray: S3, make_config: MakeConfig, tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "shapes", CLASSES, PER_CLASS)
    for path in sorted(folder.rglob("*.png")):
        s3_ray.client.put_object(Bucket="data", Key=f"shapes/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    cache = tmp_path / "cache"
    cfg = driver.absolute_output(
        make_config(
            "stream-s3",
            dataset={
                "format": "imagefolder",
                "classes": None,
                "maxPerClass": None,
                "trainUri": "s3://data/shapes",
                "validationSplit": 0.25,
                "cacheDir": str(cache),
            },
            hyperparameters={"epochs": 2, "batchSize": 8},
            runPolicy={"maxWorkerFailures": 1},
        )
    )
    # Every worker raises once after epoch 1: Ray Train relaunches them and they resume from its checkpoint.
    result = driver.build_trainer(cfg, fail_after_epoch=1, local=True).fit()

    assert result.metrics is not None and result.metrics["val_images"] == 6
    assert result.metrics["resumed_from"] == 1
    assert [r.epoch for r in read_metrics(cfg.run_dir)] == [1, 2]
    card = json.loads((Path(cfg.run_dir) / "model.json").read_text())
    assert card["data"]["ingest"] == "streaming"  # auto: an object store
    assert card["classNames"] == list(CLASSES)
    assert not cache.exists()  # nothing downloaded: the map-style path would have filled it


def test_two_workers_train_on_a_streamed_bucket_that_rank_zero_lists_once(
    s3_ray: S3, make_config: MakeConfig, tmp_path: Path
) -> None:
    """Two workers stream an s3 folder, each validation image evaluated once. Rank 0 lists it for both: every worker
    listing the bucket itself cost one listing's requests per worker (ImageNet: over a thousand each) and, on a bucket
    being written to, could give workers different files, splits and step counts."""
    folder = write_image_folder(tmp_path / "shapes", CLASSES, PER_CLASS)
    for path in sorted(folder.rglob("*.png")):
        s3_ray.client.put_object(Bucket="data", Key=f"ranks/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    before = s3_ray.listings()
    list_image_folder("trainUri", "s3://data/ranks")
    one_listing = s3_ray.listings() - before
    cfg = driver.absolute_output(
        make_config(
            "stream-s3-ranks",
            dataset={
                "format": "imagefolder",
                "classes": None,
                "maxPerClass": None,
                "trainUri": "s3://data/ranks",
                "validationSplit": 0.25,
            },
            strategy={"preciseBatchNorm": False},
            resources={"workers": 2, "cpusPerWorker": 1},
            hyperparameters={"epochs": 1, "batchSize": 8},
        )
    )
    result = driver.build_trainer(cfg, local=True).fit()

    assert result.metrics is not None and result.metrics["world_size"] == 2
    assert s3_ray.listings() - before - one_listing == one_listing, s3_ray.requests[-40:]
    # Both workers trained on rank 0's listing: its split holds out 6 of 24, each evaluated once (two workers' strided
    # shards, summed), per epoch and in rank 0's final evaluation (streamed through Ray Data as well).
    assert result.metrics["val_images"] == 6
    assert [r.epoch for r in read_metrics(cfg.run_dir)] == [1]
    card = json.loads((Path(cfg.run_dir) / "model.json").read_text())
    assert card["evaluation"]["numSamples"] == 6
    assert card["classNames"] == list(CLASSES)
    assert card["data"]["ingest"] == "streaming"  # auto: an object store
    assert card["data"]["trainImages"] == 18


def test_a_listing_that_fails_on_rank_zero_fails_both_workers_in_its_one_line(
    s3_ray: S3, make_config: MakeConfig, tmp_path: Path
) -> None:
    """Rank 0 alone lists the bucket while the other worker waits for its answer (in a barrier without a deadline). A
    user error there (a class folder with no images) must end the run at once with that line: not a wait for the
    collective's 30-minute timeout, not another rank's message, not a traceback. (That every rank raises the same line
    is tests/unit/test_rank_zero.py's, on real gloo: here Ray Train stops the waiting worker when rank 0 fails, so the
    job's error is rank 0's either way.)"""
    for key in ("broken/circle/0.png", "broken/square/notes.txt"):
        s3_ray.client.put_object(Bucket="data", Key=key, Body=b"not read: the listing fails first")
    before = s3_ray.listings()
    with pytest.raises(TrainerError) as raised:
        list_image_folder("trainUri", "s3://data/broken")
    one_listing = s3_ray.listings() - before
    cfg = make_config(
        "stream-s3-broken",
        dataset={"format": "imagefolder", "classes": None, "maxPerClass": None, "trainUri": "s3://data/broken"},
        resources={"workers": 2, "cpusPerWorker": 1},
        hyperparameters={"epochs": 1, "batchSize": 8},
    )
    with pytest.raises(TrainerError) as failed:
        driver.run(cfg, local=True)

    assert str(failed.value) == str(raised.value)
    assert str(failed.value) == (
        "dataset.trainUri: class folder s3://data/broken/square holds no images "
        f"({', '.join(IMG_EXTENSIONS)}); add some or remove it"
    )
    # One attempt (no maxWorkerFailures), one listing in it: rank 0's.
    assert s3_ray.listings() - before - one_listing == one_listing, s3_ray.requests[-40:]
