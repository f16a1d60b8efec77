"""What ``spec.output.encryption`` and ``spec.output.sign`` do to a run's artifacts and checkpoints.

``keyring_for`` / ``signing_key_for`` read the keys the spec asks for from the environment (Secrets
through ``runtime.envFrom``) and fail in one line when they are missing, before any training: a job that
asked for encryption never writes a model in the clear. ``seal_staged`` encrypts the model files of a
staged artifact directory in place (the card lists whatever files are there afterwards); ``sign_staged``
signs the written card. The crypto itself is in ``sealing`` and ``signing``.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.protection import ArtifactProtection
from finetune_trainer.sealing import (
    ENCRYPTION_KEY_ENV,
    MODEL_SUFFIXES,
    Keyring,
    SealError,
    artifact_binding,
    is_model_file,
    seal_file,
)
from finetune_trainer.signing import (
    SIGNATURE_FILE,
    SIGNING_KEY_ENV,
    SignatureError,
    public_key_id,
    sign_card,
    signing_key_from_env,
)

__all__ = [
    "MODEL_SUFFIXES",
    "check_keys",
    "is_model_file",
    "keyring_for",
    "protection_of",
    "seal_staged",
    "server_side_key",
    "sign_staged",
    "signing_key_for",
]


def keyring_for(cfg: TrainerConfig) -> Keyring | None:
    """The encryption keyring when the spec asks for client-side encryption; SealError when it is missing."""
    enc = cfg.spec.output.encryption
    if enc is None or not enc.client_side:
        return None
    ring = Keyring.from_env()
    if ring is None:
        raise SealError(
            f"spec.output.encryption.clientSide: true, but {ENCRYPTION_KEY_ENV} is not set; create a Secret with that key "
            "(base64 of 32 random bytes) and list it under spec.runtime.envFrom"
        )
    return ring


def signing_key_for(cfg: TrainerConfig) -> Ed25519PrivateKey | None:
    """The signing key when the spec asks for a signed card; SignatureError when it is missing."""
    if not cfg.spec.output.sign:
        return None
    key = signing_key_from_env()
    if key is None:
        raise SignatureError(
            f"spec.output.sign: true, but {SIGNING_KEY_ENV} is not set; create a Secret with the Ed25519 private key "
            "(PEM) and list it under spec.runtime.envFrom"
        )
    return key


def server_side_key(cfg: TrainerConfig) -> str | None:
    """The KMS key every object this job writes must be encrypted with (``encryption.serverSide``), if any."""
    enc = cfg.spec.output.encryption
    return enc.server_side.kms_key if enc is not None and enc.server_side is not None else None


def check_keys(cfg: TrainerConfig) -> None:
    """Fail now, in one line, when a key the spec needs is missing or unreadable."""
    keyring_for(cfg)
    signing_key_for(cfg)


def seal_staged(out: Path, keyring: Keyring) -> None:
    """Encrypt every model file in the local directory ``out`` in place, each bound to its name."""
    for path in sorted(out.iterdir()):
        if path.is_file() and is_model_file(path.name):
            sealed = path.with_name(f".{path.name}.sealed")
            seal_file(path, sealed, keyring, bind=artifact_binding(path.name))
            sealed.replace(path)


def protection_of(cfg: TrainerConfig, keyring: Keyring | None, signing: Ed25519PrivateKey | None) -> ArtifactProtection:
    """What the card and the status say about the protection of this run's artifacts."""
    enc = cfg.spec.output.encryption
    sse = enc.server_side if enc is not None else None
    scheme = cfg.run_dir.partition("://")[0]
    return ArtifactProtection(
        encrypted=keyring is not None,
        encryption_key_id=keyring.current if keyring is not None else None,
        server_side_encryption=None if sse is None else ("aws:kms" if scheme == "s3" else "gcs-cmek"),
        server_side_key=None if sse is None else sse.kms_key,
        signed=signing is not None,
        signing_key_id=public_key_id(signing.public_key()) if signing is not None else None,
    )


def sign_staged(out: Path, card_file: str, key: Ed25519PrivateKey) -> str:
    """Sign the card written in ``out``; the signature file's name."""
    (out / SIGNATURE_FILE).write_bytes(sign_card((out / card_file).read_bytes(), key))
    return SIGNATURE_FILE
