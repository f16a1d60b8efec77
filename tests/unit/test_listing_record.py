"""A retried attempt splits what the first one did (review F11): the first attempt records the training listing's
size and sha256 in the run folder, a later attempt of the same spec that lists other files stops in one line, on the
streaming and the map-style path alike."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.data import build_datasets
from finetune_trainer.errors import TrainerError
from finetune_trainer.listing import Ingest
from finetune_trainer.listing_record import RECORD_FILE, listing_digest

STREAMING = Ingest("streaming", "test")
MAP_STYLE = Ingest("mapStyle", "test")


def _png(path: Path, shade: int = 0, size: int = 4) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(shade).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


def _config(tmp_path: Path, dataset: dict[str, Any], **spec: Any) -> TrainerConfig:
    body = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "imagefolder", "imageSize": 16, "augmentation": "none", "loaderWorkers": 0, **dataset},
            "output": {"uri": str(tmp_path / "runs")},
            **spec,
        }
    )
    return TrainerConfig(job_name="job", spec=body, output_root=str(tmp_path / "runs"))


def _folder(root: Path, per_class: int = 40) -> Path:
    for label in ("cat", "dog"):
        for i in range(per_class):
            _png(root / label / f"{i:03d}.png", i)
    return root


def test_a_resumed_attempt_never_validates_on_images_an_earlier_attempt_trained_on(tmp_path: Path) -> None:
    """The review's reproduction: one object added between attempts moved trained images into validation."""
    _folder(tmp_path / "data")
    cfg = _config(tmp_path, {"trainUri": str(tmp_path / "data"), "validationSplit": 0.25, "ingest": "streaming"})
    first, _, _, _ = build_datasets(cfg, STREAMING)
    trained = {path for path, _ in first.samples}  # type: ignore[attr-defined]
    _png(tmp_path / "data" / "cat" / "040.png", 40)  # the bucket grows while the job is retried
    try:
        _, val, _, _ = build_datasets(cfg, STREAMING)
    except TrainerError:
        return  # refusing a changed dataset with one line is a fix too
    leaked = trained & {path for path, _ in val.samples}  # type: ignore[attr-defined]
    assert not leaked, f"{len(leaked)} of {len(val)} validation images were trained on by the earlier attempt"  # type: ignore[arg-type]


@pytest.mark.parametrize("ingest", [STREAMING, MAP_STYLE], ids=lambda i: i.kind)
def test_a_changed_listing_stops_the_next_attempt_in_one_line(tmp_path: Path, ingest: Ingest) -> None:
    _folder(tmp_path / "data", per_class=8)
    cfg = _config(tmp_path, {"trainUri": str(tmp_path / "data"), "validationSplit": 0.25})
    build_datasets(cfg, ingest)
    build_datasets(cfg, ingest)  # an unchanged listing resumes as before
    _png(tmp_path / "data" / "dog" / "100.png", 100)
    with pytest.raises(TrainerError) as info:
        build_datasets(cfg, ingest)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("dataset: the training listing changed since the run started (16 -> 17 files);")
    assert str(tmp_path / "runs" / "job") in message


def test_a_renamed_file_of_the_same_count_is_a_change_too(tmp_path: Path) -> None:
    _folder(tmp_path / "data", per_class=4)
    cfg = _config(tmp_path, {"trainUri": str(tmp_path / "data"), "validationSplit": 0.25, "ingest": "streaming"})
    build_datasets(cfg, STREAMING)
    (tmp_path / "data" / "cat" / "000.png").rename(tmp_path / "data" / "dog" / "zzz.png")  # relabelled, same count
    with pytest.raises(TrainerError, match=r"\(8 -> 8 files \(other names or labels\)\)"):
        build_datasets(cfg, STREAMING)


