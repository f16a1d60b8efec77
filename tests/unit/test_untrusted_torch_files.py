"""torch.save files read back from where someone else can write (a checkpoint, a weightsUri file, an unsigned
model.pt): a zip archive that would inflate in torch.load is refused before torch.load sees it, at each place that
loads one (``storage.check_torch_archive``); and ``read_checkpoint`` calls corrupt only what a damaged file makes
torch.load raise, so that a MemoryError or a bug stops the run instead of falling back to an older checkpoint."""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import random
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._utils import _rebuild_parameter

from finetune_trainer import storage
from finetune_trainer.checkpoint import CHECKPOINT_FILE, CHECKSUM_FILE, CorruptCheckpoint, TrainState, read_checkpoint
from finetune_trainer.errors import WeightsError
from finetune_trainer.model import load_state_dict_file
from tests.support.checkpoints import save_checkpoint
from tests.support.torch_files import BOMB_BYTES, Call, bomb, claiming, legacy, legacy_header, never_loaded, rezipped, saved

FP = "fp-1"
STATE = {"weight": torch.arange(6.0)}
_ACCEPTED = "accepted: torch.save's own archive, its entries stored uncompressed, adding up to no more than the file"


def other_members() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    return buffer.getvalue()


def deflated(data: bytes) -> bytes:
    return rezipped(data, lambda _name, content: (content, zipfile.ZIP_DEFLATED))


# ------------------------------------------------------------------------------- the archive check
@pytest.mark.parametrize(
    ("make", "refusal"),
    [
        (lambda: saved(STATE), None),
        (lambda: legacy(STATE), None),  # a plain pickle: nothing in it is compressed
        (lambda: b"not a zip archive\n", None),  # torch.load's to judge
        (lambda: bomb(), rf"a zip archive with a compressed entry \('archive/data/0': \d+ bytes unpacking to {BOMB_BYTES}\)"),
        # torch.save's own archive with its entries deflated: as big unpacked as it was, refused all the same.
        (
            lambda: deflated(saved(STATE)),
            r"a zip archive with a compressed entry \('archive/data\.pkl': \d+ bytes unpacking to \d+\)",
        ),
        (lambda: claiming(saved(STATE), 10**9), r"a zip archive whose entries add up to \d{10} bytes, more than its own \d+"),
        (
            lambda: saved(STATE)[:-30],
            r"a zip archive whose directory cannot be read \(truncated or damaged: BadZipFile: File is not a zip file\)",
        ),
    ],
    ids=["torch.save", "legacy", "text", "bomb", "deflated", "lying-directory", "truncated"],
)
def test_an_archive_that_would_inflate_is_refused_unread(make: Callable[[], bytes], refusal: str | None) -> None:
    stream = io.BytesIO(make())
    if refusal is None:
        storage.check_torch_archive(stream)
        assert stream.tell() == 0  # torch.load reads on from where the check leaves it
        return
    with pytest.raises(storage.UnsafeArchive, match=rf"^{refusal}; {re.escape(_ACCEPTED)}$"):
        storage.check_torch_archive(stream)


def write(directory: Path, data: bytes) -> None:
    """``data`` as the checkpoint file, with its checksum: a forger writes both."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CHECKPOINT_FILE).write_bytes(data)
    (directory / CHECKSUM_FILE).write_text(hashlib.sha256(data).hexdigest() + "\n")


@pytest.mark.parametrize(
    ("read", "error", "message"),
    [
        (
            lambda path: read_checkpoint(path.parent, FP, "runs/x"),
            CorruptCheckpoint,
            r"^checkpoint ckpt: checkpoint\.pt is a zip archive with a compressed entry \('archive/data/0'",
        ),
        # No card beside it: a bare state_dict file, which nothing vouches for.
        (
            lambda path: load_state_dict_file(str(path)),
            WeightsError,
            r"^weights_uri {path}: a zip archive with a compressed entry \('archive/data/0'",
        ),
    ],
    ids=["checkpoint", "weights_uri"],
)
def test_each_load_of_a_file_from_outside_refuses_a_bomb_before_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read: Callable[[Path], object], error: type[Exception], message: str
) -> None:
    """``finetune predict``'s model.pt: test_predict."""
    path = tmp_path / "ckpt" / CHECKPOINT_FILE
    write(path.parent, bomb())
    monkeypatch.setattr(torch, "load", never_loaded)
    with pytest.raises(error, match=message.format(path=re.escape(str(path)))) as raised:
        read(path)
    assert re.search(rf"; {re.escape(_ACCEPTED)}$", str(raised.value))


