"""Client-side encryption (``sealing``): AES-256-GCM streams round-trip at every size, and any cut,
reordering, edit, wrong or missing key is one line naming the file, never a traceback or wrong bytes."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import pytest

from finetune_trainer.sealing import (
    MAGIC,
    Keyring,
    SealError,
    check_sealed,
    is_sealed_file,
    seal_file,
    sealed_key_id,
    unseal_bytes,
    unseal_file,
)

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(1, 33))).decode()
CHUNK = 16


def sealed(tmp_path: Path, plain: bytes, ring: Keyring, chunk: int = CHUNK) -> bytes:
    (tmp_path / "plain").write_bytes(plain)
    seal_file(tmp_path / "plain", tmp_path / "sealed", ring, bind="artifact plain", chunk=chunk)
    return (tmp_path / "sealed").read_bytes()


def split(data: bytes) -> tuple[bytes, list[bytes]]:
    """(magic + header, chunks) of a sealed file written with CHUNK."""
    (length,) = struct.unpack(">I", data[8:12])
    head, body = data[: 12 + length], data[12 + length :]
    size = CHUNK + 16
    return head, [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 7])
def test_round_trip_at_every_size(tmp_path: Path, size: int) -> None:
    ring = Keyring.parse(KEY_A)
    plain = bytes((i * 7) % 256 for i in range(size))
    data = sealed(tmp_path, plain, ring)
    assert data.startswith(MAGIC) and is_sealed_file(tmp_path / "sealed")
    assert size < CHUNK or plain[:CHUNK] not in data  # no clear chunk in the file
    assert unseal_bytes(data, ring, "f") == plain
    unseal_file(tmp_path / "sealed", tmp_path / "back", ring)
    assert (tmp_path / "back").read_bytes() == plain


def tamper_cases() -> list[tuple[str, object]]:
    def cut_at_boundary(head: bytes, chunks: list[bytes]) -> bytes:
        return head + b"".join(chunks[:-1])

    def drop_middle(head: bytes, chunks: list[bytes]) -> bytes:
        return head + chunks[0] + b"".join(chunks[2:])

    def swap(head: bytes, chunks: list[bytes]) -> bytes:
        return head + chunks[1] + chunks[0] + b"".join(chunks[2:])

    def flip(head: bytes, chunks: list[bytes]) -> bytes:
        body = bytearray(b"".join(chunks))
        body[CHUNK + 3] ^= 1
        return head + bytes(body)

    def appended(head: bytes, chunks: list[bytes]) -> bytes:
        return head + b"".join(chunks) + chunks[0]

    def cut_mid_chunk(head: bytes, chunks: list[bytes]) -> bytes:
        return head + b"".join(chunks)[:-5]

    return [
        ("cut", cut_at_boundary),
        ("drop", drop_middle),
        ("swap", swap),
        ("flip", flip),
        ("append", appended),
        ("cut-mid", cut_mid_chunk),
    ]


@pytest.mark.parametrize(("name", "tamper"), tamper_cases())
def test_truncation_reordering_and_edits_are_detected(tmp_path: Path, name: str, tamper: object) -> None:
    ring = Keyring.parse(KEY_A)
    head, chunks = split(sealed(tmp_path, bytes(4 * CHUNK + 5), ring))
    assert len(chunks) == 5
    bad = tamper(head, chunks)  # type: ignore[operator]
    with pytest.raises(SealError, match=r"^model\.pt: ") as info:
        unseal_bytes(bad, ring, "model.pt")
    assert "\n" not in str(info.value)


def test_header_edit_is_detected(tmp_path: Path) -> None:
    """The header is authenticated: changing the chunk size it declares (or anything else in it) fails."""
    ring = Keyring.parse(KEY_A)
    data = sealed(tmp_path, bytes(3 * CHUNK), ring)
    edited = data.replace(b'"chunk": 16', b'"chunk": 17')
    assert edited != data
    with pytest.raises(SealError, match="does not decrypt"):
        unseal_bytes(edited, ring, "f")


def test_wrong_key_for_the_id_and_missing_key(tmp_path: Path) -> None:
    data = sealed(tmp_path, b"weights" * 10, Keyring.parse(f"prod:{KEY_A}"))
    with pytest.raises(SealError, match=r"^f: chunk 0 does not decrypt with key id 'prod': wrong key"):
        unseal_bytes(data, Keyring.parse(f"prod:{KEY_B}"), "f")
    holds = r"^f: encrypted with key id 'prod', which FINETUNE_ENCRYPTION_KEY does not hold \(it holds 'other'\)"
    with pytest.raises(SealError, match=holds):
        unseal_bytes(data, Keyring.parse(f"other:{KEY_A}"), "f")
    with pytest.raises(SealError, match=r"^f: encrypted with key id 'prod', but FINETUNE_ENCRYPTION_KEY is not set"):
        unseal_bytes(data, None, "f")


def test_rotation_new_key_encrypts_old_key_still_decrypts(tmp_path: Path) -> None:
    old = sealed(tmp_path, b"old model", Keyring.parse(f"2025:{KEY_A}"))
    rotated = Keyring.parse(f"2026:{KEY_B},2025:{KEY_A}")
    assert rotated.current == "2026"
    assert unseal_bytes(old, rotated, "f") == b"old model"
    new = sealed(tmp_path, b"new model", rotated)
    assert sealed_key_id(tmp_path / "sealed") == "2026"
    assert unseal_bytes(new, Keyring.parse(f"2026:{KEY_B}"), "f") == b"new model"


def test_bare_key_gets_an_id_from_its_hash() -> None:
    ring = Keyring.parse(KEY_A)
    assert list(ring.keys) == [ring.current] and len(ring.current) == 16


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "FINETUNE_ENCRYPTION_KEY: empty; expected a base64 key of 32 bytes"),
        ("not base64!", "FINETUNE_ENCRYPTION_KEY entry 1: not base64"),
        (base64.b64encode(b"short").decode(), "FINETUNE_ENCRYPTION_KEY entry 1: 5 bytes; AES-256 needs 32"),
        (f"a:{KEY_A},b:{KEY_A[:-4]}", "FINETUNE_ENCRYPTION_KEY entry 2: "),
        (f"a:{KEY_A},a:{KEY_B}", "entry 2: its key id is already used by an earlier entry"),
    ],
)
def test_bad_keyrings_are_one_line_without_the_key(text: str, message: str) -> None:
    with pytest.raises(SealError) as info:
        Keyring.parse(text)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert KEY_A not in str(info.value) and KEY_B not in str(info.value)


def test_not_a_sealed_file(tmp_path: Path) -> None:
    with pytest.raises(SealError, match="not an encrypted file"):
        unseal_bytes(b"PK\x03\x04 a zip", Keyring.parse(KEY_A), "model.pt")


@pytest.mark.parametrize(
    "text",
    [f"{KEY_A}:k1", f"{KEY_A}:", f"k1:{KEY_B},{KEY_A}:k2", f"{KEY_A}:{KEY_B}"],
    ids=["reversed", "colon", "second-reversed", "key-as-id"],
)
def test_a_malformed_keyring_entry_is_named_by_position_never_by_its_text(text: str) -> None:
    """Written KEY:id, the key lands where the id goes: quoting the 'id' would put the key in the job's status."""
    with pytest.raises(SealError) as info:
        Keyring.parse(text)
    assert "entry " in str(info.value) and KEY_A not in str(info.value) and KEY_B not in str(info.value)


def test_keyring_repr_shows_only_key_ids() -> None:
    ring = Keyring.parse(f"new:{KEY_A},old:{KEY_B}")
    assert repr(ring) == "Keyring(current='new', ids=['new', 'old'])"


def test_a_file_sealed_as_something_else_is_refused(tmp_path: Path) -> None:
    """The header binds what the file is (``bind``): model.onnx copied over model.pt decrypts, yet is refused."""
    ring = Keyring.parse(KEY_A)
    (tmp_path / "plain").write_bytes(b"onnx bytes")
    seal_file(tmp_path / "plain", tmp_path / "sealed", ring, bind="artifact model.onnx")
    data = (tmp_path / "sealed").read_bytes()
    assert unseal_bytes(data, ring, "model.onnx", expect="artifact model.onnx") == b"onnx bytes"
    with pytest.raises(SealError, match=r"^model.pt: sealed as 'artifact model.onnx', not 'artifact model.pt'; "):
        unseal_bytes(data, ring, "model.pt", expect="artifact model.pt")
    with pytest.raises(SealError, match="sealed as"):
        check_sealed(data, ring, "model.pt", expect="artifact model.pt")
    assert check_sealed(data, ring, "model.onnx", expect="artifact model.onnx") == len(b"onnx bytes")