def test_another_spec_in_the_same_folder_records_its_own_listing(tmp_path: Path) -> None:
    _folder(tmp_path / "data", per_class=4)
    build_datasets(_config(tmp_path, {"trainUri": str(tmp_path / "data"), "ingest": "streaming"}), STREAMING)
    _png(tmp_path / "data" / "dog" / "100.png", 100)
    other = _config(tmp_path, {"trainUri": str(tmp_path / "data"), "ingest": "streaming"}, hyperparameters={"seed": 7})
    build_datasets(other, STREAMING)  # another run's record is replaced, not held against this one
    record = json.loads((tmp_path / "runs" / "job" / RECORD_FILE).read_text())
    assert (record["spec"], record["files"]) == (other.spec_fingerprint(), 9)


@pytest.mark.parametrize(
    ("samples", "root", "expected"),
    [
        ([("/data/cat/a.png", 0)], "/data", [("cat/a.png", 0)]),
        ([("/data/cat/a.png", 0)], "/data/", [("cat/a.png", 0)]),
        ([("/mnt/cache/cat/a.png", 0)], "/mnt/cache", [("cat/a.png", 0)]),  # another node's cache: the same digest
        ([("s3://b/t/cat/a.png", 1)], "s3://b/t", [("cat/a.png", 1)]),
    ],
)
def test_the_digest_does_not_depend_on_where_the_folder_is(
    samples: list[tuple[str, int]], root: str, expected: list[tuple[str, int]]
) -> None:
    assert listing_digest(samples, root) == listing_digest(expected, "")


@pytest.mark.parametrize(
    ("change", "expected"),
    [("add", "listed 81 training files, rank 0 80:"), ("rename", "listed 80 training files, rank 0 80 (other names or labels):")],
)
def test_a_map_style_worker_that_listed_other_files_than_rank_zero_stops_in_one_line(
    tmp_path: Path, change: str, expected: str
) -> None:
    """Workers of one attempt scan a map-style folder each; one that changed between their scans (an image added, or
    renamed: the same count) would split other images and run another number of steps than the rest. The worker
    compares its listing with rank 0's (``agree``) before the run's record: not "changed since the run started",
    which is advice for a retried attempt."""
    _folder(tmp_path / "data")
    cfg = _config(tmp_path, {"trainUri": str(tmp_path / "data"), "validationSplit": 0.25, "ingest": "mapStyle"})
    seen: list[tuple[int, str]] = []

    def rank_zero(digest: tuple[int, str]) -> tuple[int, str]:
        seen.append(digest)
        return seen[0]

    build_datasets(cfg, MAP_STYLE, agree=rank_zero)  # rank 0: scans, records
    if change == "add":
        _png(tmp_path / "data" / "cat" / "040.png", 40)
    else:
        (tmp_path / "data" / "cat" / "000.png").rename(tmp_path / "data" / "cat" / "zzz.png")
    with pytest.raises(TrainerError) as info:
        build_datasets(cfg, MAP_STYLE, agree=rank_zero)  # rank 1, a moment later
    message = str(info.value)
    assert message.startswith(f"dataset: this worker {expected} the dataset changed while the job's workers listed it"), message
    assert "\n" not in message


def test_a_map_style_worker_that_listed_another_validation_folder_than_rank_zero_stops_in_one_line(tmp_path: Path) -> None:
    """Each worker evaluates every world-th image of its own scan of validationUri: an image written between two
    workers' scans shifted one's list, and evaluation scored 9 of 21 images twice and 9 never (the review's run)."""
    _folder(tmp_path / "train", per_class=4)
    _folder(tmp_path / "val", per_class=5)
    cfg = _config(tmp_path, {"trainUri": str(tmp_path / "train"), "validationUri": str(tmp_path / "val"), "ingest": "mapStyle"})
    rank_zeros: list[tuple[int, str]] = []  # rank 0's digests, in the order of the collectives

    def rank_zero(digest: tuple[int, str]) -> tuple[int, str]:
        rank_zeros.append(digest)
        return digest

    build_datasets(cfg, MAP_STYLE, agree=rank_zero)  # rank 0: training listing, then validation listing
    assert len(rank_zeros) == 2
    _png(tmp_path / "val" / "cat" / "000a.png", 99)
    answers = iter(rank_zeros)
    with pytest.raises(TrainerError) as info:  # rank 1, a moment later: the same training files, one more to evaluate
        build_datasets(cfg, MAP_STYLE, agree=lambda digest: next(answers))
    message = str(info.value)
    assert message == (
        "dataset: this worker listed 11 validation files, rank 0 10: the dataset changed while the job's workers listed "
        "it; keep dataset.validationUri unchanged while a job starts"
    )


