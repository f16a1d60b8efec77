"""Issue 15: encrypted, signed artifacts, verified before use by `finetune verify`, `finetune predict` and a job
that starts from them (``weightsUri``); checkpoints encrypted too. One tiny model, written once per protection."""

from __future__ import annotations

import argparse
import base64
import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image
from torch import nn

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import Artifacts, FineTuneJobSpec
from finetune_trainer.checkpoint import CHECKPOINT_FILE, CorruptCheckpoint, TrainState, read_checkpoint
from finetune_trainer.errors import TrainerError, WeightsError
from finetune_trainer.inputs import InputSpec
from finetune_trainer.model import build_model
from finetune_trainer.predict import predict_command
from finetune_trainer.protect import check_keys
from finetune_trainer.sealing import Keyring, is_sealed_file
from finetune_trainer.signing import public_key_id
from finetune_trainer.verify_cli import verify_command
from tests.support.checkpoints import save_checkpoint
from tests.support.tiny_model import write_tiny_artifacts

CLASSES = ["cat", "dog", "owl"]
INPUT = InputSpec(
    image_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear", grayscale_to_rgb=True
)
KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(100, 132))).decode()
SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
SIGNER_PEM = SIGNER.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
PUBLIC = base64.b64encode(SIGNER.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
KEY_ENV = ("FINETUNE_ENCRYPTION_KEY", "FINETUNE_SIGNING_KEY", "FINETUNE_VERIFY_KEYS", "FINETUNE_REQUIRE_SIGNED")


def config(root: Path, output: dict[str, Any]) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "fake", "imageSize": 32, "fake": {"classes": 3}},
            "output": {"uri": str(root), **output},
        }
    )
    return TrainerConfig(job_name="pets", spec=spec, output_root=str(root))


def write(root: Path, output: dict[str, Any]) -> tuple[Path, Artifacts]:
    run = write_tiny_artifacts(root, CLASSES, INPUT, output=output)
    return run.run_dir, run.artifacts


