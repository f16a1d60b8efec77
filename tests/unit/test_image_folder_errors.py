"""Files the image readers must survive (from the adversarial review of issue 14): an oversized image, an object
name with '::', a storage error, a symlink loop. Each is skipped and counted, read, retried or refused in one line,
never a traceback; on the streaming decoder and the map-style scan alike."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from finetune_trainer import image_folder, streaming
from finetune_trainer.errors import TrainerError
from finetune_trainer.image_folder import StreamedImages, load_image, scan_images
from finetune_trainer.inputs import InputSpec
from finetune_trainer.listing import list_image_folder
from finetune_trainer.streaming import Decoder, check_block
from finetune_trainer.tracking import _samples
from tests.support.s3 import s3_server

_UINT8 = T.Compose([T.ToImage(), T.Resize((8, 8))])  # the per-image part split_finish leaves to the decode tasks


def _png(path: Path, shade: int = 0, size: int = 12) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(shade).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


def _encoded_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _bomb_png(path: Path) -> str:
    """A 20000×20000 PNG header (4e8 pixels, over twice PIL's MAX_IMAGE_PIXELS) in 70 bytes: PIL refuses to open it
    with ``DecompressionBombError``, which derives from Exception, not OSError."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return str(path)


def _rows(paths: list[str]) -> dict[str, np.ndarray]:
    n = len(paths)
    return {"path": np.asarray(paths, dtype=object), "label": np.zeros(n, dtype=np.int64), "key": np.arange(n)}


# ------------------------------------------------------------------------------------------------ oversized (F1)
@pytest.mark.parametrize("epoch", [1, None], ids=["train", "validation"])
def test_an_oversized_image_is_skipped_and_counted_by_the_streaming_decoder(tmp_path: Path, epoch: int | None) -> None:
    paths = [_png(tmp_path / "a.png", 1), _bomb_png(tmp_path / "bomb.png"), _png(tmp_path / "b.png", 2)]
    out = Decoder(_UINT8, seed=0, epoch=epoch)(_rows(paths))
    assert list(out["bad"]) == ["", paths[1], ""]


def test_an_oversized_image_is_skipped_and_counted_by_the_map_style_scan(tmp_path: Path) -> None:
    for i in range(200):
        _png(tmp_path / "cat" / f"{i}.png", i, size=4)
    _bomb_png(tmp_path / "cat" / "bomb.png")
    samples = scan_images("trainUri", str(tmp_path), str(tmp_path), ["cat"])
    assert len(samples) == 200


def test_an_oversized_image_read_map_style_is_one_line_naming_it(tmp_path: Path) -> None:
    path = _bomb_png(tmp_path / "bomb.png")
    with pytest.raises(TrainerError, match=r"^dataset: cannot read image .*bomb\.png: .*exceeds limit") as info:
        load_image(path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ '::' in a name (F5)
def test_an_object_name_with_a_double_colon_is_read_not_a_crash() -> None:
    with s3_server("colons") as s3:
        for name in ("a.png", "a::b.png"):
            s3.client.put_object(Bucket="colons", Key=f"train/cat/{name}", Body=_encoded_png())
        _, samples = list_image_folder("trainUri", "s3://colons/train")
        out = Decoder(_UINT8, seed=0, epoch=1)(_rows([path for path, _ in samples]))
    assert sorted(path.rsplit("/", 1)[1] for path, _ in samples) == ["a.png", "a::b.png"]
    assert list(out["bad"]) == ["", ""]


# ------------------------------------------------------------------------------------------------ sample predictions (F3)
def test_sample_predictions_pass_over_an_unreadable_streamed_image(tmp_path: Path) -> None:
    """The streamed validation images are listed, not scanned: the first one unreadable must not cost the run its
    sample-prediction figure (before: a TrainerError inside the TensorBoard write closed the writer for the run)."""
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    samples = [(str(tmp_path / "cat" / "0.png"), 0)] + [(_png(tmp_path / "cat" / f"{i}.png", i), i % 2) for i in (1, 2, 3)]
    val = StreamedImages(samples, T.Compose([T.ToImage(), T.Resize((8, 8)), T.ToDtype(torch.float32, scale=True)]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    inputs = InputSpec(
        image_size=8, resize_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", grayscale_to_rgb=True
    )
    figure = _samples(model, val, ["cat", "dog"], inputs)
    assert figure is not None
    assert [ax.get_title() for ax in figure.axes if ax.get_title()][-1].endswith("(dog)")
    assert sum(1 for ax in figure.axes if ax.get_title()) == 3


# ------------------------------------------------------------------------------------------------ storage errors (F6)
def test_a_transient_storage_error_is_retried_not_counted_as_a_corrupt_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [_png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)]
    real, failed = streaming.read_file, []

    def flaky(path: str) -> bytes:
        if path == paths[0] and not failed:
            failed.append(path)
            raise ConnectionResetError(104, "Connection reset by peer")
        return real(path)

    monkeypatch.setattr(image_folder, "READ_RETRY_DELAYS", (0.0, 0.0, 0.0))
    monkeypatch.setattr(streaming, "read_file", flaky)
    out = Decoder(_UINT8, seed=0, epoch=1)(_rows(paths))
    assert failed == [paths[0]]
    assert list(out["bad"]) == ["", ""]


@pytest.mark.parametrize("raw", [False, True], ids=["cpu-decode", "bytes-for-device-decode"])
def test_a_lasting_storage_error_fails_in_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: bool
) -> None:
    paths = [_png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)]
    real, tries = streaming.read_file, []

    def down(path: str) -> bytes:
        if path == paths[1]:
            tries.append(path)
            raise PermissionError(13, "Access Denied")
        return real(path)

    monkeypatch.setattr(image_folder, "READ_RETRY_DELAYS", (0.0, 0.0, 0.0))
    monkeypatch.setattr(streaming, "read_file", down)
    decoder = Decoder(_UINT8, seed=0, epoch=1, raw=raw)
    good, failed = Decoder(_UINT8, seed=0, epoch=1, raw=raw)(_rows(paths[:1])), decoder(_rows(paths))
    # Not raised in the decode task (Ray Data would print its tracebacks): carried in the block, raised by the worker.
    with pytest.raises(TrainerError, match=r"^dataset: cannot read .*b\.png from its storage \(4 tries\): PermissionError") as e:
        check_block(failed)
    assert "\n" not in str(e.value) and len(tries) == 4
    assert len(set(failed["error"])) == 1 and list(good["error"]) == [""]
    check_block(good)
    # The same columns, dtypes and image shape as a good block: Ray Data concatenates blocks into batches.
    assert {k: (v.dtype, v.shape[1:]) for k, v in failed.items()} == {k: (v.dtype, v.shape[1:]) for k, v in good.items()}


def test_a_training_block_with_nothing_readable_is_raised_by_the_worker_in_one_line(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    for path in paths:
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    out = Decoder(_UINT8, seed=0, epoch=1)(_rows(paths))
    with pytest.raises(TrainerError, match=r"^dataset: none of the 3 images of a batch can be decoded \(e\.g\. .*0\.png\)$"):
        check_block(out)
    assert list(out["bad"]) == paths


@pytest.mark.parametrize("epoch", [1, None], ids=["train", "validation"])
def test_a_file_deleted_after_the_listing_is_skipped_and_counted(tmp_path: Path, epoch: int | None) -> None:
    paths = [_png(tmp_path / "a.png", 1), str(tmp_path / "gone.png"), _png(tmp_path / "b.png", 2)]
    out = Decoder(_UINT8, seed=0, epoch=epoch)(_rows(paths))
    assert list(out["bad"]) == ["", paths[1], ""]


# ------------------------------------------------------------------------------------------------ listing memory (F12)
def test_the_listing_of_a_bucket_is_not_kept_in_memory_after_it_is_read() -> None:
    with s3_server("memory") as s3:
        for i in range(20):
            s3.client.put_object(Bucket="memory", Key=f"train/c{i % 2}/{i}.png", Body=b"x")
        _, samples = list_image_folder("trainUri", "s3://memory/train")
        fs, _ = fsspec.core.url_to_fs("s3://memory/train")  # the same cached instance the listing used
        retained = sum(len(entries) for entries in fs.dircache.values())
    assert len(samples) == 20
    assert retained == 0, f"{retained} object infos kept in s3fs's dircache after the listing"


# ------------------------------------------------------------------------------------------------ symlink loops (F8)
def test_a_symlink_loop_neither_multiplies_nor_relabels_images(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png", 1)
    _png(tmp_path / "dog" / "b.png", 2)
    os.symlink("..", tmp_path / "cat" / "up")
    _, samples = list_image_folder("trainUri", str(tmp_path))
    assert sorted((os.path.basename(p), label) for p, label in samples) == [("a.png", 0), ("b.png", 1)]
    scanned = scan_images("trainUri", str(tmp_path), str(tmp_path), ["cat", "dog"])
    assert sorted((os.path.basename(p), label) for p, label in scanned) == [("a.png", 0), ("b.png", 1)]


def test_a_link_to_a_folder_outside_the_tree_is_still_followed(tmp_path: Path) -> None:
    _png(tmp_path / "elsewhere" / "x.png", 3)
    _png(tmp_path / "data" / "cat" / "a.png", 1)
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "cat" / "more")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "cat" / "same")  # the same folder again: listed once
    _, samples = list_image_folder("trainUri", str(tmp_path / "data"))
    assert sorted(os.path.relpath(p, tmp_path / "data") for p, _ in samples) == ["cat/a.png", "cat/more/x.png"]


def test_a_class_folder_linking_back_to_the_dataset_is_not_a_class(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png", 1)
    _png(tmp_path / "dog" / "b.png", 2)
    os.symlink(".", tmp_path / "all")
    classes, samples = list_image_folder("trainUri", str(tmp_path))
    assert classes == ["cat", "dog"]
    assert sorted((os.path.basename(p), label) for p, label in samples) == [("a.png", 0), ("b.png", 1)]


# ------------------------------------------------------------------------------------------------ not a plain file
def _within(seconds: float, fifo: Path, call: Callable[[], object]) -> object:
    """``call()``'s result, or a failure after ``seconds`` if it blocks on ``fifo`` (then released, by opening the
    FIFO's other end, so that the thread ends)."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"blocked on the FIFO {fifo} for {seconds} s")
    assert result, "the call raised"
    return result[0]


def _raises(call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        try:
            call()
        except TrainerError as e:
            return str(e)
        return "no error"

    return run


# A FIFO named like an image (or a link to one, or to /dev/zero, on a pvc another tenant writes to): opened like a
# file, a FIFO blocks the scan or a decode task for ever and /dev/zero is read until memory runs out.
READERS: dict[str, Callable[[list[str], Path], Callable[[], object]]] = {
    "map-style-scan": lambda paths, root: lambda: [p for p, _ in scan_images("trainUri", str(root), str(root), ["cat"])],
    "streaming-decoder": lambda paths, root: lambda: list(Decoder(_UINT8, seed=0, epoch=1)(_rows(paths))["bad"]),
    "map-style-read": lambda paths, root: _raises(lambda: load_image(paths[-1])),
}


@pytest.mark.parametrize("reader", list(READERS), ids=list(READERS))
def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path: Path, reader: str) -> None:
    paths = [_png(tmp_path / "cat" / f"{i}.png", i) for i in range(120)]
    fifo = tmp_path / "cat" / "z-fifo.png"
    os.mkfifo(fifo)
    got = _within(10, fifo, READERS[reader]([*paths, str(fifo)], tmp_path))
    expected = {
        "map-style-scan": sorted(paths),  # skipped and counted, as an unreadable file
        "streaming-decoder": [""] * len(paths) + [str(fifo)],
        "map-style-read": f"dataset: cannot read image {fifo}: no such plain file, or over 536,870,912 bytes",
    }
    assert got == expected[reader]


# ------------------------------------------------------------------------------------------------ unlistable folders
LISTERS: dict[str, Callable[[Path], object]] = {
    "listing": lambda root: list_image_folder("trainUri", str(root))[1],
    "map-style-scan": lambda root: scan_images("trainUri", str(root), str(root), ["cat", "dog"]),
}
FOLDER_ERRORS = {
    # A sub-folder of another uid with mode 0700 on a pvc (the trainer runs as non-root), an NFS hiccup.
    "permission": (PermissionError(13, "Permission denied"), r"^dataset: cannot list .*/cat/sub: Permission denied; "),
    "io-error": (OSError(5, "Input/output error"), r"^dataset: cannot list .*/cat/sub: Input/output error; "),
    "deleted-meanwhile": (FileNotFoundError(2, "No such file or directory"), None),  # as if listed after
}


@pytest.mark.parametrize("lister", list(LISTERS), ids=list(LISTERS))
@pytest.mark.parametrize(("error", "expected"), list(FOLDER_ERRORS.values()), ids=list(FOLDER_ERRORS))
def test_a_folder_that_cannot_be_listed_fails_in_one_line_rather_than_losing_its_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lister: str, error: OSError, expected: str | None
) -> None:
    for name in ("cat/a.png", "cat/sub/b.png", "dog/c.png"):
        _png(tmp_path / name, 1, size=4)
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if os.fspath(path).endswith("/cat/sub"):
            raise type(error)(error.errno, error.strerror, os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    if expected is None:
        got = LISTERS[lister](tmp_path)
        assert sorted(os.path.relpath(p, tmp_path) for p, _ in got) == ["cat/a.png", "dog/c.png"]  # type: ignore[attr-defined]
        return
    with pytest.raises(TrainerError, match=expected) as info:
        LISTERS[lister](tmp_path)
    assert "\n" not in str(info.value)


def test_a_dataset_folder_that_cannot_be_listed_is_one_line_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _png(tmp_path / "cat" / "a.png", 1, size=4)
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if os.fspath(path) == str(tmp_path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(TrainerError, match=r"^dataset\.trainUri: .*: cannot list: Permission denied; ") as info:
        list_image_folder("trainUri", str(tmp_path))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ enormous files
@pytest.fixture
def small_bound(monkeypatch: pytest.MonkeyPatch) -> int:
    """MAX_IMAGE_FILE_BYTES lowered to 4 KiB: the tests' 'enormous' files stay small on disk."""
    monkeypatch.setattr(image_folder, "MAX_IMAGE_FILE_BYTES", 4096, raising=False)
    return 4096


def _padded_png(path: Path, size: int) -> str:
    """A valid PNG followed by zeros up to ``size`` bytes (PIL reads past the IEND chunk's end nothing)."""
    _png(path, 3)
    with open(path, "ab") as f:
        f.truncate(size)
    return str(path)


BIG_READERS: dict[str, Callable[[list[str], Path], Callable[[], object]]] = {
    **READERS,
    "fetch": lambda paths, root: lambda: [image_folder.fetch(p) is None for p in paths],
}


@pytest.mark.parametrize("reader", list(BIG_READERS), ids=list(BIG_READERS))
def test_an_enormous_file_named_like_an_image_is_skipped_not_read_whole(
    tmp_path: Path, reader: str, small_bound: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read whole before decoding, a file of many GB named x.jpg took a loader or decode task's memory with it."""
    paths = [_png(tmp_path / "cat" / f"{i}.png", i, size=4) for i in range(120)]
    big = _padded_png(tmp_path / "cat" / "z-big.png", small_bound + 1)
    got = BIG_READERS[reader]([*paths, big], tmp_path)()
    expected = {
        "map-style-scan": sorted(paths),  # skipped and counted, as an unreadable file
        "streaming-decoder": [""] * len(paths) + [big],
        "map-style-read": f"dataset: cannot read image {big}: no such plain file, or over 4,096 bytes",
        "fetch": [False] * len(paths) + [True],
    }
    assert got == expected[reader]


def test_an_enormous_object_is_skipped_not_read_whole(small_bound: int, tmp_path: Path) -> None:
    """The same on an object store, through the code a cluster runs (s3fs against a real S3 API)."""
    with s3_server("data") as s3:
        small, big = _png(tmp_path / "small.png", 1), _padded_png(tmp_path / "big.png", small_bound + 1)
        s3.client.put_object(Bucket="data", Key="cat/small.png", Body=Path(small).read_bytes())
        s3.client.put_object(Bucket="data", Key="cat/big.png", Body=Path(big).read_bytes())
        assert image_folder.fetch("s3://data/cat/small.png") == Path(small).read_bytes()
        assert image_folder.fetch("s3://data/cat/big.png") is None
        with pytest.raises(image_folder.TooLargeFile, match=r"big\.png: over 4,096 bytes$"):
            image_folder.read_file("s3://data/cat/big.png")