@pytest.mark.parametrize("ingest", [STREAMING, MAP_STYLE], ids=lambda i: i.kind)
def test_a_file_name_that_is_not_utf8_is_listed_recorded_and_split(tmp_path: Path, ingest: Ingest) -> None:
    """os.walk gives such a name as surrogate escapes: the digest encoded it strictly and failed every run with a
    UnicodeEncodeError traceback (SampleTable and Ray Data already carried it)."""
    root = tmp_path / "data"
    for label in ("cat", "dog"):
        for i in range(4):
            _png(Path(os.fsdecode(os.fsencode(root / label) + b"/%d\xff.png" % i)), i)
    cfg = _config(tmp_path, {"trainUri": str(root), "validationSplit": 0.25})
    train, val, names, _ = build_datasets(cfg, ingest)
    assert (len(train), len(val), names) == (6, 2, ["cat", "dog"])  # type: ignore[arg-type]
    record = json.loads((tmp_path / "runs" / "job" / RECORD_FILE).read_text())
    assert record["files"] == 8
    build_datasets(cfg, ingest)  # and the next attempt finds the same digest


def test_an_attempt_with_no_checkpoint_to_resume_records_its_own_listing(tmp_path: Path) -> None:
    """The record protects what a checkpoint trained on. An attempt that failed before its first checkpoint (its
    workers listed a folder that changed under them, say) left a record of a listing nobody trained on: the retry,
    resuming nothing, lists the settled folder and must start, not fail for good with "delete the run's folder"."""
    _folder(tmp_path / "data", per_class=8)
    cfg = _config(tmp_path, {"trainUri": str(tmp_path / "data"), "validationSplit": 0.25, "ingest": "mapStyle"})
    seen: list[tuple[int, str]] = []

    def rank_zero(digest: tuple[int, str]) -> tuple[int, str]:
        seen.append(digest)
        return seen[0]

    build_datasets(cfg, MAP_STYLE, agree=rank_zero, resuming=False)  # attempt 1, rank 0: records 16 files
    _png(tmp_path / "data" / "dog" / "100.png", 100)
    with pytest.raises(TrainerError, match="this worker listed 17 training files, rank 0 16"):
        build_datasets(cfg, MAP_STYLE, agree=rank_zero, resuming=False)  # attempt 1, rank 1: the attempt fails
    build_datasets(cfg, MAP_STYLE, agree=lambda digest: digest, resuming=False)  # attempt 2: starts
    assert json.loads((tmp_path / "runs" / "job" / RECORD_FILE).read_text())["files"] == 17
    # Once an attempt resumes a checkpoint, the record holds again.
    _png(tmp_path / "data" / "dog" / "101.png", 101)
    with pytest.raises(TrainerError, match=r"changed since the run started \(17 -> 18 files\)"):
        build_datasets(cfg, MAP_STYLE, resuming=True)
    # A record that is not this trainer's JSON: in the way of a resumed attempt only.
    (tmp_path / "runs" / "job" / RECORD_FILE).write_text("{not json")
    with pytest.raises(TrainerError, match="is not the JSON this trainer writes"):
        build_datasets(cfg, MAP_STYLE, resuming=True)
    build_datasets(cfg, MAP_STYLE, resuming=False)
    assert json.loads((tmp_path / "runs" / "job" / RECORD_FILE).read_text())["files"] == 18
