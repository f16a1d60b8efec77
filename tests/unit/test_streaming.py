"""The streaming ingest path without Ray: which path a job takes, the listing (same classes, order and labels as
the map-style path), the split, each rank's per-epoch share, the batch decoder's handling of corrupt files, and
the unreadable limit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, Subset
from torchvision.transforms import v2 as T

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import DatasetSpec, FineTuneJobSpec
from finetune_trainer import listing
from finetune_trainer.data import build_datasets, build_input_spec, eval_transform, train_transform
from finetune_trainer.errors import TrainerError
from finetune_trainer.image_folder import StreamedImages, class_folders, scan_images
from finetune_trainer.listing import choose_ingest, list_image_folder
from finetune_trainer.sample_rows import PositionRows, SampleTable, pieces
from finetune_trainer.streaming import (
    _BLOCK_ROWS,
    BlockDecoder,
    Decoder,
    EpochRows,
    StreamSource,
    Unreadable,
    check_block,
    epoch_indices,
    steps_per_epoch,
)
from finetune_trainer.unreadable import clearly_over
from tests.support.schemas import REPO


def _png(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (shade % 255, 90, 160)).save(path)


def messy_folder(root: Path) -> Path:
    """Classes out of order, dot folders and files, nested folders, files beside the folders, a non-image."""
    for rel in ["zebra/b.png", "zebra/a.PNG", "zebra/sub/c.png", "zebra/sub/deeper/d.png", "zebra/z.png", "apple/1.jpg"]:
        _png(root / rel, len(rel))
    for rel in ["apple/.thumbs/x.png", "apple/._1.png", ".hidden/x.png", "apple/sub/.dot/y.png"]:
        _png(root / rel)
    (root / "apple" / "notes.txt").write_text("not an image")
    _png(root / "beside.png")
    return root


def config(tmp_path: Path, dataset: dict[str, Any]) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"imageSize": 16, "augmentation": "standard", "loaderWorkers": 0, **dataset},
            "output": {"uri": str(tmp_path / "runs")},
        }
    )
    return TrainerConfig(job_name="job", spec=spec, output_root=str(tmp_path / "runs"))


# ------------------------------------------------------------------------------------------------ which path
@pytest.mark.parametrize(
    ("dataset", "kind"),
    [
        ({"format": "digits"}, "mapStyle"),
        ({"format": "fake"}, "mapStyle"),
        ({"trainUri": "s3://bucket/images"}, "streaming"),
        ({"trainUri": "LOCAL", "validationUri": "gs://bucket/val"}, "streaming"),
        ({"trainUri": "LOCAL"}, "mapStyle"),
        ({"trainUri": "LOCAL", "ingest": "streaming"}, "streaming"),
        ({"trainUri": "s3://bucket/images", "ingest": "mapStyle"}, "mapStyle"),
    ],
)
def test_auto_chooses_streaming_for_object_stores_and_explicit_choices_win(
    tmp_path: Path, dataset: dict[str, Any], kind: str
) -> None:
    folder = messy_folder(tmp_path / "data")
    ds = DatasetSpec.model_validate({k: (str(folder) if v == "LOCAL" else v) for k, v in dataset.items()})
    assert choose_ingest(ds).kind == kind


def test_auto_streams_a_local_folder_above_the_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = messy_folder(tmp_path / "data")  # 10 image files plus dot files, a text file
    ds = DatasetSpec.model_validate({"trainUri": str(folder)})
    monkeypatch.setattr(listing, "STREAMING_THRESHOLD", 8)
    assert choose_ingest(ds).kind == "streaming"
    monkeypatch.setattr(listing, "STREAMING_THRESHOLD", 50)
    assert choose_ingest(ds).kind == "mapStyle"


# ------------------------------------------------------------------------------------------------- listing
def test_listing_gives_the_map_style_classes_order_and_labels(tmp_path: Path) -> None:
    root = str(messy_folder(tmp_path / "data"))
    classes = class_folders("trainUri", root, root)
    listed_classes, listed = list_image_folder("trainUri", root)
    assert listed_classes == classes == ["apple", "zebra"]
    assert listed == scan_images("trainUri", root, root, classes)
    names = [Path(p).relative_to(root).as_posix() for p, _ in listed]
    assert names == ["apple/1.jpg", "zebra/a.PNG", "zebra/b.png", "zebra/z.png", "zebra/sub/c.png", "zebra/sub/deeper/d.png"]


def test_an_object_store_listing_matches_the_local_walk(tmp_path: Path) -> None:
    """The flat listing of a store, sorted by ``walk_order``, is the order of the local walk (files before sub-folders)."""
    root = messy_folder(tmp_path / "data")
    fs = fsspec.filesystem("memory")
    for path in root.rglob("*"):
        if path.is_file():
            fs.pipe(f"/bucket/data/{path.relative_to(root).as_posix()}", path.read_bytes())
    _, local = list_image_folder("trainUri", str(root))
    classes, remote = listing._list_remote("trainUri", "memory://bucket/data")
    assert classes == ["apple", "zebra"]
    assert [(p.removeprefix("memory:///bucket/data/").removeprefix("memory://bucket/data/"), label) for p, label in remote] == [
        (Path(p).relative_to(root).as_posix(), label) for p, label in local
    ]


def test_a_class_folder_without_images_in_a_store_names_it() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/store/ds/cats/1.png", b"x")
    fs.pipe("/store/ds/dogs/readme.txt", b"x")
    with pytest.raises(TrainerError, match=r"^dataset.trainUri: class folder memory://store/ds/dogs holds no images"):
        listing._list_remote("trainUri", "memory://store/ds")


@pytest.mark.parametrize("dataset", [{"validationSplit": 0.25}, {"validationSplit": 0.25, "maxPerClass": 3}])
def test_both_paths_choose_the_same_images_for_the_same_seed(tmp_path: Path, dataset: dict[str, Any]) -> None:
    root = tmp_path / "data"
    for name in ("cat", "dog"):
        for i in range(8):
            _png(root / name / f"{i}.png", i)
    cfg = config(tmp_path, {"trainUri": str(root), **dataset})
    train, val, names, _ = build_datasets(cfg, listing.Ingest("mapStyle", "test"))
    s_train, s_val, s_names, _ = build_datasets(cfg, listing.Ingest("streaming", "test"))
    assert isinstance(s_train, StreamedImages) and isinstance(s_val, StreamedImages)
    assert isinstance(train, Subset) and isinstance(val, Subset)
    assert s_names == names
    assert s_train.samples == [train.dataset.samples[i] for i in train.indices]  # type: ignore[attr-defined]
    assert s_val.samples == [val.dataset.samples[i] for i in val.indices]  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------- per-rank shares
def test_each_epochs_order_is_reproducible_differs_by_epoch_and_is_the_samplers() -> None:
    first = epoch_indices(10, 2, 0, seed=7, epoch=1)
    assert first == epoch_indices(10, 2, 0, seed=7, epoch=1)
    assert first != epoch_indices(10, 2, 0, seed=7, epoch=2)
    assert first != epoch_indices(10, 2, 0, seed=8, epoch=1)
    sampler: DistributedSampler[Any] = DistributedSampler(list(range(10)), num_replicas=2, rank=0, shuffle=True, seed=7)
    sampler.set_epoch(1)
    assert first == list(sampler)


@pytest.mark.parametrize(("n", "world", "per_worker"), [(7, 2, 2), (9, 2, 4), (5, 3, 2), (4, 2, 3)])
def test_padding_gives_every_rank_the_same_steps(tmp_path: Path, n: int, world: int, per_worker: int) -> None:
    shares = [epoch_indices(n, world, rank, seed=0, epoch=3) for rank in range(world)]
    assert len({len(share) for share in shares}) == 1
    assert set().union(*map(set, shares)) == set(range(n))  # every image trained on in the epoch
    images = StreamedImages([(f"/x/{i}.png", i % 2) for i in range(n)], lambda x: x)
    steps = {len(StreamSource(images, images, seed=0, rank=r, world=world, per_worker=per_worker).train) for r in range(world)}
    assert len(steps) == 1


@pytest.mark.parametrize(("share", "per_worker", "expected"), [(8, 4, (2, False)), (9, 4, (2, True)), (10, 4, (3, False))])
def test_a_last_batch_of_one_image_is_dropped_and_only_it(share: int, per_worker: int, expected: tuple[int, bool]) -> None:
    assert steps_per_epoch(share, per_worker) == expected


def test_every_validation_image_is_in_exactly_one_ranks_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = StreamedImages([(f"/x/{i}.png", 0) for i in range(11)], lambda x: x)
    seen: list[int] = []

    def fake_stream(rows: EpochRows, decoder: Decoder, per_batch: int, drop_last: bool) -> Any:
        assert not drop_last and decoder.epoch is None
        seen.extend(int(key) for key in rows.positions)
        return iter([])

    monkeypatch.setattr("finetune_trainer.streaming._stream", fake_stream)
    for rank in range(2):
        list(StreamSource(images, images, seed=0, rank=rank, world=2, per_worker=2).val)
    assert sorted(seen) == list(range(11))


def test_precise_batch_norm_streams_its_own_batches_alone_and_counts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """It forwarded the first batches of a second stream of the whole epoch, dropped after a few: Ray Data planned every
    read task of it and decoded ahead for nothing, and the images it read counted twice against the unreadable limit.
    Now a stream of those rows alone, the same images (seeded by epoch and position) as the epoch's first batches."""
    images = StreamedImages([(f"/x/{i}.png", i % 3) for i in range(40)], lambda x: x)
    asked: list[list[int]] = []

    def fake_stream(rows: EpochRows, decoder: Decoder, per_batch: int, drop_last: bool) -> Any:
        asked.append([int(p) for p in rows.positions])
        for start in range(0, len(rows.positions), per_batch):
            keys = np.asarray(rows.positions[start : start + per_batch])
            bad = np.asarray(["/x/bad.png" if k == keys[0] else "" for k in keys], dtype=object)  # one each
            yield {"image": np.full((len(keys), 3, 2, 2), decoder.epoch, np.uint8), "label": keys % 3, "bad": bad}

    monkeypatch.setattr("finetune_trainer.streaming._stream", fake_stream)
    source = StreamSource(images, images, seed=5, rank=1, world=2, per_worker=4)
    source.set_epoch(3)
    first = source.first_batches(images=10, most=50)
    assert len(first) == 3  # 10 images in batches of 4
    got = [labels.tolist() for _, labels in first]
    assert asked == [epoch_indices(40, 2, 1, seed=5, epoch=3)[:12]]  # those rows and no others
    assert (source.unreadable.seen, source.unreadable.bad) == (0, 0)
    epoch = [labels.tolist() for _, labels in source.train]
    assert got == epoch[:3]
    assert source.unreadable.seen == 20  # the epoch's own images, counted once
    assert len(source.first_batches(images=10, most=2)) == 2


