"""Datasets in the ImageFolder layout (one sub-folder of images per class): the class folders
(``class_folders``), the images under them (``scan_images``) and the dataset reading them (``ImageFiles``).

Labels index the class list computed here, never a second listing: torchvision's ``ImageFolder``
lists classes its own way (a ``.thumbs/`` folder becomes a class and shifts every label). Dot files and
dot folders are not data (``.thumbs/``, ``.ipynb_checkpoints/``, macOS ``._x.png`` AppleDouble files)
and are skipped everywhere. A file PIL cannot identify is skipped and counted when the folder is
scanned, as is one whose resize would be too large (``image_bounds``: a 1×100,000 strip); more than
``MAX_UNREADABLE_FRACTION`` of them fails the job, naming one. A file that passes the scan but cannot be decoded
later (truncated after its header) fails when read, naming the file.
"""

from __future__ import annotations

import io
import logging
import os
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets

from finetune_operator.api.fields import quote, shorten
from finetune_trainer.errors import TrainerError, printable
from finetune_trainer.image_bounds import check_resize, short_side_resize
from finetune_trainer.storage import NotAFile, open_regular

__all__ = [
    "IMG_EXTENSIONS",
    "MAX_IMAGE_FILE_BYTES",
    "MAX_UNREADABLE_FRACTION",
    "READ_ERRORS",
    "READ_RETRY_DELAYS",
    "ImageFiles",
    "StreamedImages",
    "TooLargeFile",
    "class_folders",
    "decode_image",
    "fetch",
    "image_files",
    "is_hidden",
    "is_image_name",
    "listed_object",
    "load_image",
    "one_form_each",
    "read_file",
    "same_classes",
    "scan_images",
    "walk",
    "walk_order",
]

log = logging.getLogger(__name__)

IMG_EXTENSIONS: Final = datasets.folder.IMG_EXTENSIONS
MAX_UNREADABLE_FRACTION: Final = 0.01
"""Unreadable files tolerated (skipped) among the image files of a folder tree: a stray broken file
should not cost a run, a folder of them is a broken dataset."""
# Opening a header is I/O-bound: threads overlap the latency of network file systems.
_SCAN_THREADS: Final = 8
# DecompressionBombError (a header declaring over twice PIL's MAX_IMAGE_PIXELS) derives from Exception, not OSError:
# an oversized image is an unreadable one, skipped and counted like the rest.
READ_ERRORS: Final = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


MAX_IMAGE_FILE_BYTES: Final = 512 << 20
"""The largest image file read: past it a file is skipped and counted like an undecodable one (``TooLargeFile``).
Read whole into memory before decoding, a file of many GB named ``x.jpg`` took a loader or decode task's memory with
it; 512 MiB holds any image PIL agrees to decode (``MAX_IMAGE_PIXELS``, ~89 Mpx: 268 MB as 8-bit RGB, uncompressed)."""


class TooLargeFile(ValueError):
    """An image file over ``MAX_IMAGE_FILE_BYTES``: skipped and counted, never read whole, never retried."""


def _over_the_bound() -> str:
    return f"over {MAX_IMAGE_FILE_BYTES:,} bytes"


def _bounded_read(f: Any, path: str) -> bytes:
    """The whole of ``f``, refused (``TooLargeFile``) past ``MAX_IMAGE_FILE_BYTES`` from its size when the file gives
    one, else once one byte more than that has been read."""
    size = getattr(f, "size", None)  # fsspec's files know it from the listing or a HEAD
    if size is None and hasattr(f, "fileno"):
        size = os.fstat(f.fileno()).st_size
    data = f.read(MAX_IMAGE_FILE_BYTES + 1) if size is None or size <= MAX_IMAGE_FILE_BYTES else b""
    if (size is not None and size > MAX_IMAGE_FILE_BYTES) or len(data) > MAX_IMAGE_FILE_BYTES:
        raise TooLargeFile(f"{printable(path)}: {_over_the_bound()}")
    return bytes(data)


