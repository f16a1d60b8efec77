"""Verified before use: the card's signature, every file's sha256, and that encrypted files decrypt.

``verify_artifacts`` is the one check behind ``finetune verify DIR|URI``, ``finetune predict`` and a
job that starts from an earlier job's model (``weightsUri``): the signature (``model.json.sig``) must
exist when ``FINETUNE_REQUIRE_SIGNED=true`` (or ``require_signed``), and must verify against a trusted
public key (``FINETUNE_VERIFY_KEYS``) whenever it exists and keys are configured (without keys and
without the requirement, unsigned models are accepted anyway, so an unchecked signature is only noted);
then each file the card lists must have the sha256 the card gives, and an encrypted one must decrypt
with a key of ``FINETUNE_ENCRYPTION_KEY`` (AES-GCM authenticates every chunk, and the header names the file it was
sealed as). A whole-directory check also reports model files the card does not list (refused when signatures are
required). Every refusal is an ArtifactError naming the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from finetune_trainer import storage
from finetune_trainer.errors import ArtifactError
from finetune_trainer.model_card import CARD_FILE, ModelCard, parse_model_card, read_card_bytes
from finetune_trainer.sealing import (
    Keyring,
    SealError,
    artifact_binding,
    check_sealed,
    is_model_file,
    is_sealed,
    unseal_bytes,
)
from finetune_trainer.signing import (
    REQUIRE_SIGNED_ENV,
    SIGNATURE_FILE,
    VERIFY_KEYS_ENV,
    SignatureError,
    verify_card,
    verify_keys_from_env,
)
from finetune_trainer.signing import (
    require_signed as signed_required,
)

__all__ = ["Verified", "read_signature_file", "read_verified_file", "verify_artifacts"]

_MAX_SIGNATURE: Final = 64 << 10
"""Largest signature file read (64 KiB): one is about 200 bytes."""


@dataclass
class Verified:
    """A verified artifact directory: its card, what was checked (one line each), and the plaintext of
    the files asked for (``contents``)."""

    card: ModelCard
    checks: list[str] = field(default_factory=list)
    contents: dict[str, bytes] = field(default_factory=dict)
    signed_by: str | None = None


def read_signature_file(artifact_dir: str) -> bytes:
    """The bytes of ``artifact_dir``'s signature file; FileNotFoundError without one, ArtifactError (or an OSError)
    when it cannot be one: no more than ``_MAX_SIGNATURE`` bytes of it are read."""
    uri = storage.join(artifact_dir, SIGNATURE_FILE)
    signature = storage.read_bytes(uri, at_most=_MAX_SIGNATURE)
    if len(signature) > _MAX_SIGNATURE:
        raise ArtifactError(f"{uri}: larger than {_MAX_SIGNATURE >> 10} KiB, so not a signature file (one is about 200 bytes)")
    return signature


def _signature(artifact_dir: str, card_bytes: bytes, required: bool) -> tuple[str | None, str]:
    uri = storage.join(artifact_dir, SIGNATURE_FILE)
    try:
        signature = read_signature_file(artifact_dir)
    except FileNotFoundError:
        if required:
            raise ArtifactError(
                f"{storage.join(artifact_dir, CARD_FILE)}: unsigned (no {SIGNATURE_FILE}), and signed artifacts are "
                f"required ({REQUIRE_SIGNED_ENV}=true)"
            ) from None
        return None, f"signature: none ({CARD_FILE} is unsigned; set {REQUIRE_SIGNED_ENV}=true to refuse unsigned models)"
    except OSError as e:
        raise ArtifactError(f"{uri}: cannot read: {e}") from None
    try:
        keys = verify_keys_from_env()
        if not keys and not required:
            # Unsigned cards are accepted here, so a signature nobody can check adds nothing: say so, don't refuse.
            return (
                None,
                f"signature: {SIGNATURE_FILE} present but not checked (no {VERIFY_KEYS_ENV}; unsigned models are accepted)",
            )
        key_id = verify_card(card_bytes, signature, keys, storage.join(artifact_dir, CARD_FILE))
    except SignatureError as e:
        raise ArtifactError(str(e)) from None
    return key_id, f"signature: {CARD_FILE} signed by key id {key_id}: valid"


def verify_artifacts(
    artifact_dir: str,
    *,
    only: Iterable[str] | None = None,
    read: Iterable[str] = (),
    require_signed: bool | None = None,
    keyring: Keyring | None = None,
) -> Verified:
    """Verify ``artifact_dir`` (a path or an object-store URI): the signature, then the files of ``only``
    (all the card lists when None). The plaintext of the files in ``read`` is kept in ``contents``.
    ``require_signed`` None: as ``FINETUNE_REQUIRE_SIGNED`` says; ``keyring`` None: ``FINETUNE_ENCRYPTION_KEY``."""
    required = signed_required() if require_signed is None else require_signed
    card_bytes = read_card_bytes(artifact_dir)
    signed_by, signature_line = _signature(artifact_dir, card_bytes, required)
    card = parse_model_card(card_bytes, storage.join(artifact_dir, CARD_FILE))
    verified = Verified(card=card, checks=[signature_line], signed_by=signed_by)
    wanted = set(read)
    names = list(card.files) if only is None else list(only)
    try:
        ring = keyring if keyring is not None else Keyring.from_env()
    except SealError as e:
        raise ArtifactError(str(e)) from None
    for name in names:
        entry = card.files.get(name)
        uri = storage.join(artifact_dir, name)
        if entry is None:
            raise ArtifactError(f"{uri}: not listed in the model card, so it cannot be verified")
        try:
            data = storage.read_bytes(uri, at_most=entry.size)  # longer than listed: its sha256 cannot match
        except FileNotFoundError:
            raise ArtifactError(f"{uri}: missing; the model card lists it, so the directory is incomplete") from None
        except OSError as e:
            raise ArtifactError(f"{uri}: cannot read: {e}") from None
        actual = storage.sha256_bytes(data)
        if actual != entry.sha256:
            raise ArtifactError(
                f"{uri}: sha256 {actual[:12]}… does not match the model card's {entry.sha256[:12]}…; "
                "the file was modified, truncated or comes from another run"
            )
        stored = len(data)
        line = f"sha256 {name}: ok ({stored} bytes)"
        if entry.encryption_key_id is not None:
            try:
                # Only the files asked for are kept in the clear; the others are authenticated chunk by chunk.
                bind = artifact_binding(name)
                if name in wanted:
                    data = unseal_bytes(data, ring, uri, expect=bind)
                else:
                    check_sealed(data, ring, uri, expect=bind)
            except SealError as e:
                raise ArtifactError(str(e)) from None
            line += f"; decrypts with key id {entry.encryption_key_id}"
        if stored != entry.size:  # the bytes the card vouches for, under a size it got wrong
            raise ArtifactError(f"{uri}: {stored} bytes, but the model card lists {entry.size}; the card was edited")
        verified.checks.append(line)
        if name in wanted:
            verified.contents[name] = data
    if only is None:
        _unlisted(artifact_dir, card, verified, required)
    return verified


def _unlisted(artifact_dir: str, card: ModelCard, verified: Verified, required: bool) -> None:
    """Model files beside the card that it does not list: nothing vouches for them, so a whole-directory check says
    so (and refuses them when signatures are required); a server that loads whatever it finds would load them."""
    try:
        names = storage.file_names(artifact_dir)
    except OSError as e:
        raise ArtifactError(f"{artifact_dir}: cannot list: {e}") from None
    extra = [n for n in names if is_model_file(n) and n not in card.files]
    if extra and required:
        raise ArtifactError(
            f"{storage.join(artifact_dir, extra[0])}: a model file the model card does not list ({len(extra)} such: "
            f"{', '.join(extra)}), and signed artifacts are required ({REQUIRE_SIGNED_ENV}=true); remove them"
        )
    verified.checks.extend(f"unlisted: {name} is not in the model card (not verified; do not load it)" for name in extra)


def read_verified_file(uri: str, *, require_signed: bool | None = None) -> bytes:
    """The plaintext of one model file named by URI (``weightsUri``: an earlier job's ``model.pt``).

    When a card beside it lists it, the file is verified through that card (``verify_artifacts``); a file
    no card lists is read as it is (decrypted when sealed, which authenticates it), unless signed
    artifacts are required, when it is refused. FileNotFoundError when the file does not exist.
    """
    required = signed_required() if require_signed is None else require_signed
    directory, name = storage.parent(uri), uri.rstrip("/").rpartition("/")[2]
    try:
        card = parse_model_card(read_card_bytes(directory), storage.join(directory, CARD_FILE))
    except ArtifactError:
        card = None  # no card (or not one): a bare state_dict file
    if card is not None and name in card.files:
        return verify_artifacts(directory, only=[name], read=[name], require_signed=required).contents[name]
    if required:
        raise ArtifactError(
            f"{uri}: no model card beside it lists this file, so it cannot be verified, and signed artifacts are "
            f"required ({REQUIRE_SIGNED_ENV}=true)"
        )
    data = storage.read_bytes(uri)
    if is_sealed(data):
        try:
            data = unseal_bytes(data, Keyring.from_env(), uri, expect=artifact_binding(name))
        except SealError as e:
            raise ArtifactError(str(e)) from None
    return data