# ---------------------------------------------------------------------------------------- corrupt files
def _batch(tmp_path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        # Noise, not a flat colour: two different crops of it differ.
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    Path(paths[1]).write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    batch = {"path": np.asarray(paths, dtype=object), "label": np.asarray([0, 1, 2, 3]), "key": np.asarray([10, 11, 12, 13])}
    return batch, paths


def test_training_decoder_replaces_and_counts_a_corrupt_file(tmp_path: Path) -> None:
    batch, paths = _batch(tmp_path)
    cfg = config(tmp_path, {"trainUri": str(tmp_path)})
    transform = train_transform(build_input_spec(cfg), "standard")
    out = Decoder(transform, seed=3, epoch=1)(batch)
    assert out["image"].shape == (4, 3, 16, 16)
    assert list(out["bad"]) == ["", paths[1], "", ""]
    assert list(out["label"]) == [0, 2, 2, 3]  # the next readable image of the batch, with its label
    assert np.array_equal(out["image"][1], out["image"][2])
    again = Decoder(transform, seed=3, epoch=1)(batch)
    assert np.array_equal(again["image"], out["image"])  # augmentation seeded by (seed, epoch, key)
    assert not np.array_equal(Decoder(transform, seed=3, epoch=2)(batch)["image"], out["image"])
    tally = Unreadable()
    tally.add(out["bad"])
    assert (tally.seen, tally.bad, tally.examples) == (4, 1, [paths[1]])


def test_evaluation_decoder_flags_a_corrupt_file_for_dropping(tmp_path: Path) -> None:
    batch, paths = _batch(tmp_path)
    cfg = config(tmp_path, {"trainUri": str(tmp_path)})
    out = Decoder(eval_transform(build_input_spec(cfg)), seed=3, epoch=None)(batch)
    assert list(out["label"]) == [0, 1, 2, 3]
    assert list(out["bad"]) == ["", paths[1], "", ""]
    assert not out["image"][1].any()


def test_the_unreadable_limit_fails_with_one_line_naming_files() -> None:
    tally = Unreadable()
    tally.add(np.asarray(["", "s3://b/cats/bad.jpg", "s3://b/dogs/0.jpg"] + [""] * 97, dtype=object))
    with pytest.raises(TrainerError) as info:
        tally.check(torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "dataset: 2 of 100 images read cannot be decoded (e.g. s3://b/cats/bad.jpg, s3://b/dogs/0.jpg); at most 1%"
    )


def test_below_the_limit_one_warning_then_silence() -> None:
    tally = Unreadable()
    tally.add(np.asarray(["/d/a/x.png"] + [""] * 199, dtype=object))
    assert tally.check(torch.device("cpu")) == "dataset: skipped 1 of 200 images that cannot be decoded (e.g. /d/a/x.png)"
    tally.add(np.asarray([""] * 100, dtype=object))
    assert tally.check(torch.device("cpu")) is None


def test_a_worker_fails_early_without_waiting_for_the_epoch() -> None:
    tally = Unreadable()
    for start in range(0, 900, 100):  # 27 of 900: well above 1 %, but too few images for a worker to judge alone
        tally.add(np.asarray([f"/d/{start + i}.png" if i < 3 else "" for i in range(100)], dtype=object))
    with pytest.raises(TrainerError, match=r"^dataset: 30 of 1000 images read cannot be decoded"):
        tally.add(np.asarray(["/d/900.png", "/d/901.png", "/d/902.png"] + [""] * 97, dtype=object))


@pytest.mark.parametrize(
    ("bad", "seen", "over"),
    [
        (500, 999, False),  # too few images to judge alone, however many are bad
        (500, 1000, True),  # half the dataset: at once
        (20, 1000, False),  # 2 %: not twice the limit; the epoch's end decides
        (26, 1000, True),  # 2.6 %: twice the limit and 5.1 standard deviations above it
        (150, 10_000, False),  # 1.5 %: for the epoch's end
        (201, 10_000, True),
    ],
)
def test_a_worker_judges_alone_only_on_clear_evidence(bad: int, seen: int, over: bool) -> None:
    assert clearly_over(bad, seen) is over


@pytest.mark.parametrize(("fraction", "early"), [(0.009, 0), (0.03, 20)])
def test_a_dataset_under_the_limit_is_never_failed_early_one_over_it_soon(fraction: float, early: int) -> None:
    """The review's simulation: 20,000 images, a fixed random set unreadable, read in shuffled blocks of 64. Judged at
    every block against the limit itself, 0.9 % failed 14 one-epoch runs of 20 (0.7 %: 3 of 20); at 3 % every run
    must stop within its first 2,000 images, as a badly broken dataset should."""
    failed = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        paths = np.asarray([f"/d/{i}.png" if rng.random() < fraction else "" for i in range(20_000)], dtype=object)
        order = rng.permutation(len(paths))
        tally = Unreadable()
        try:
            for start in range(0, len(order), 64):
                tally.add(paths[order[start : start + 64]])
        except TrainerError:
            failed += 1
            assert tally.seen <= 2_000, tally.seen
    assert failed == early


def test_one_unreadable_image_shuffled_to_an_epochs_end_is_replaced_not_fatal(tmp_path: Path) -> None:
    """129 images cut in blocks of 64 left a last block of one image: where the shuffle put the one unreadable image
    (0.8 %, under the limit) there, the block had nothing readable to replace it with and the job failed. The rows
    are cut as a run cuts them (read tasks, then decode blocks), every epoch where it comes last."""
    paths = []
    for i in range(129):
        path = tmp_path / "c" / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i, 0, 0)).save(path)
        paths.append(str(path))
    Path(paths[7]).write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    table = SampleTable([(p, 0) for p in paths])
    last = [e for e in range(3000) if epoch_indices(129, 1, 0, 0, e)[-1] == 7][:2]
    assert last
    for epoch in last:
        positions = np.asarray(epoch_indices(129, 1, 0, 0, epoch))
        decode = BlockDecoder(Decoder(T.Compose([T.PILToTensor(), T.RandomResizedCrop(4)]), 0, epoch), _BLOCK_ROWS)
        sizes, tally = [], Unreadable()
        for task in PositionRows(table, positions, len(positions), _BLOCK_ROWS).get_read_tasks(1):
            for frame in task():
                for block in decode({c: frame[c].to_numpy() for c in frame.columns}):
                    check_block(block)
                    sizes.append(len(block["label"]))
                    tally.add(block["bad"])
        assert sizes == [64, 65] and (tally.seen, tally.bad) == (129, 1), (sizes, tally)


