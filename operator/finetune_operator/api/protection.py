"""Protecting the model: ``spec.output.encryption``, ``spec.output.sign`` and ``status.artifacts.protection``.

The keys never appear here: the encryption key, the signing key and the trusted public keys reach the
trainer as environment variables from Secrets (``runtime.envFrom``) or from the operator's settings;
the spec only says what must be done, the status what was done and with which key ids
(docs/platform.md, "Protecting the model").
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field, model_validator

from finetune_operator.api.base import WireModel
from finetune_operator.api.fields import fail

__all__ = [
    "ENV_ENCRYPTION_KEY",
    "ENV_REQUIRE_SIGNED",
    "ENV_SIGNING_KEY",
    "ENV_VERIFY_KEYS",
    "ArtifactProtection",
    "EncryptionSpec",
    "ServerSideEncryption",
]

# The trainer's key variables: the operator sets the last two in every trainer pod (after the user's, so they win).
ENV_ENCRYPTION_KEY: Final = "FINETUNE_ENCRYPTION_KEY"
"""Base64 AES-256 key, or a keyring ``id1:key1,id2:key2`` (the first encrypts); from a Secret."""
ENV_SIGNING_KEY: Final = "FINETUNE_SIGNING_KEY"
"""Ed25519 private key (PEM, or base64 of the 32 raw bytes) that signs model cards; from a Secret."""
ENV_VERIFY_KEYS: Final = "FINETUNE_VERIFY_KEYS"
"""Trusted Ed25519 public keys (PEM blocks or base64 raw keys, comma-separated)."""
ENV_REQUIRE_SIGNED: Final = "FINETUNE_REQUIRE_SIGNED"
"""``true``: refuse models whose card is unsigned (predict, verify, weightsUri)."""

KmsKey = Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^[^\s]+$")]


class ServerSideEncryption(WireModel):
    """Encryption by the object store itself, with a key the store's KMS holds."""

    kms_key: KmsKey
    """The KMS key: on s3:// an AWS KMS key id, ARN or alias (the objects are written with `SSE-KMS`); on gs:// a Cloud KMS
    key name `projects/P/locations/L/keyRings/R/cryptoKeys/K` (customer-managed encryption key). Needs an s3:// or gs://
    output.uri."""


class EncryptionSpec(WireModel):
    """Encryption at rest of the model files (model.pt and its exports) and of the checkpoints."""

    client_side: bool = False
    """Encrypt the model files and every checkpoint in the trainer (AES-256-GCM, authenticated, chunked) with the key in the
    `FINETUNE_ENCRYPTION_KEY` environment variable, which must come from a Secret listed in `runtime.envFrom` (base64 of 32
    bytes, or a keyring `id1:key1,id2:key2` whose first key encrypts). Works on every store, PVCs and local runs included."""

    server_side: ServerSideEncryption | None = None
    """Have the object store encrypt every object the job writes with a KMS key (s3:// and gs:// outputs only)."""

    def enabled(self) -> bool:
        return self.client_side or self.server_side is not None

    @model_validator(mode="after")
    def _encrypts_something(self) -> EncryptionSpec:
        # An empty block reads as "encrypted" to whoever skims the spec, yet nothing would be: refuse it.
        if not self.enabled():
            fail(
                None,
                f"{self.to_wire()} encrypts nothing; set clientSide: true (key in a Secret under runtime.envFrom) "
                "and/or serverSide.kmsKey, or remove encryption",
            )
        return self


class ArtifactProtection(WireModel):
    """How the job's artifacts are protected, as the trainer wrote them."""

    encrypted: bool = False
    """Whether the model files and checkpoints are encrypted by the trainer (client-side AES-256-GCM)."""

    encryption_key_id: str | None = None
    """Id of the key they are encrypted with (from `FINETUNE_ENCRYPTION_KEY`)."""

    server_side_encryption: Literal["aws:kms", "gcs-cmek"] | None = None
    """The object store's encryption the objects were written with, if any."""

    server_side_key: str | None = None
    """The KMS key of the store's encryption."""

    signed: bool = False
    """Whether the model card is signed (model.json.sig, Ed25519)."""

    signing_key_id: str | None = None
    """Id of the public key that verifies the card: the first 16 hex digits of the sha256 of the raw key."""
