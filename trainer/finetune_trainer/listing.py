"""Which ingest path a job takes (``choose_ingest``) and the listing of an ImageFolder for the streaming path
(``list_image_folder``): the files are listed, never copied, and no file is opened.

Why list and not scan: the map-style path opens every file's header up front (``image_folder.scan_images``),
which on an object store is one request per image, hours for 1.28 M objects. Streaming finds unreadable
files while decoding them instead (``streaming``). Class folders, dot files and extensions follow
``image_folder``'s rules (its predicates and its listing order), so that both paths give the same classes,
the same labels and, on a folder without unreadable files, the same images in the same order.

An object store is listed class folder by class folder, several at once (``_find_all``): one paged listing of the
whole prefix is 1,000 keys a round trip, one after the other, minutes for ImageNet before the first step, on every
worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from finetune_operator.api.contract import resolve_uri
from finetune_operator.api.fields import uri_scheme
from finetune_operator.api.v1alpha1 import DatasetSpec
from finetune_trainer.errors import TrainerError, exception_line, printable
from finetune_trainer.image_folder import (
    IMG_EXTENSIONS,
    class_folders,
    image_files,
    listed_object,
    one_form_each,
    walk,
    walk_order,
)

__all__ = ["OBJECT_STORES", "STREAMING_THRESHOLD", "Ingest", "Lister", "choose_ingest", "is_object_store", "list_image_folder"]

OBJECT_STORES: Final = ("s3", "gs", "gcs", "az", "abfs", "abfss")
STREAMING_THRESHOLD: Final = 20_000
"""``ingest: auto`` streams a local folder holding more files than this. A choice, not a measurement: below it a
map-style scan takes seconds and DataLoader processes are the cheaper start; above it the header scan and the
per-node reads grow with the dataset while streaming starts in the same seconds whatever the size."""
LISTING_CONCURRENCY: Final = 16
"""Class folders of an object store listed at once. A listing request waits ~100 ms on a real store and s3fs/gcsfs
run every request on one event loop, so threads waiting on it overlap the waits. s3fs's connection pool (botocore's
``max_pool_connections``, 10 unless configured) caps the requests really in flight below this."""


@dataclass(frozen=True)
class Ingest:
    """The path a job's images take (``streaming`` or ``mapStyle``) and why, for the log and the model card."""

    kind: str
    why: str


def is_object_store(uri: str) -> bool:
    return uri_scheme(uri) in OBJECT_STORES


def _more_files_than(folder: str, limit: int) -> bool:
    """Whether ``folder`` holds more than ``limit`` files (stops counting there: names only, nothing opened)."""
    seen = 0
    for _, _dirs, files in walk(folder):
        seen += len(files)
        if seen > limit:
            return True
    return False


def choose_ingest(ds: DatasetSpec) -> Ingest:
    """``spec.dataset.ingest`` resolved: see the field's documentation and docs/datasets.md."""
    if ds.format != "imagefolder" or ds.train_uri is None:
        return Ingest("mapStyle", f"format {ds.format!r} is held in memory")
    if ds.ingest != "auto":
        return Ingest(ds.ingest, f"dataset.ingest: {ds.ingest}")
    uris = [u for u in (ds.train_uri, ds.validation_uri) if u is not None]
    if any(is_object_store(u) for u in uris):
        return Ingest("streaming", "auto: an object store is streamed rather than copied to every node")
    if _more_files_than(resolve_uri(ds.train_uri), STREAMING_THRESHOLD):
        return Ingest("streaming", f"auto: more than {STREAMING_THRESHOLD} files under dataset.trainUri")
    return Ingest("mapStyle", f"auto: a local folder of at most {STREAMING_THRESHOLD} files")