# ------------------------------------------------------------------- what read_checkpoint calls corrupt
class Stranger:
    """A class of this test module: a weights_only unpickler refuses to import it."""


def in_archive(pickled: bytes) -> bytes:
    """A torch.save archive whose ``data.pkl`` (the pickle torch.load reads first) is ``pickled``."""
    return rezipped(saved(STATE), lambda name, content: (pickled if name.endswith("/data.pkl") else content, 0))


@pytest.mark.parametrize(
    ("make", "raised"),
    [
        (lambda: in_archive(random.Random(0).randbytes(4096)), "UnpicklingError"),
        (lambda: in_archive(b""), "EOFError"),
        (lambda: in_archive(b"hello\n"), "KeyError"),  # 'h' reads the pickle memo, which is empty
        (lambda: in_archive(b"root:x:0:0:root:/root:/bin/bash\n"), "IndexError"),
        (lambda: in_archive(pickle.dumps(Stranger())), "UnpicklingError"),
        (lambda: in_archive(b"\x80\x02X\x01"), "error: unpack requires a buffer of 4 bytes"),  # struct.error
        (lambda: in_archive(b"\x80\x02X\x02\x00\x00\x00\xff\xfe."), "UnicodeDecodeError"),
        (other_members, r"RuntimeError: \[enforce fail at inline_container\.cc:\d+\] \. file in archive is not in a subdir"),
        (lambda: rezipped(saved(STATE), lambda n, c: (b"middle" if n.endswith("byteorder") else c, 0)), "ValueError"),
        (lambda: saved({"x": Call(collections.OrderedDict, 5)}), "TypeError"),
        (lambda: saved({"x": Call(_rebuild_parameter, 5, True, collections.OrderedDict())}), "AttributeError"),
    ],
    ids=[
        "random-bytes",
        "empty",
        "text",
        "passwd",
        "pickle-of-a-class",
        "cut-pickle",
        "bad-utf8",
        "zip-of-other-members",
        "zip-byteorder",
        "forged-ordereddict",
        "forged-parameter",
    ],
)
@pytest.mark.timeout(30)
def test_what_a_damaged_file_makes_torch_load_raise_is_corrupt(tmp_path: Path, make: Callable[[], bytes], raised: str) -> None:
    write(tmp_path / "ckpt", make())
    with pytest.raises(CorruptCheckpoint, match=rf"^checkpoint ckpt: checkpoint\.pt is unreadable: {raised}") as info:
        read_checkpoint(tmp_path / "ckpt", FP, "runs/x")
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "make",
    [
        lambda: random.Random(0).randbytes(4096),
        lambda: b"",
        lambda: b"root:x:0:0:root:/root:/bin/bash\n",
        lambda: pickle.dumps(STATE),
        lambda: legacy(STATE),  # torch's legacy format: the trainer never writes it
        lambda: legacy(STATE)[:-5],
        lambda: legacy_header() + pickle.dumps({}, protocol=2) + pickle.dumps(["k"], protocol=2),
    ],
    ids=["random-bytes", "empty", "passwd", "plain-pickle", "legacy", "legacy-truncated", "legacy-missing-storage"],
)
def test_a_checkpoint_that_is_no_archive_is_refused_before_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[], bytes]
) -> None:
    """The trainer writes checkpoints as torch.save's archive only; torch's legacy reader of a forged file allocates
    whatever storage size it claims, so anything else is corrupt, unread."""
    write(tmp_path / "ckpt", make())
    monkeypatch.setattr(torch, "load", never_loaded)
    with pytest.raises(CorruptCheckpoint, match=r"^checkpoint ckpt: checkpoint\.pt is not a zip archive ") as info:
        read_checkpoint(tmp_path / "ckpt", FP, "runs/x")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        # c10's CPU allocator: memory, not the file (torch.save's archive allocates no more than the file holds).
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate"),
        torch.OutOfMemoryError("CUDA out of memory"),
        NameError("name 'x' is not defined"),  # a bug
    ],
    ids=type,
)
def test_what_is_no_damage_stops_the_run_instead_of_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    save_checkpoint(tmp_path / "ckpt", nn.Linear(4, 3), TrainState(epoch=1), FP)

    def load(*_args: object, **_kwargs: object) -> object:
        raise error

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(type(error)) as raised:
        read_checkpoint(tmp_path / "ckpt", FP, "runs/x")
    assert raised.value is error
