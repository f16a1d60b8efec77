"""Forged torch.save files, for the tests of what reads one back from a place someone else can write (checkpoints,
model.pt, weightsUri): archives rewritten with compressed entries or a lying directory, and files of torch's legacy
pickle format written by hand. Every builder returns the file's bytes; none expands to more than 50 MB."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections.abc import Callable

import torch
from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

BOMB_BYTES = 50 << 20
"""What a bomb's one compressed entry unpacks to: 50 MB of zeros, about 50 KB deflated."""


def saved(obj: object) -> bytes:
    """``obj`` as torch.save writes it (a zip archive of stored entries)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rezipped(data: bytes, change: Callable[[str, bytes], tuple[bytes, int]]) -> bytes:
    """The zip archive ``data`` with each entry's content and compression (``zipfile.ZIP_*``) as ``change`` (given the
    entry's name and content) returns them."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            content, compression = change(info.filename, source.read(info))
            target.writestr(info.filename, content, compress_type=compression)
    return out.getvalue()


def bomb(obj: object = None) -> bytes:
    """A torch.save archive (of ``obj``, by default a small state_dict) whose first tensor's storage is replaced by
    BOMB_BYTES of zeros, deflated: what torch.load would inflate into memory whole."""
    data = saved({"weight": torch.zeros(3)} if obj is None else obj)

    def inflate(name: str, content: bytes) -> tuple[bytes, int]:
        if name.endswith("/data/0"):
            return bytes(BOMB_BYTES), zipfile.ZIP_DEFLATED
        return content, zipfile.ZIP_STORED

    return rezipped(data, inflate)


def claiming(data: bytes, unpacked: int) -> bytes:
    """The zip archive ``data`` with its last entry's sizes in the central directory (the fields torch.load's reader
    allocates by) set to ``unpacked``, the entry still stored: a directory that lies about what the file holds."""
    at = data.rfind(b"PK\x01\x02")  # the last central directory header; sizes at offsets 20 and 24
    return data[: at + 20] + struct.pack("<II", unpacked, unpacked) + data[at + 28 :]


def legacy(obj: object, *, tail: bytes = b"") -> bytes:
    """``obj`` in torch's legacy (pre-1.6) format as torch.save writes it, then ``tail``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue() + tail


def legacy_header() -> bytes:
    """The three pickles a legacy file starts with (magic number, protocol version, system info), for a file whose
    body is written by hand."""
    buffer = io.BytesIO()
    info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    for part in (MAGIC_NUMBER, PROTOCOL_VERSION, info):
        pickle.dump(part, buffer, protocol=2)
    return buffer.getvalue()


class Call:
    """Pickles as a call of ``function`` with ``args``: how a forged file makes torch.load call one of the functions its
    weights_only unpickler allows (torch's tensor rebuilders, OrderedDict) with arguments of the forger's choosing."""

    def __init__(self, function: Callable[..., object], *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.function, self.args


def never_loaded(*_args: object, **_kwargs: object) -> object:
    """A stand-in for torch.load in a test of a file that must be refused before it is loaded."""
    raise AssertionError("torch.load was called")
