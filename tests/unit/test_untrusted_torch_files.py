"""torch.save files read back from where someone else can write (a checkpoint, a weightsUri file, an unsigned
model.pt): a zip archive that would inflate in torch.load is refused before torch.load sees it, at each place that
loads one (``storage.check_torch_archive``)."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from finetune_trainer import storage
from finetune_trainer.checkpoint import CHECKPOINT_FILE, CHECKSUM_FILE, CorruptCheckpoint, read_checkpoint
from finetune_trainer.errors import WeightsError
from finetune_trainer.model import load_state_dict_file
from tests.support.torch_files import BOMB_BYTES, bomb, claiming, legacy, never_loaded, rezipped, saved

FP = "fp-1"
STATE = {"weight": torch.arange(6.0)}
_ACCEPTED = "accepted: torch.save's own archive, its entries stored uncompressed, adding up to no more than the file"


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