@pytest.mark.parametrize(
    ("count", "size", "expected"),
    [
        (0, 64, []),
        (1, 64, [(0, 1)]),
        (64, 64, [(0, 64)]),
        (65, 64, [(0, 65)]),  # one row alone at the end: joined to the block before
        (95, 64, [(0, 95)]),
        (96, 64, [(0, 64), (64, 96)]),  # half a block: a block of its own
        (129, 64, [(0, 64), (64, 129)]),
        (3, 2, [(0, 2), (2, 3)]),
    ],
)
def test_rows_are_cut_with_no_few_rows_piece_at_the_end(count: int, size: int, expected: list[tuple[int, int]]) -> None:
    assert pieces(count, size) == expected


# ------------------------------------------------------------------------------- jpegDecode: gpu (the batch path)
def _mixed_files(tmp_path: Path) -> list[str]:
    """Two JPEGs, a PNG and a corrupt JPEG (valid magic, broken body)."""
    paths = []
    for i, suffix in enumerate(["jpg", "png", "jpg", "jpg"]):
        path = tmp_path / f"{i}.{suffix}"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    Path(paths[2]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return paths


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")),
    ],
)
def test_device_decode_replaces_a_corrupt_jpeg_and_augments_by_seed(tmp_path: Path, device: str) -> None:
    paths = _mixed_files(tmp_path)
    rows = {"path": np.asarray(paths, dtype=object), "label": np.asarray([0, 1, 2, 3]), "key": np.asarray([5, 6, 7, 8])}
    cfg = config(tmp_path, {"trainUri": str(tmp_path)})
    transform = train_transform(build_input_spec(cfg), "standard")
    shipped = Decoder(transform, seed=1, epoch=2, raw=True)(rows)  # what a Ray Data task sends: bytes, not pixels
    assert set(shipped) == {"data", "path", "label", "key", "error"} and shipped["data"][0][:2] == b"\xff\xd8"
    images = StreamedImages([(p, 0) for p in paths], transform)
    source = StreamSource(images, images, seed=1, rank=0, world=1, per_worker=4, decode_device=torch.device(device))
    out = source._decode_here(shipped, transform, 2, torch.device(device))
    assert out["image"].shape == (4, 3, 16, 16) and out["image"].device.type == device
    assert list(out["bad"]) == ["", "", paths[2], ""]
    assert list(out["label"]) == [0, 1, 3, 3]
    again = source._decode_here(shipped, transform, 2, torch.device(device))
    assert torch.equal(again["image"], out["image"])
    evaluated = source._decode_here(shipped, eval_transform(build_input_spec(cfg)), None, torch.device(device))
    # Evaluation keeps the row (a placeholder the consumer drops) and its own label.
    assert list(evaluated["label"]) == [0, 1, 2, 3] and list(evaluated["bad"]) == ["", "", paths[2], ""]


