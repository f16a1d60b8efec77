"""Which ingest path a job takes (``choose_ingest``) and the listing of an ImageFolder for the streaming path
(``list_image_folder``): the files are listed, never copied, and no file is opened.

Why list and not scan: the map-style path opens every file's header up front (``image_folder.scan_images``),
which on an object store is one request per image, hours for 1.28 M objects. Streaming finds unreadable
files while decoding them instead (``streaming``). Class folders, dot files and extensions follow
``image_folder``'s rules (its predicates and its listing order), so that both paths give the same classes,
the same labels and, on a folder without unreadable files, the same images in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Final

from finetune_operator.api.contract import resolve_uri
from finetune_operator.api.fields import uri_scheme
from finetune_operator.api.v1alpha1 import DatasetSpec
from finetune_trainer.errors import TrainerError, exception_line
from finetune_trainer.image_folder import (
    IMG_EXTENSIONS,
    class_folders,
    image_files,
    is_hidden,
    is_image_name,
    walk,
    walk_order,
)

__all__ = ["OBJECT_STORES", "STREAMING_THRESHOLD", "Ingest", "choose_ingest", "is_object_store", "list_image_folder"]

OBJECT_STORES: Final = ("s3", "gs", "gcs", "az", "abfs", "abfss")
STREAMING_THRESHOLD: Final = 20_000
"""``ingest: auto`` streams a local folder holding more files than this. A choice, not a measurement: below it a
map-style scan takes seconds and DataLoader processes are the cheaper start; above it the header scan and the
per-node reads grow with the dataset while streaming starts in the same seconds whatever the size."""


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
            found = fs.find(prefix)
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
    return fs, prefix, [str(p) for p in found]


def _list_remote(field: str, uri: str) -> tuple[list[str], list[tuple[str, int]]]:
    fs, prefix, found = _remote_listing(field, uri)
    folders: set[str] = set()
    by_class: dict[str, list[tuple[tuple[tuple[int, str], ...], str]]] = {}
    for path in found:
        parts = path[len(prefix) :].strip("/").split("/")
        if len(parts) < 2 or is_hidden(parts[0]):
            continue  # a file beside the class folders, or a dot folder: not a class
        folders.add(parts[0])
        if any(is_hidden(p) for p in parts[1:-1]) or not is_image_name(parts[-1]):
            continue
        by_class.setdefault(parts[0], []).append((walk_order(parts[1:]), fs.unstrip_protocol(path)))
    if not found:
        raise TrainerError(f"dataset.{field}: {uri}: no such prefix (no objects under it)")
    classes = sorted(folders)
    if not classes:
        raise TrainerError(f"dataset.{field}: {uri} holds no class folders; expected one sub-folder per class")
    for name in classes:
        if name not in by_class:
            raise TrainerError(
                f"dataset.{field}: class folder {uri.rstrip('/')}/{name} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                "add some or remove it"
            )
    samples = [(path, label) for label, name in enumerate(classes) for _, path in sorted(by_class[name])]
    return classes, samples


def list_image_folder(field: str, uri: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, ``(path or URI, label)`` of every image file) of the ImageFolder at ``uri``: the classes and
    the order of ``image_folder.class_folders`` and its walk, label = index in the sorted class list."""
    if is_object_store(uri):
        return _list_remote(field, uri)
    root = resolve_uri(uri)
    classes = class_folders(field, uri, root)
    samples = [(path, label) for label, name in enumerate(classes) for path in image_files(os.path.join(root, name))]
    return classes, samples
