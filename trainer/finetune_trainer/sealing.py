"""Client-side encryption at rest: AES-256-GCM streams ("sealed" files) and the keyring they use.

A sealed file is::

    MAGIC (8 bytes) | header length (4, big-endian) | header (JSON: format, algorithm, keyId, chunk size,
    nonce prefix) | chunk 0 | chunk 1 | ... | final chunk

Each chunk is the AES-256-GCM ciphertext of at most ``chunk`` plaintext bytes plus its 16-byte tag. A
chunk's nonce is the file's random 8-byte prefix followed by the chunk index (4 bytes), and its
associated data binds the whole header, the index and a final flag: a chunk moved, dropped, duplicated,
a file cut at a chunk boundary, or a header edited (key id swapped) all fail authentication. Every file
ends with a final chunk shorter than ``chunk`` (possibly empty), so the reader knows where it ends
without trusting a length field. Sealing and ``unseal_file`` go a chunk at a time (a model of many GiB is
never in memory whole); ``unseal_bytes`` holds the ciphertext and the plaintext together, and
``check_sealed`` authenticates every chunk of a sealed file in memory without keeping the plaintext.

The header also names what the file is (``bind``: e.g. ``checkpoint checkpoint_epoch_0005/checkpoint.pt``
or ``artifact model.pt``), so it is authenticated with every chunk; a reader that passes ``expect`` refuses
a file sealed as something else: an older checkpoint copied over a newer one, or one model file over another.

The key comes from ``FINETUNE_ENCRYPTION_KEY`` (a Kubernetes Secret through ``runtime.envFrom``):
either one base64 key of 32 bytes, whose id is ``sha256(key)[:16]`` in hex, or a keyring
``id1:key1,id2:key2``. The first key encrypts; every key decrypts the files whose header names its id,
so a rotation adds the new key first and keeps the old ones until nothing sealed with them is read.
Keys never appear in messages or reprs, only their ids; entries are named by position.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from finetune_operator.api.protection import ENV_ENCRYPTION_KEY
from finetune_trainer.errors import TrainerError

__all__ = [
    "ENCRYPTION_KEY_ENV",
    "MAGIC",
    "MODEL_SUFFIXES",
    "Keyring",
    "SealError",
    "artifact_binding",
    "check_sealed",
    "is_model_file",
    "is_sealed",
    "is_sealed_file",
    "seal_file",
    "sealed_key_id",
    "unseal_bytes",
    "unseal_file",
]

ENCRYPTION_KEY_ENV: Final = ENV_ENCRYPTION_KEY
MAGIC: Final = b"FTSEAL1\n"
_ALGORITHM: Final = "AES-256-GCM"
_CHUNK: Final = 1 << 20
_TAG: Final = 16
_MAX_HEADER: Final = 4096
_MAX_CHUNK: Final = 64 << 20
# Short ids: a base64 key (44 characters, '+', '/', '=') can never pass for one and be quoted as an id.
_KEY_ID: Final = re.compile(r"^[A-Za-z0-9._-]{1,40}$")
_KEY_ID_HELP: Final = "1 to 40 letters, digits, '.', '_' or '-'"


MODEL_SUFFIXES: Final = (".pt", ".pth", ".onnx", ".safetensors", ".bin", ".ckpt")
"""Files holding weights: these are encrypted (``protect``) and must be listed by the card (``verify``). Reports,
plots and the card stay readable (the card's class names and metrics are what a catalogue shows; the weights are
the knowledge to protect)."""


def is_model_file(name: str) -> bool:
    return name.endswith(MODEL_SUFFIXES)


class SealError(TrainerError):
    """A sealed file that cannot be opened: no key, wrong key, altered or truncated (one line)."""


def _key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SealError(f"{where}: not base64; expected 32 random bytes in base64 (e.g. `openssl rand -base64 32`)") from None
    if len(key) != 32:
        raise SealError(f"{where}: {len(key)} bytes; AES-256 needs 32 (e.g. `openssl rand -base64 32`)")
    return key


@dataclass(frozen=True, repr=False)
class Keyring:
    """Encryption keys by id; ``current`` is the id that new files are sealed with."""

    keys: Mapping[str, bytes]
    current: str

    def __repr__(self) -> str:
        # Never the key bytes (tracebacks with locals, debug logs): the ids say which keys are held.
        return f"Keyring(current={self.current!r}, ids={list(self.keys)!r})"

    @classmethod
    def parse(cls, text: str, source: str = ENCRYPTION_KEY_ENV) -> Keyring:
        """``KEY`` (base64) or ``id1:KEY1,id2:KEY2``; SealError naming the entry by position (never the key, nor
        a would-be id, which may be a key written in the wrong order) otherwise."""
        keys: dict[str, bytes] = {}
        entries = [e.strip() for e in text.split(",") if e.strip()]
        if not entries:
            raise SealError(f"{source}: empty; expected a base64 key of 32 bytes or id1:key1,id2:key2")
        for index, entry in enumerate(entries):
            key_id, sep, encoded = entry.partition(":")
            if not sep:
                key_id, encoded = "", entry
            where = f"{source} entry {index + 1}"
            key_id = key_id.strip()
            if sep and not _KEY_ID.match(key_id):
                raise SealError(f"{where}: the key id (before ':') is not {_KEY_ID_HELP}; write id:key, the id first")
            key = _decode_key(encoded, where)
            key_id = key_id or _key_id(key)
            if key_id in keys:
                raise SealError(f"{where}: its key id is already used by an earlier entry; give each key its own id")
            keys[key_id] = key
        return cls(keys=keys, current=next(iter(keys)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring | None:
        """The keyring in ``FINETUNE_ENCRYPTION_KEY``, or None when it is unset or empty."""
        text = (os.environ if environ is None else environ).get(ENCRYPTION_KEY_ENV, "")
        return cls.parse(text) if text.strip() else None

    def key_for(self, key_id: str, name: str) -> bytes:
        key = self.keys.get(key_id)
        if key is None:
            raise SealError(
                f"{name}: encrypted with key id {key_id!r}, which {ENCRYPTION_KEY_ENV} does not hold "
                f"(it holds {', '.join(map(repr, self.keys))}); add that key to the keyring"
            )
        return key


def artifact_binding(name: str) -> str:
    """What a sealed model file says it is (``bind``): its name in the run directory."""
    return f"artifact {name}"


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">I?", index, final)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def is_sealed(head: bytes) -> bool:
    """Whether bytes (at least the first 8 of a file) start a sealed file."""
    return head[: len(MAGIC)] == MAGIC


def is_sealed_file(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return is_sealed(f.read(len(MAGIC)))


def seal_file(src: str | Path, dst: str | Path, keyring: Keyring, *, bind: str, chunk: int = _CHUNK) -> None:
    """Encrypt the file ``src`` into ``dst`` (a different path) with the keyring's current key; ``bind`` names
    what the file is (authenticated in the header; readers check it with ``expect``)."""
    key_id = keyring.current
    prefix = os.urandom(8)
    header = json.dumps(
        {"format": 1, "algorithm": _ALGORITHM, "keyId": key_id, "chunk": chunk, "noncePrefix": prefix.hex(), "bind": bind},
        sort_keys=True,
    ).encode()
    aead = AESGCM(keyring.keys[key_id])
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(MAGIC + struct.pack(">I", len(header)) + header)
        index = 0
        block = fin.read(chunk)
        while True:
            # A full block is final only when nothing follows it; peeking keeps the final chunk short.
            following = fin.read(chunk) if len(block) == chunk else b""
            final = len(block) < chunk
            fout.write(aead.encrypt(_nonce(prefix, index), block, _aad(header, index, final)))
            if final:
                return
            index += 1
            block = following


def _read_header(f: IO[bytes], name: str) -> tuple[bytes, dict[str, object]]:
    if not is_sealed(f.read(len(MAGIC))):
        raise SealError(f"{name}: not an encrypted file (no {MAGIC[:-1].decode()} header)")
    raw_length = f.read(4)
    length = struct.unpack(">I", raw_length)[0] if len(raw_length) == 4 else -1
    header = f.read(length) if 0 < length <= _MAX_HEADER else b""
    try:
        fields = json.loads(header) if len(header) == length else None
    except ValueError:
        fields = None
    if not isinstance(fields, dict) or fields.get("algorithm") != _ALGORITHM:
        raise SealError(f"{name}: damaged encryption header")
    return header, fields


def sealed_key_id(path: str | Path) -> str:
    """The key id a sealed file names in its header."""
    with open(path, "rb") as f:
        return str(_read_header(f, Path(path).name)[1].get("keyId"))


def _chunks(f: IO[bytes], keyring: Keyring | None, name: str, expect: str | None) -> Iterator[bytes]:
    header, fields = _read_header(f, name)
    key_id, chunk, prefix = fields.get("keyId"), fields.get("chunk"), fields.get("noncePrefix")
    if not isinstance(key_id, str) or not isinstance(chunk, int) or not 0 < chunk <= _MAX_CHUNK or not isinstance(prefix, str):
        raise SealError(f"{name}: damaged encryption header")
    if keyring is None:
        raise SealError(
            f"{name}: encrypted with key id {key_id!r}, but {ENCRYPTION_KEY_ENV} is not set; give the job "
            "the Secret that holds the key (runtime.envFrom)"
        )
    aead = AESGCM(keyring.key_for(key_id, name))
    # Checked before any chunk: the header is authenticated with the first chunk, which must still decrypt below.
    bound = fields.get("bind")
    if expect is not None and bound != expect:
        raise SealError(
            f"{name}: sealed as {bound!r}, not {expect!r}; another file was copied over this one (an older checkpoint, "
            "another model file)"
        )
    index = 0
    while True:
        block = f.read(chunk + _TAG)
        final = len(block) < chunk + _TAG
        try:
            yield aead.decrypt(_nonce(bytes.fromhex(prefix), index), block, _aad(header, index, final))
        except (InvalidTag, ValueError):
            raise SealError(
                f"{name}: chunk {index} does not decrypt with key id {key_id!r}: wrong key for that id, "
                "or the file was altered, truncated or reordered"
            ) from None
        if final:
            if f.read(1):
                raise SealError(f"{name}: data after the final chunk; the file was altered")
            return
        index += 1


def unseal_file(src: str | Path, dst: str | Path, keyring: Keyring | None, *, expect: str | None = None) -> None:
    """Decrypt the sealed file ``src`` into ``dst``, verifying every chunk (and ``expect``; SealError otherwise)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for block in _chunks(fin, keyring, Path(src).name, expect):
            fout.write(block)


def unseal_bytes(data: bytes, keyring: Keyring | None, name: str, *, expect: str | None = None) -> bytes:
    """The plaintext of a sealed file held in memory (``name`` for messages; ``expect``: what it must be sealed as).
    Holds the ciphertext and the plaintext at once: for files that must be loaded anyway."""
    return b"".join(_chunks(io.BytesIO(data), keyring, name, expect))


def check_sealed(data: bytes, keyring: Keyring | None, name: str, *, expect: str | None = None) -> int:
    """Authenticate every chunk of a sealed file held in memory without keeping the plaintext; its length."""
    return sum(len(block) for block in _chunks(io.BytesIO(data), keyring, name, expect))
