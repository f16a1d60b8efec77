"""Small file helpers for the trainer's outputs: a local path or an object-store URI (s3://, gs://).

Local paths get atomic writes (a temporary file in the same directory, then ``os.replace``) so that a
reader — `finetune predict`, a status watcher, a resumed run — never sees half a file. Object stores
go through fsspec, imported only when a remote URI is actually used; their single-object PUTs are
atomic already. Reading what someone else may have written is bounded here too: a plain file only
(``open_regular``), no more than asked (``read_bytes``), and no zip archive that expands when torch.load
reads it (``check_torch_archive``). Used by ``artifacts``, ``progress``, ``checkpoint`` and ``predict``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from finetune_operator.api.fields import quote
from finetune_trainer.errors import exception_line

__all__ = [
    "HashingWriter",
    "NotAFile",
    "StorageError",
    "UnsafeArchive",
    "atomic_directory",
    "atomic_path",
    "atomic_write_bytes",
    "check_torch_archive",
    "file_names",
    "is_remote",
    "join",
    "list_sizes",
    "local_path",
    "open_regular",
    "parent",
    "read_bytes",
    "read_text",
    "remove",
    "server_side_options",
    "sha256_bytes",
    "sha256_file",
    "sha256_stream",
    "upload_file",
    "write_bytes",
    "write_text",
]

_CHUNK = 1 << 20


class StorageError(OSError):
    """A read or write that failed, with the URI it was about in the message (one line)."""


def is_remote(uri: str) -> bool:
    """True for ``scheme://`` URIs other than ``file://``: those are opened through fsspec."""
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme != "file"