def read_file(path: str) -> bytes:
    """The bytes of a local file or of an object-store URI (fsspec: s3's endpoint and credentials from the environment),
    at most ``MAX_IMAGE_FILE_BYTES`` of them (``TooLargeFile`` past it)."""
    if "://" not in path:
        # A plain file only (NotAFile otherwise): a FIFO named like an image would block here for ever, a link to
        # /dev/zero be read until memory runs out.
        with open_regular(path) as f:
            return _bounded_read(f, path)
    import fsspec

    # Through the protocol's filesystem, not fsspec.open / url_to_fs: both read '::' as URL chaining, and an object
    # may be named 'a::b.png'. Options the URL carries (adlfs' account in 'abfs://c@account...') as url_to_fs takes
    # them; the instance is then fsspec's cached one, the listing's.
    protocol = path.split("://", 1)[0]
    options = fsspec.get_filesystem_class(protocol)._get_kwargs_from_urls(path)
    fs = fsspec.filesystem(protocol, **options)
    with fs.open(path, "rb") as f:
        return _bounded_read(f, path)


READ_RETRY_DELAYS: Final = (0.5, 2.0, 8.0)
"""Seconds slept before each retry of a file the storage failed to return (after s3fs/botocore's own retries)."""


def fetch(path: str, read: Callable[[str], bytes] = read_file) -> bytes | None:
    """``read(path)``, telling a storage error from a missing file: None when the file is gone
    (``FileNotFoundError``, deleted after the listing), no plain file (``NotAFile``, a directory) or too large
    (``TooLargeFile``): skipped and counted like an undecodable file; any other
    ``OSError`` (a reset connection, throttling, expired credentials, a permission) is retried after each of
    ``READ_RETRY_DELAYS``, then a one-line TrainerError naming the file: counting it as a corrupt image would
    silently swap training images and tell the user to fix files that are fine."""
    for delay in (*READ_RETRY_DELAYS, None):
        try:
            return read(path)
        except (FileNotFoundError, NotAFile, IsADirectoryError, TooLargeFile):
            return None
        except OSError as e:
            if delay is None:
                tries = len(READ_RETRY_DELAYS) + 1
                raise TrainerError(
                    f"dataset: cannot read {printable(path)} from its storage ({tries} tries): "
                    f"{type(e).__name__}: {printable(str(e))}"
                ) from None
            time.sleep(delay)
    raise AssertionError("unreachable")


def decode_image(data: bytes, resize: int | None = None) -> Image.Image:
    """An RGB PIL image from a file's bytes (decoded now, not lazily); raises one of ``READ_ERRORS``, among them
    ``image_bounds.OversizedImage``, from the header, before decoding, when resizing its short side to ``resize``
    would be too large."""
    with Image.open(io.BytesIO(data)) as img:
        check_resize(img.size, resize)
        rgb: Image.Image = img.convert("RGB")
    return rgb


def load_image(path: str, resize: int | None = None) -> Image.Image:
    """An RGB PIL image; a file PIL cannot decode, or too large once resized (``decode_image``), is a user error
    naming that file."""
    data = fetch(path)
    if data is None:
        raise TrainerError(f"dataset: cannot read image {printable(path)}: no such plain file, or {_over_the_bound()}")
    try:
        return decode_image(data, resize)
    except READ_ERRORS as e:
        raise TrainerError(f"dataset: cannot read image {printable(path)}: {printable(str(e))}") from None


def is_hidden(name: str) -> bool:
    """A dot file or dot folder: not data, wherever it is in the tree."""
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    """A file name that counts as an image: one of ``IMG_EXTENSIONS`` (any case), not a dot file."""
    return not is_hidden(name) and name.lower().endswith(IMG_EXTENSIONS)


def listed_object(relative: str) -> tuple[list[str], bool] | None:
    """How these rules read an object store's key, ``relative`` to the dataset's prefix: None for a key in no class
    folder (beside the class folders, a dot folder, the console's ``cat/`` folder marker); else its segments, the
    class folder first, and whether it is an image of that class (an image name, no dot folder on the way: ``.``
    and ``..`` segments are dot folders). For the listings that come back flat: ``listing``'s and ``download_cache``'s."""
    parts = relative.strip("/").split("/")
    if len(parts) < 2 or is_hidden(parts[0]):
        return None
    return parts, not any(is_hidden(p) for p in parts[1:-1]) and is_image_name(parts[-1])