@pytest.fixture(autouse=True)
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KEY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def protected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Artifacts]]:
    """An artifact directory written with client-side encryption and a signed card."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_ENCRYPTION_KEY", f"k1:{KEY}")
        mp.setenv("FINETUNE_SIGNING_KEY", SIGNER_PEM)
        yield write(tmp_path_factory.mktemp("protected"), {"encryption": {"clientSide": True}, "sign": True})


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Artifacts]:
    return write(tmp_path_factory.mktemp("plain"), {})


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8), "RGB").save(path)
    return path


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """A serving system: the decryption keyring and the trusted public key, signatures required."""
    monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", f"k1:{KEY}")
    monkeypatch.setenv("FINETUNE_VERIFY_KEYS", PUBLIC)
    monkeypatch.setenv("FINETUNE_REQUIRE_SIGNED", "true")


def predict(directory: Path, image: Path) -> int:
    return predict_command(argparse.Namespace(model=str(directory), images=[str(image)], top_k=1, require_signed=False))


def verify(directory: Path, require_signed: bool = False) -> int:
    return verify_command(argparse.Namespace(model=str(directory), require_signed=require_signed))


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ at rest
def test_model_files_are_encrypted_and_not_loadable_without_the_key(protected: tuple[Path, Artifacts]) -> None:
    directory, _ = protected
    assert is_sealed_file(directory / "model.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(directory / "model.pt", weights_only=True)
    # Reports stay readable: the weights are what is protected.
    assert not is_sealed_file(directory / "evaluation.json")


def test_card_and_status_say_encrypted_and_signed(protected: tuple[Path, Artifacts]) -> None:
    directory, artifacts = protected
    card = json.loads((directory / "model.json").read_text())
    key_id = public_key_id(SIGNER.public_key())
    expected = {"encrypted": True, "encryptionKeyId": "k1", "signed": True, "signingKeyId": key_id}
    assert {k: card["protection"][k] for k in expected} == expected
    assert card["files"]["model.pt"]["encryptionKeyId"] == "k1"
    assert "encryptionKeyId" not in card["files"]["evaluation.json"]
    assert sorted(card["files"]) == sorted(p.name for p in directory.iterdir() if p.name not in ("model.json", "model.json.sig"))
    assert artifacts.protection is not None
    assert artifacts.to_wire()["protection"] == {**expected, "encryptionKeyId": "k1"}


def test_unsigned_output_says_so(plain: tuple[Path, Artifacts]) -> None:
    directory, artifacts = plain
    assert json.loads((directory / "model.json").read_text())["protection"]["signed"] is False
    assert not (directory / "model.json.sig").exists()
    assert artifacts.protection is not None and not artifacts.protection.signed and not artifacts.protection.encrypted


# ------------------------------------------------------------------------------------------ verify
def test_verify_prints_what_it_checked(
    protected: tuple[Path, Artifacts], reader: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify(protected[0]) == 0
    out = capsys.readouterr().out
    assert f"signature: model.json signed by key id {public_key_id(SIGNER.public_key())}: valid" in out
    assert "sha256 model.pt: ok (" in out and "decrypts with key id k1" in out
    assert "sha256 evaluation.json: ok (" in out
    assert out.strip().endswith("encrypted, signed by " + public_key_id(SIGNER.public_key()) + ")")


def test_predict_works_with_the_key(
    protected: tuple[Path, Artifacts], reader: None, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert predict(protected[0], image) == 0
    assert str(image) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("keyring", "message"),
    [
        (None, "model.pt: encrypted with key id 'k1', but FINETUNE_ENCRYPTION_KEY is not set"),
        (f"k1:{OTHER_KEY}", "model.pt: chunk 0 does not decrypt with key id 'k1': wrong key"),
        (f"k2:{KEY}", "model.pt: encrypted with key id 'k1', which FINETUNE_ENCRYPTION_KEY does not hold"),
    ],
)
def test_wrong_or_missing_key_fails_cleanly(
    protected: tuple[Path, Artifacts],
    reader: None,
    image: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    keyring: str | None,
    message: str,
) -> None:
    if keyring is None:
        monkeypatch.delenv("FINETUNE_ENCRYPTION_KEY")
    else:
        monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", keyring)
    assert predict(protected[0], image) == 2
    assert message in error_line(capsys.readouterr().err)
    assert verify(protected[0]) == 1
    assert message in error_line(capsys.readouterr().err)


def flip_model_byte(directory: Path) -> str:
    data = bytearray((directory / "model.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (directory / "model.pt").write_bytes(bytes(data))
    return "model.pt: sha256 "


def edit_card(directory: Path) -> str:
    card = json.loads((directory / "model.json").read_text())
    card["classNames"] = ["dog", "cat", "owl"]  # the quiet edit that mislabels every prediction
    (directory / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    return "model.json: the signature does not match the card; the card was edited after signing"


def resign_elsewhere(directory: Path) -> str:
    """Whoever can replace the files replaces the card and signs it with a key of their own."""
    edit_card(directory)
    from finetune_trainer.signing import sign_card

    (directory / "model.json.sig").write_bytes(sign_card((directory / "model.json").read_bytes(), Ed25519PrivateKey.generate()))
    return "which is not among the trusted keys"


def drop_signature(directory: Path) -> str:
    (directory / "model.json.sig").unlink()
    return "model.json: unsigned (no model.json.sig), and signed artifacts are required (FINETUNE_REQUIRE_SIGNED=true)"


@pytest.mark.parametrize("tamper", [flip_model_byte, edit_card, resign_elsewhere, drop_signature])
def test_tampering_is_refused_by_verify_predict_and_chaining(
    protected: tuple[Path, Artifacts],
    reader: None,
    tmp_path: Path,
    image: Path,
    tamper: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory = tmp_path / "copy"
    shutil.copytree(protected[0], directory)
    message = tamper(directory)
    assert verify(directory) == 1
    assert message in error_line(capsys.readouterr().err)
    assert predict(directory, image) == 2
    assert message in error_line(capsys.readouterr().err)
    with pytest.raises(WeightsError, match=r"^weights_uri .*" + message.split(":")[0].replace(".", r"\.")) as info:
        build_model("resnet18", None, 3, weights_uri=str(directory / "model.pt"))
    assert message in str(info.value)


def test_chaining_from_a_verified_encrypted_model(protected: tuple[Path, Artifacts], reader: None) -> None:
    model = build_model("resnet18", None, 3, weights_uri=str(protected[0] / "model.pt"), keep_head=True)
    assert isinstance(model, nn.Module)


def test_unsigned_models_are_refused_only_when_required(
    plain: tuple[Path, Artifacts], image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = plain[0]
    assert verify(directory) == 0
    assert "signature: none (model.json is unsigned" in capsys.readouterr().out
    assert verify(directory, require_signed=True) == 1
    assert "unsigned (no model.json.sig)" in error_line(capsys.readouterr().err)
    monkeypatch.setenv("FINETUNE_REQUIRE_SIGNED", "true")
    assert predict(directory, image) == 2
    assert "unsigned (no model.json.sig)" in error_line(capsys.readouterr().err)
    with pytest.raises(WeightsError, match="unsigned"):
        build_model("resnet18", None, 3, weights_uri=str(directory / "model.pt"))


def test_a_signature_without_trusted_keys_is_noted_unless_signatures_are_required(
    protected: tuple[Path, Artifacts], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", f"k1:{KEY}")
    assert verify(protected[0]) == 0
    assert "signature: model.json.sig present but not checked (no FINETUNE_VERIFY_KEYS" in capsys.readouterr().out
    assert verify(protected[0], require_signed=True) == 1
    line = error_line(capsys.readouterr().err)
    assert "model.json: signed by key id" in line and "but no public key is configured (FINETUNE_VERIFY_KEYS)" in line


def test_bare_weights_file_is_refused_when_signatures_are_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save(build_model("resnet18", None, 3).state_dict(), tmp_path / "weights.pt")
    build_model("resnet18", None, 3, weights_uri=str(tmp_path / "weights.pt"))  # allowed by default
    monkeypatch.setenv("FINETUNE_REQUIRE_SIGNED", "true")
    with pytest.raises(WeightsError, match=r"weights\.pt: no model card beside it lists this file"):
        build_model("resnet18", None, 3, weights_uri=str(tmp_path / "weights.pt"))


# ------------------------------------------------------------------------------------------ keys
@pytest.mark.parametrize(
    ("output", "message"),
    [
        ({"encryption": {"clientSide": True}}, "spec.output.encryption.clientSide: true, but FINETUNE_ENCRYPTION_KEY is not set"),
        ({"sign": True}, "spec.output.sign: true, but FINETUNE_SIGNING_KEY is not set"),
    ],
)
def test_a_job_without_its_key_fails_before_training(tmp_path: Path, output: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainerError) as info:
        check_keys(config(tmp_path, output))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint(directory: Path, keyring: Keyring | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    save_checkpoint(directory, model, TrainState(epoch=3), "fp", keyring=keyring)
    return model


def test_encrypted_checkpoint_resumes_with_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = checkpoint(tmp_path / "ckpt", Keyring.parse(f"k1:{KEY}"))
    assert is_sealed_file(tmp_path / "ckpt" / CHECKPOINT_FILE)
    monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", f"k2:{OTHER_KEY},k1:{KEY}")  # after a rotation
    data = read_checkpoint(tmp_path / "ckpt", "fp", "run", encrypted=True)
    assert data["train_state"].epoch == 3
    assert torch.equal(data["model"]["weight"], model.state_dict()["weight"])


@pytest.mark.parametrize(
    ("keyring", "message"),
    [
        (None, "but FINETUNE_ENCRYPTION_KEY is not set"),
        (f"k1:{OTHER_KEY}", "does not decrypt with key id 'k1': wrong key"),
    ],
)
def test_encrypted_checkpoint_with_a_wrong_or_missing_key_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keyring: str | None, message: str
) -> None:
    """Not CorruptCheckpoint: that would fall back to an older checkpoint, or to a fresh start."""
    checkpoint(tmp_path / "ckpt", Keyring.parse(f"k1:{KEY}"))
    if keyring is not None:
        monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", keyring)
    with pytest.raises(TrainerError) as info:
        read_checkpoint(tmp_path / "ckpt", "fp", "run", encrypted=True)
    assert not isinstance(info.value, CorruptCheckpoint)
    assert str(info.value).startswith("checkpoint ckpt/checkpoint.pt: ") and message in str(info.value)


def test_clear_checkpoint_is_refused_when_the_job_encrypts(tmp_path: Path) -> None:
    checkpoint(tmp_path / "ckpt", None)
    assert read_checkpoint(tmp_path / "ckpt", "fp", "run")["train_state"].epoch == 3
    with pytest.raises(TrainerError, match=r"^checkpoint ckpt: checkpoint\.pt is not encrypted, but spec\.output\.encryption"):
        read_checkpoint(tmp_path / "ckpt", "fp", "run", encrypted=True)


def test_an_unsigned_rerun_removes_the_earlier_signature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Left behind, the old signature would contradict the new card and make a valid model look tampered."""
    monkeypatch.setenv("FINETUNE_SIGNING_KEY", SIGNER_PEM)
    directory, _ = write(tmp_path, {"sign": True})
    assert (directory / "model.json.sig").exists()
    monkeypatch.delenv("FINETUNE_SIGNING_KEY")
    write(tmp_path, {})
    assert not (directory / "model.json.sig").exists()
    assert verify(directory) == 0