def _remote_listing(field: str, uri: str) -> tuple[Any, str, list[str]]:
    """(filesystem, prefix, every object path under it) as the store lists it now."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        prefix = path.rstrip("/")
        fs.invalidate_cache()  # another job (or attempt) may have written there since the last listing
        try:
            found = _find_all(fs, prefix)
        finally:
            # And after: the cached filesystem would keep one info dict per object (~1.2 KB each under moto; 1.5 GB
            # for ImageNet) in every worker for the whole run. The samples keep only the paths.
            fs.invalidate_cache()
    except ImportError as e:
        raise TrainerError(f"dataset.{field}: {uri}: reading it needs fsspec with s3fs or gcsfs ({e})") from None
    except FileNotFoundError:
        found = []
    except Exception as e:  # each backend raises its own (botocore, google.auth, ...)
        raise TrainerError(f"dataset.{field}: {uri}: cannot list: {exception_line(e)}") from e
    return fs, prefix, found


def _find_all(fs: Any, prefix: str) -> list[str]:
    """The paths ``fs.find(prefix)`` gives, sorted: one delimiter listing of ``prefix`` (its objects and its folders,
    i.e. its common prefixes), then each folder's ``find``, ``LISTING_CONCURRENCY`` at once. Every object under
    ``prefix`` is either directly in it or under exactly one of its folders, so the union is ``find``'s set; a set,
    because a key with an empty segment (``prefix//x``) makes a folder named like ``prefix`` itself. Every folder
    is listed, dot folders too: ``_list_remote`` needs to know that the prefix holds something to tell "no class
    folders" from "no such prefix". Raises ``FileNotFoundError`` when nothing is there, as ``find`` returns []."""
    entries = fs.ls(prefix, detail=True)
    found = {str(e["name"]) for e in entries if e["type"] != "directory"}
    folders = sorted(str(e["name"]) for e in entries if e["type"] == "directory")
    if folders:
        pool = ThreadPoolExecutor(min(LISTING_CONCURRENCY, len(folders)), thread_name_prefix="listing")
        try:
            futures = [pool.submit(_find_folder, fs, folder) for folder in folders]
            for future in futures:  # in name order: the first folder that failed, whichever failed first
                found.update(future.result())
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure, no more requests for a listing that has failed
    return sorted(found)


def _find_folder(fs: Any, folder: str) -> list[str]:
    """``fs.find(folder)``; [] for a folder deleted since the prefix was listed (as if listed after). A
    FileNotFoundError is no such folder: the store failing this listing (NoSuchBucket, a 404 of a proxy), re-raised as
    another error, for ``_remote_listing`` to report rather than read as no objects: the class would vanish and
    every label after it shift."""
    try:
        return [str(p) for p in fs.find(folder)]
    except FileNotFoundError as e:
        raise OSError(f"listing {folder}: {exception_line(e)}") from e


def _list_remote(field: str, uri: str) -> tuple[list[str], list[tuple[str, int]]]:
    fs, prefix, found = _remote_listing(field, uri)
    folders: set[str] = set()
    by_class: dict[str, list[tuple[tuple[tuple[int, str], ...], str]]] = {}
    for path in found:
        seen = listed_object(path[len(prefix) :])
        if seen is None:
            continue  # a file beside the class folders, or a dot folder: not a class
        parts, image = seen
        folders.add(parts[0])
        if not image:
            continue
        by_class.setdefault(parts[0], []).append((walk_order(parts[1:]), fs.unstrip_protocol(path)))
    if not found:
        raise TrainerError(f"dataset.{field}: {uri}: no such prefix (no objects under it)")
    classes = sorted(folders)
    if not classes:
        raise TrainerError(f"dataset.{field}: {uri} holds no class folders; expected one sub-folder per class")
    one_form_each(field, uri, classes)
    for name in classes:
        if name not in by_class:
            raise TrainerError(
                f"dataset.{field}: class folder {uri.rstrip('/')}/{printable(name)} holds no images "
                f"({', '.join(IMG_EXTENSIONS)}); add some or remove it"
            )
    samples = [(path, label) for label, name in enumerate(classes) for _, path in sorted(by_class[name])]
    return classes, samples


Lister = Callable[[str, str], tuple[list[str], list[tuple[str, int]]]]
"""``list_image_folder``'s signature: (field name, URI) -> (class names, samples)."""


def list_image_folder(field: str, uri: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, ``(path or URI, label)`` of every image file) of the ImageFolder at ``uri``: the classes and
    the order of ``image_folder.class_folders`` and its walk, label = index in the sorted class list."""
    if is_object_store(uri):
        return _list_remote(field, uri)
    root = resolve_uri(uri)
    classes = class_folders(field, uri, root)
    samples = [(path, label) for label, name in enumerate(classes) for path in image_files(os.path.join(root, name))]
    return classes, samples