def walk_order(relative_parts: Sequence[str]) -> tuple[tuple[int, str], ...]:
    """The sort key that lists files as ``_image_files`` (``os.walk``, sorted, top-down) does: in each folder its
    files first, then its sub-folders, each by name. For listings that come back flat (an object store's)."""
    *folders, name = relative_parts
    return (*((1, folder) for folder in folders), (0, name))


def _unlistable(error: OSError) -> None:
    """``os.walk``'s ``onerror``: a folder it cannot list (another uid's 0700 folder on a pvc, an NFS error) is a
    TrainerError naming it, not left out with its images (``os.walk``'s default, silent). One deleted (or replaced by
    a file) since its parent was listed is left out, as if listed after; a missing or file root is its caller's to report."""
    if isinstance(error, FileNotFoundError | NotADirectoryError):
        return
    raise TrainerError(
        f"dataset: cannot list {printable(str(error.filename))}: {printable(error.strerror or str(error))}; "
        "its images would be left out: make it readable to the trainer, or remove it"
    ) from None


def walk(folder: str | Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(folder)`` top-down with links followed, dot folders left out, sub-folders sorted, a folder it cannot
    list a TrainerError (``_unlistable``), and no folder
    walked twice: a link back to a folder above it (``cat/up -> ..``, a loop that would list every image ~40 times
    and give the other classes' images this class's label) or to one already walked is not followed (a warning)."""
    seen = {os.path.realpath(folder)}
    for current, dirs, files in os.walk(folder, onerror=_unlistable, followlinks=True):
        here = os.path.realpath(current)
        kept = []
        for name in sorted(d for d in dirs if not is_hidden(d)):
            real = os.path.realpath(os.path.join(current, name))
            if real in seen or here == real or here.startswith(real.rstrip(os.sep) + os.sep):
                link = os.path.join(current, name)
                log.warning("dataset: not following %s: it leads to a folder already listed or above it (a loop)", link)
                continue
            seen.add(real)
            kept.append(name)
        dirs[:] = kept
        yield current, dirs, files


def _image_files(folder: Path) -> Iterator[str]:
    """Image files under ``folder`` (recursively, links followed, loops not: ``walk``), sorted, without dot files or folders."""
    for current, _dirs, files in walk(folder):
        for name in sorted(files):
            if is_image_name(name):
                yield os.path.join(current, name)


def image_files(folder: str) -> Iterator[str]:
    """The image files under a local class folder, in the order the map-style path lists them."""
    return _image_files(Path(folder))


def _loops(root: Path, name: str) -> bool:
    """A class folder that is a link to ``root`` or above it (``all -> .``): a loop, not a class (a warning);
    as a class it would take every other class's images."""
    real, top = os.path.realpath(root / name), os.path.realpath(root)
    if real == top or top.startswith(real.rstrip(os.sep) + os.sep):
        log.warning("dataset: not following %s: it leads to the dataset's folder or above it (a loop)", root / name)
        return True
    return False


def one_form_each(field: str, uri: str, classes: Sequence[str]) -> None:
    """TrainerError (one line) when two class folders are one name in two Unicode forms (NFC and NFD 'é', as macOS
    and a Linux client write it): they look the same in every listing, log and model card, yet are two classes,
    each with half the images. Case-only twins ('Cat', 'cat') are two names, and two classes, as on every store."""
    seen: dict[str, str] = {}
    for name in classes:
        other = seen.setdefault(unicodedata.normalize("NFC", name), name)
        if other != name:
            raise TrainerError(
                f"dataset.{field}: class folders {shorten(ascii(other), 80)} and {shorten(ascii(name), 80)} under {uri} "
                "are one name in two Unicode forms (they look the same); merge them into one folder, or rename one"
            )


def class_folders(field: str, uri: str, root: str) -> list[str]:
    """The class folder names under ``root``, sorted; dot folders are not classes; each must hold an image."""
    path = Path(root)
    if not path.exists():
        raise TrainerError(f"dataset.{field}: {uri}: no such directory")
    if not path.is_dir():
        raise TrainerError(f"dataset.{field}: {uri} is a file; expected a folder with one sub-folder per class")
    try:
        entries = list(os.scandir(path))
    except OSError as e:  # not readable to the trainer's uid (a pvc written by another), an NFS error
        raise TrainerError(
            f"dataset.{field}: {uri}: cannot list: {printable(e.strerror or str(e))}; make it readable to the trainer"
        ) from None
    classes = sorted(e.name for e in entries if e.is_dir() and not is_hidden(e.name) and not _loops(path, e.name))
    if not classes:
        raise TrainerError(f"dataset.{field}: {uri} holds no class folders; expected one sub-folder per class")
    one_form_each(field, uri, classes)
    for name in classes:
        if next(_image_files(path / name), None) is None:
            raise TrainerError(
                f"dataset.{field}: class folder {printable(str(path / name))} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                "add some or remove it"
            )
    return classes


def same_classes(train: list[str], val: list[str]) -> None:
    if val != train:
        missing, extra = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        forms = {unicodedata.normalize("NFC", name): name for name in extra}
        twin = next(((name, forms[key]) for name in missing if (key := unicodedata.normalize("NFC", name)) in forms), None)
        # Else 'missing ['é'], extra ['é']': the difference is in how the name is written, which only escapes show.
        how = (
            f" ({shorten(ascii(twin[0]), 80)} is written {shorten(ascii(twin[1]), 80)} there: another Unicode form)"
            if twin
            else ""
        )
        raise TrainerError(
            f"dataset.validationUri: its classes differ from dataset.trainUri's: "
            f"missing {quote(missing) if missing else 'none'}, extra {quote(extra) if extra else 'none'}{how}; "
            "both need the same class folders"
        )


def _unreadable(path: str, resize: int | None = None) -> str | None:
    """Why PIL cannot identify ``path``, or why it or its resize would be too large (its header only: decoding every
    image would double the reads)."""
    try:
        with open_regular(path) as f, Image.open(f) as img:  # a FIFO or a device: unreadable, not waited on
            if os.fstat(f.fileno()).st_size > MAX_IMAGE_FILE_BYTES:  # never read whole (read_file)
                return _over_the_bound()
            check_resize(img.size, resize)
            return None
    except READ_ERRORS as e:
        return str(e) or type(e).__name__


def scan_images(field: str, uri: str, root: str, classes: Sequence[str], resize: int | None = None) -> list[tuple[str, int]]:
    """``(path, label)`` of every readable image under ``root``'s class folders, label = index in ``classes``.

    Unreadable files, and those too large once their short side is resized to ``resize`` (``image_bounds``; the
    job's resize size: one scan serves training and validation), are skipped and counted (a warning); more than
    ``MAX_UNREADABLE_FRACTION`` of them, or a class left without a readable image, is a TrainerError naming
    ``dataset.<field>``."""
    found = [(path, label) for label, name in enumerate(classes) for path in _image_files(Path(root) / name)]
    with ThreadPoolExecutor(_SCAN_THREADS) as pool:
        problems = list(pool.map(_unreadable, [path for path, _ in found], [resize] * len(found)))
    bad = [(path, problem) for (path, _), problem in zip(found, problems, strict=True) if problem is not None]
    samples = [sample for sample, problem in zip(found, problems, strict=True) if problem is None]
    if bad:
        example = printable(f"e.g. {bad[0][0]}: {bad[0][1]}")
        if len(bad) > MAX_UNREADABLE_FRACTION * len(found):
            raise TrainerError(
                f"dataset.{field}: {len(bad)} of {len(found)} image files under {uri} cannot be read ({example}); "
                f"at most {MAX_UNREADABLE_FRACTION:.0%} may be, and they are skipped: fix or remove them"
            )
        log.warning("dataset.%s: skipped %d of %d image files that cannot be read (%s)", field, len(bad), len(found), example)
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:
        folder = Path(root) / empty[0]
        raise TrainerError(
            f"dataset.{field}: class folder {printable(str(folder))} holds no readable images; add some or remove it"
        )
    return samples


class ImageFiles(Dataset[tuple[Tensor, int]]):
    """``(transform(image), label)`` for the ``(path, label)`` pairs of ``scan_images``."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable[[Any], Tensor]) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        # Refused from the header when the transform's resize would be too large (a TrainerError naming the file).
        return self.transform(load_image(path, short_side_resize(self.transform))), label


class StreamedImages(ImageFiles):
    """The listed (not scanned) images of the streaming path: ``listing``'s pairs, read through fsspec. The loop
    streams them with Ray Data (``streaming``); this map-style view serves what needs random access (the final
    evaluation on rank 0, sample predictions, a feature cache)."""
