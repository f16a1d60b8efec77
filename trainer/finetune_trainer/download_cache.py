"""The node-local download cache of object-store datasets (s3://, gs://, …): ``fetch_to_cache``.

The bytes are fsspec's business: a ``filecache`` (``WholeFileCacheFileSystem``) over the store, with
``check_files`` on, holds one local copy per object and fetches it again when the object's key in the
listing (``ukey``: ETag, modification time, size) changed. What the dataset reader needs is a folder tree,
so each sync also lays out a *view*: a folder of symbolic links into the cache, one per image as the streaming
path's listing reads the keys (``image_folder.listed_object``: nothing else is downloaded), named by a digest of the
URI and of every object's path, ETag/mtime and size. A changed, added or deleted object changes the
digest, so a changed dataset is never served stale; an unchanged one reuses its view after a single
listing, downloading nothing.

Ranks on one node share the cache. fsspec writes a download straight into its final file name and keeps
its metadata per process, so two ranks filling the same cache at once could read each other's half-written
files; one exclusive ``flock`` per URI makes the second rank wait for the first and then find everything
cached. Called by ``data`` for ``imagefolder`` datasets on object stores.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Final

from finetune_operator.api.contract import resolve_uri
from finetune_trainer import image_folder
from finetune_trainer.errors import TrainerError, exception_line
from finetune_trainer.image_folder import listed_object

__all__ = ["COMPLETE_MARKER", "cache_root", "fetch_to_cache"]

COMPLETE_MARKER: Final = ".complete"
_BATCH: Final = 256
"""Objects fetched per fsspec call: the store fetches a batch concurrently, and a batch's files are open at once."""
_VERSION_KEYS: Final = ("ETag", "etag", "md5Hash", "crc32c", "generation", "LastModified", "mtime", "updated", "created")


def cache_root(cache_dir: str | None) -> Path:
    """``dataset.cacheDir`` (resolved like every other URI), else a folder under the system's temporary directory."""
    return Path(resolve_uri(cache_dir)) if cache_dir else Path(tempfile.gettempdir()) / "finetune-cache"


def _version(info: dict[str, Any]) -> list[str]:
    # Whatever the backend reports that changes when the object does (s3: ETag, gcs: md5Hash/generation).
    return [f"{k}={info[k]}" for k in _VERSION_KEYS if info.get(k) is not None] + [f"size={info.get('size')}"]


def _listing(fs: Any, prefix: str, where: str) -> dict[str, dict[str, Any]]:
    """Every object under ``prefix`` as the store lists it now. fsspec's listing cache is dropped whole first:
    ``invalidate_cache(prefix)`` keeps the entries of sub-folders, from which ``ukey`` would then read an
    object's old ETag and keep serving its old copy."""
    fs.invalidate_cache()
    try:
        found: dict[str, dict[str, Any]] = fs.find(prefix, detail=True)
    except FileNotFoundError:
        found = {}
    files = {p: info for p, info in found.items() if info.get("type", "file") == "file"}
    if not files:
        raise TrainerError(f"{where}: no such prefix (no objects under it)")
    return files


def _wanted(prefix: str, files: list[str]) -> tuple[set[str], list[tuple[str, str]]]:
    """(class folders, (object, its path in the view) of each image) as ``listing`` reads the keys
    (``image_folder.listed_object``): nothing else is downloaded. Laid out as they are, the console's ``cat/`` folder
    markers, an object named like a folder (``a/b`` beside ``a/b/c.png``) or a dot file would cost the download or
    disk, and a ``.`` or ``..`` segment would make an image the streaming path leaves out (or climb out of the view)."""
    classes: set[str] = set()
    images: list[tuple[str, str]] = []
    for path in files:
        seen = listed_object(path[len(prefix) :])
        if seen is not None:
            classes.add(seen[0][0])
            if seen[1]:
                images.append((path, "/".join(seen[0])))
    return classes, images


def _fill_view(cached: Any, fs: Any, prefix: str, files: dict[str, dict[str, Any]], view: Path) -> None:
    """Bring every image into fsspec's cache (downloading only the missing or changed) and link it into ``view``,
    beside a folder for each class (one holding no image is the listing's error to report, as on a local folder).
    An object over ``MAX_IMAGE_FILE_BYTES`` is not downloaded: an empty file stands in for it, which the scan skips
    and counts as unreadable, as it would the object itself."""
    from fsspec.core import OpenFile, OpenFiles

    classes, wanted = _wanted(prefix, sorted(files))
    for name in classes:
        (view / name).mkdir(parents=True, exist_ok=True)
    images = []
    for path, rel in wanted:
        if (files[path].get("size") or 0) > image_folder.MAX_IMAGE_FILE_BYTES:
            (view / rel).parent.mkdir(parents=True, exist_ok=True)
            (view / rel).touch()
        else:
            images.append((path, rel))
    for start in range(0, len(images), _BATCH):
        batch = images[start : start + _BATCH]
        opened = cached.open_many(OpenFiles([OpenFile(cached, p, mode="rb") for p, _ in batch], mode="rb", fs=cached))
        for (_, rel), handle in zip(batch, opened, strict=True):
            local = handle.name
            handle.close()
            link = view / rel
            try:
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(local)
            except (FileExistsError, NotADirectoryError):
                # Two keys for one path ('cat//a.png' and 'cat/a.png'), or an image named like a folder of others
                # ('a.png' and 'a.png/b.png'): the first is kept.
                continue


def fetch_to_cache(uri: str, cache_dir: str | None, field: str | None = None) -> str:
    """The local folder holding the objects under ``uri`` as they are now, downloaded at most once per node
    and object version (see the module docstring). ``field``: the ``dataset`` field errors name (``trainUri``)."""
    root = cache_root(cache_dir)
    where = f"dataset.{field}: {uri}" if field else f"dataset: {uri}"
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as e:
        raise TrainerError(f"{where}: reading it needs fsspec with s3fs or gcsfs ({e})") from None
    except Exception as e:  # a malformed URI or backend options
        raise TrainerError(f"{where}: cannot open: {exception_line(e)}") from e
    prefix = path.rstrip("/")
    name = hashlib.sha256(uri.encode()).hexdigest()[:16]
    (root / "locks").mkdir(parents=True, exist_ok=True)
    with open(root / "locks" / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            files = _listing(fs, prefix, where)
            digest = hashlib.sha256(uri.encode())
            for p in sorted(files):
                digest.update(json.dumps([p[len(prefix) :], _version(files[p])]).encode())
            view = root / "datasets" / f"{name}-{digest.hexdigest()[:16]}"
            if (view / COMPLETE_MARKER).exists():
                return str(view)
            cached = fsspec.filesystem(
                "filecache",
                fs=fs,
                cache_storage=str(root / "objects"),
                check_files=True,  # a cached copy counts only while the object's ukey is unchanged
                cache_check=False,  # metadata is loaded below, under the lock, not re-read per file
                expiry_time=False,
                skip_instance_cache=True,
            )
            cached.load_cache()
            staging = view.with_name(f".{view.name}.{uuid.uuid4().hex[:8]}")
            try:
                _fill_view(cached, fs, prefix, files, staging)
                (staging / COMPLETE_MARKER).touch()
                shutil.rmtree(view, ignore_errors=True)  # an incomplete view from a process that died
                os.replace(staging, view)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except TrainerError:
            raise
        except FileNotFoundError:
            raise TrainerError(f"{where}: no such prefix") from None
        except Exception as e:  # each backend raises its own (botocore, google.auth, ...)
            raise TrainerError(f"{where}: download failed: {exception_line(e)}") from e
    return str(view)