# ------------------------------------------------------------------------------ uint8 across the object store
@pytest.mark.parametrize("train", [True, False])
def test_images_cross_the_object_store_as_uint8_and_are_normalised_on_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train: bool
) -> None:
    """The decode tasks ship uint8 (a quarter of float32's bytes); the worker's batches equal the whole preset
    applied image by image, and the unreadable file is still replaced (training) or dropped (evaluation)."""
    _, paths = _batch(tmp_path)
    cfg = config(tmp_path, {"trainUri": str(tmp_path)})
    spec = build_input_spec(cfg)
    transform = train_transform(spec, "standard") if train else eval_transform(spec)
    images = StreamedImages([(p, i) for i, p in enumerate(paths)], transform)
    shipped: list[np.ndarray] = []
    whole: list[dict[str, np.ndarray]] = []

    def in_process(rows: EpochRows, decoder: Decoder, per_batch: int, drop_last: bool) -> Any:
        # The rows as the read task builds them, in one block, as a Ray Data task hands them to the decoder.
        (task,) = PositionRows(rows.table, rows.positions, len(rows.positions), len(rows.positions)).get_read_tasks(1)
        (frame,) = task()
        block = {k: frame[k].to_numpy() for k in ("path", "label", "key")}
        out = decoder(block)
        shipped.append(out["image"])
        whole.append(Decoder(transform, decoder.seed, decoder.epoch)(block))  # the preset applied whole, per image
        return iter([out])

    monkeypatch.setattr("finetune_trainer.streaming._stream", in_process)
    source = StreamSource(images, images, seed=3, rank=0, world=1, per_worker=4)
    source.set_epoch(1)
    got, labels = next(iter(source.train if train else source.val))
    assert shipped[0].dtype == np.uint8
    assert got.dtype == torch.float32
    expected, keep = torch.as_tensor(whole[0]["image"]), [b == "" for b in whole[0]["bad"]]
    if not train:  # evaluation drops the unreadable image; training replaced it
        assert not all(keep)
        expected = expected[torch.as_tensor(keep)]
    assert labels.tolist() == [int(v) for v, k in zip(whole[0]["label"], keep, strict=True) if train or k]
    assert torch.allclose(got, expected, atol=1e-6)


def test_a_read_only_block_becomes_a_tensor_without_a_copy_or_a_warning() -> None:
    """In a fresh process: torch warns once per process, so an earlier test could hide the warning here (and once
    silenced here it cannot be seen again in that process)."""
    code = """
import warnings, numpy as np
from finetune_trainer import streaming
block = np.arange(12, dtype=np.uint8).reshape(2, 6)
block.flags.writeable = False  # as Ray hands a block over from its object store
warnings.simplefilter("error")  # torch's warning, unfiltered, would be an error here
tensor = streaming._tensor(block)
assert tensor.data_ptr() == block.ctypes.data and tensor.tolist() == block.tolist()
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("trainer", "operator"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