def local_path(uri: str) -> Path:
    """A local path or ``file://`` URI as a Path; a remote URI is a programming error here."""
    if is_remote(uri):
        raise ValueError(f"{uri} is not a local path")
    return Path(uri.removeprefix("file://")).expanduser()


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for paths and URIs alike (``os.path.join`` would mangle ``s3://``)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def parent(uri: str) -> str:
    """The folder holding ``uri`` (a path or an object-store URI)."""
    head, sep, _ = uri.rstrip("/").rpartition("/")
    return head if sep and head and not head.endswith(":/") else "."


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class NotAFile(OSError):
    """A path that names something other than a plain file (a FIFO, a device, a socket): refused before a byte is
    read, since reading one can block for ever (a FIFO with no writer) or never end (a link to /dev/zero)."""


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` open for reading when it is a plain file (links followed); NotAFile (IsADirectoryError for a
    directory) when it is anything else, its message saying what it is, without the path (callers name it).
    Opened without blocking, so that a FIFO is refused rather than waited on, and checked on the open descriptor,
    so that nothing swapped in between the check and the read is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError("a directory, not a plain file")
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "something else")
            raise NotAFile(f"{kind}, not a plain file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class UnsafeArchive(ValueError):
    """A file torch.load would read as a zip archive (torch.save's format) that is not one torch.save writes: one
    line saying what it is and what is accepted, without the file's name (callers name it)."""


_ZIP_MAGIC = b"PK\x03\x04"
"""How torch.load tells torch.save's zip format from its legacy pickle format: the file's first four bytes."""

_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, NotImplementedError, EOFError, struct.error)
"""What zipfile raises reading a damaged central directory (ValueError: a name not in UTF-8; NotImplementedError:
an unknown zip version); an OSError of the stream itself is no verdict on the archive and goes to the caller."""

_ACCEPTED = "accepted: torch.save's own archive, its entries stored uncompressed, adding up to no more than the file"


def check_torch_archive(stream: BinaryIO, *, legacy: bool = True) -> None:
    """UnsafeArchive when ``stream`` (seekable, the whole file from its start) is a zip archive that could expand
    as torch.load reads it: an entry that is compressed, or entries that add up to more than the file (torch.load
    allocates each record's unpacked size from the central directory and inflates it: a 300 KB file of deflated
    zeros took 300 MB, a larger one many GB). torch.save stores every entry as it is, so its files pass. Reads the
    central directory only, decompressing nothing; anything else (torch's legacy format, which is a plain pickle
    and cannot be compressed) passes, for torch.load to judge, unless ``legacy`` is False: a file only the trainer
    writes (a checkpoint) is always an archive, and torch's legacy reader of a forged one allocates whatever storage
    size it claims. Leaves ``stream`` at its start."""
    stream.seek(0)
    if stream.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
        stream.seek(0)
        if not legacy:
            raise UnsafeArchive(f"not a zip archive (it does not start with {_ZIP_MAGIC!r}); {_ACCEPTED}")
        return
    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    try:
        with zipfile.ZipFile(stream) as archive:  # a stream it was given: closing the archive leaves it open
            entries = archive.infolist()
    except _ZIP_ERRORS as e:
        # Unchecked, it is refused: miniz, torch's reader, may read a directory zipfile does not.
        raise UnsafeArchive(
            f"a zip archive whose directory cannot be read (truncated or damaged: {exception_line(e)[:120]}); {_ACCEPTED}"
        ) from None
    finally:
        stream.seek(0)
    packed = next((e for e in entries if e.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:
        raise UnsafeArchive(
            f"a zip archive with a compressed entry ({quote(packed.filename, 60)}: {packed.compress_size} bytes "
            f"unpacking to {packed.file_size}); {_ACCEPTED}"
        )
    total = sum(e.file_size for e in entries)
    if total > size:
        raise UnsafeArchive(f"a zip archive whose entries add up to {total} bytes, more than its own {size}; {_ACCEPTED}")


def sha256_file(path: str | Path) -> str:
    with open_regular(path) as f:
        return sha256_stream(f)


def sha256_stream(f: BinaryIO) -> str:
    """The sha256 of what is left to read of ``f``."""
    digest = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


class HashingWriter:
    """A binary file open for writing that keeps the sha256 of the bytes written through it: the checksum of
    a file as it is written, without reading it back (a checkpoint: hundreds of MB, every epoch)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed over ``path`` when the block succeeds,
    removed when it fails, so that readers see the old file or the new one, never a mix."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file must live in the target's directory: os.replace is atomic only within a filesystem.
    # Named, not created (mkstemp would make it 0600): the writer creates it with the usual permissions.
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A hidden temporary directory beside ``path`` to fill; renamed to ``path`` when the block succeeds
    (replacing an older ``path``), removed when it fails: readers (a resumed run listing checkpoints, Ray's
    retention) find no directory or a complete one, never a half-written one. One writer per ``path``: the
    staging left by a writer that was killed (a crashed attempt, an epoch being re-run) is removed first."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    # Beside the target: os.rename is atomic only within a filesystem. Hidden, so that name patterns
    # (checkpoint_epoch_NNNN) never match it.
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            # Left by an attempt that died between writing and reporting it (the epoch is being re-run):
            # never registered, so nothing refers to it.
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------- local or remote
def _fs_open(uri: str, mode: str, *, fs_options: dict[str, Any] | None = None, file_options: dict[str, Any] | None = None) -> Any:
    """Open ``uri`` with fsspec: ``fs_options`` go to the filesystem's constructor, ``file_options`` to its
    ``open`` (the file object); a backend silently drops what it does not know in either place."""
    try:
        import fsspec
    except ImportError:
        raise StorageError(f"{uri}: object-store URIs need fsspec (and s3fs or gcsfs); install them") from None
    fs, path = fsspec.core.url_to_fs(uri, **(fs_options or {}))
    return fs.open(path, mode, **(file_options or {}))


def server_side_options(uri: str, kms_key: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(filesystem options, open options) that make the object store encrypt ``uri`` with ``kms_key``: S3's
    SSE-KMS is an S3FileSystem option (s3fs passes ``s3_additional_kwargs`` to every PutObject /
    CreateMultipartUpload); GCS's CMEK is a GCSFile option (gcsfs reads ``kms_key_name`` from ``open()``
    and ignores it in the constructor). Nothing for other stores or without a key."""
    if kms_key is None:
        return {}, {}
    scheme = uri.partition("://")[0]
    if scheme == "s3":
        return {"s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key}}, {}
    if scheme in ("gs", "gcs"):
        return {}, {"kms_key_name": kms_key}
    return {}, {}


def read_bytes(uri: str, *, at_most: int | None = None) -> bytes:
    """The content of a local file or an object; FileNotFoundError when it does not exist. With ``at_most``, no
    more than one byte past it, so that a caller expecting that size sees a longer file without holding it whole
    (a link to /dev/zero, a model file swapped for something huge)."""
    size = -1 if at_most is None else max(at_most, 0) + 1
    if not is_remote(uri):
        with open_regular(local_path(uri)) as stream:
            # No more than the file holds (and one byte to see it grew): Python allocates what read() is asked for
            # up front, and a card may list any size (10**15: MemoryError; 2**64: OverflowError).
            return stream.read(size if size < 0 else min(size, os.fstat(stream.fileno()).st_size + 1))
    try:
        with _fs_open(uri, "rb") as f:
            return bytes(f.read(size))
    except FileNotFoundError:
        raise
    except Exception as e:  # backends raise their own types (botocore, google.auth, ...)
        raise StorageError(f"{uri}: cannot read: {exception_line(e)}") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Replace the file or object at ``uri`` with ``data`` (atomically for local paths)."""
    if not is_remote(uri):
        atomic_write_bytes(local_path(uri), data)
        return
    try:
        with _fs_open(uri, "wb") as f:
            f.write(data)
    except Exception as e:
        raise StorageError(f"{uri}: cannot write: {exception_line(e)}") from e


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def remove(uri: str) -> None:
    """Delete the file or object at ``uri`` if it exists."""
    if not is_remote(uri):
        local_path(uri).unlink(missing_ok=True)
        return
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            fs.rm(path)
    except Exception as e:
        raise StorageError(f"{uri}: cannot delete: {exception_line(e)}") from e


def list_sizes(uri: str) -> dict[str, int]:
    """The plain files directly in the directory (or prefix) ``uri``, by name, with their sizes in bytes; {} when
    there is none."""
    if not is_remote(uri):
        folder = local_path(uri)
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        fs.invalidate_cache(path)  # another attempt of this job may have written there since the last listing
        entries = fs.ls(path, detail=True, refresh=True) if fs.exists(path) else []
        # s3fs would keep the listing (sizes, ETags) and open a file rewritten since with the stale ETag: forget it.
        fs.invalidate_cache(path)
    except Exception as e:
        raise StorageError(f"{uri}: cannot list: {exception_line(e)}") from e
    return {str(e["name"]).rstrip("/").rpartition("/")[2]: int(e.get("size") or 0) for e in entries if e.get("type") == "file"}


def file_names(uri: str) -> list[str]:
    """The names of the plain files directly in the directory (or prefix) ``uri``, sorted; [] when there is none."""
    return sorted(list_sizes(uri))


def upload_file(src: str | Path, uri: str, *, kms_key: str | None = None) -> None:
    """Copy the local file ``src`` to ``uri`` (a path or an object-store URI); ``kms_key``: have the object
    store encrypt it with that KMS key (``server_side_options``)."""
    if not is_remote(uri):
        with atomic_path(local_path(uri)) as tmp:
            shutil.copyfile(src, tmp)
        return
    try:
        fs_options, file_options = server_side_options(uri, kms_key)
        with open(src, "rb") as fin, _fs_open(uri, "wb", fs_options=fs_options, file_options=file_options) as fout:
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)
    except Exception as e:
        raise StorageError(f"{uri}: cannot upload {src}: {exception_line(e)}") from e
