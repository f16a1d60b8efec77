"""Signed model cards: Ed25519 over the exact bytes of ``model.json``, in ``model.json.sig`` beside it.

The card lists every artifact file with its sha256 (of the bytes as stored, encrypted or not), so one
signature covers the card and, through the sums, every file: whoever can write the bucket but does not
hold the private key can replace neither a file nor the card without ``verify`` noticing.

Keys (Kubernetes Secrets and ConfigMaps, as environment variables):

* ``FINETUNE_SIGNING_KEY``: the private key that signs, a PEM (``openssl genpkey -algorithm ed25519``)
  or the 32-byte raw key in base64. Only training jobs hold it.
* ``FINETUNE_VERIFY_KEYS``: the public keys accepted, PEM blocks or base64 raw keys separated by commas;
  several are accepted so that a signing key can be rotated.
* ``FINETUNE_REQUIRE_SIGNED=true``: refuse unsigned artifacts (predict, weightsUri, verify).

A key's id is the first 16 hex digits of the sha256 of its raw public key; the signature file names it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from finetune_operator.api.protection import ENV_REQUIRE_SIGNED, ENV_SIGNING_KEY, ENV_VERIFY_KEYS
from finetune_trainer.errors import TrainerError

__all__ = [
    "REQUIRE_SIGNED_ENV",
    "SIGNATURE_FILE",
    "SIGNING_KEY_ENV",
    "VERIFY_KEYS_ENV",
    "SignatureError",
    "public_key_id",
    "require_signed",
    "sign_card",
    "signing_key_from_env",
    "verify_card",
    "verify_keys_from_env",
]

SIGNATURE_FILE: Final = "model.json.sig"
SIGNING_KEY_ENV: Final = ENV_SIGNING_KEY
VERIFY_KEYS_ENV: Final = ENV_VERIFY_KEYS
REQUIRE_SIGNED_ENV: Final = ENV_REQUIRE_SIGNED
_ALGORITHM: Final = "Ed25519"
_PEM: Final = re.compile(r"-----BEGIN [A-Z ]+-----.+?-----END [A-Z ]+-----", re.S)


class SignatureError(TrainerError):
    """A key that does not parse, or a card whose signature is missing or wrong (one line)."""


def public_key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _raw(text: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{where}: neither a PEM key nor base64; expected an Ed25519 key") from None
    if len(raw) != 32:
        raise SignatureError(f"{where}: {len(raw)} bytes; an Ed25519 raw key has 32")
    return raw


def signing_key_from_env(environ: Mapping[str, str] | None = None) -> Ed25519PrivateKey | None:
    """The private key in ``FINETUNE_SIGNING_KEY``; None when unset."""
    text = (os.environ if environ is None else environ).get(SIGNING_KEY_ENV, "").strip()
    if not text:
        return None
    if "-----BEGIN" in text:
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError):
            raise SignatureError(f"{SIGNING_KEY_ENV}: not a readable unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError(f"{SIGNING_KEY_ENV}: a {type(key).__name__}; expected an Ed25519 private key")
        return key
    return Ed25519PrivateKey.from_private_bytes(_raw(text, SIGNING_KEY_ENV))


def parse_verify_keys(text: str, source: str = VERIFY_KEYS_ENV) -> dict[str, Ed25519PublicKey]:
    """Public keys by id from PEM blocks and/or comma-separated base64 raw keys."""
    keys: list[Ed25519PublicKey] = []
    for index, block in enumerate(_PEM.findall(text)):
        try:
            key = serialization.load_pem_public_key(block.encode())
        except ValueError:
            raise SignatureError(f"{source}: PEM block {index + 1} is not a readable public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"{source}: PEM block {index + 1} is a {type(key).__name__}; expected Ed25519")
        keys.append(key)
    rest = _PEM.sub("", text)
    for index, entry in enumerate(e.strip() for e in rest.split(",")):
        if entry:
            keys.append(Ed25519PublicKey.from_public_bytes(_raw(entry, f"{source} entry {index + 1}")))
    return {public_key_id(k): k for k in keys}


def verify_keys_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Ed25519PublicKey]:
    return parse_verify_keys((os.environ if environ is None else environ).get(VERIFY_KEYS_ENV, ""))


def require_signed(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``FINETUNE_REQUIRE_SIGNED`` asks for signed artifacts (true/1/yes)."""
    value = (os.environ if environ is None else environ).get(REQUIRE_SIGNED_ENV, "").strip().lower()
    return value in ("true", "1", "yes")


def sign_card(card: bytes, key: Ed25519PrivateKey) -> bytes:
    """The content of ``model.json.sig`` for the card's exact bytes."""
    signature = base64.b64encode(key.sign(card)).decode()
    record = {"algorithm": _ALGORITHM, "keyId": public_key_id(key.public_key()), "signature": signature}
    return (json.dumps(record, indent=2) + "\n").encode()


def verify_card(card: bytes, signature_file: bytes, keys: Mapping[str, Ed25519PublicKey], name: str) -> str:
    """The key id whose signature of ``card`` is in ``signature_file``; SignatureError naming ``name`` otherwise."""
    try:
        record = json.loads(signature_file)
        key_id, signature = str(record["keyId"]), base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise SignatureError(f"{name}: not a signature file") from None
    if not keys:
        raise SignatureError(f"{name}: signed by key id {key_id!r}, but no public key is configured ({VERIFY_KEYS_ENV})")
    key = keys.get(key_id)
    if key is None:
        raise SignatureError(
            f"{name}: signed by key id {key_id!r}, which is not among the trusted keys ({', '.join(map(repr, keys))})"
        )
    try:
        key.verify(signature, card)
    except InvalidSignature:
        raise SignatureError(f"{name}: the signature does not match the card; the card was edited after signing") from None
    return key_id
