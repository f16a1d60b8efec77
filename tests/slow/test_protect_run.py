"""Issue 15 end to end on a local Ray: a run with client-side encryption and a signed card leaves nothing loadable
without the key, resumes after a crash by decrypting its checkpoint, ships a model that `finetune verify` and
`finetune predict` accept with the key, and a relaunch with a wrong key stops in one line instead of starting over."""

from __future__ import annotations

import argparse
import base64
import pickle
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image
from ray.train import TrainingFailedError

from finetune_trainer import driver
from finetune_trainer.errors import TrainerError
from finetune_trainer.predict import predict_command
from finetune_trainer.sealing import is_sealed_file
from finetune_trainer.verify_cli import verify_command
from tests.slow.conftest import MakeConfig

pytestmark = pytest.mark.slow

KEY = "k1:" + base64.b64encode(bytes(range(32))).decode()
WRONG = "k1:" + base64.b64encode(bytes(range(1, 33))).decode()
SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PEM = SIGNER.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
PUBLIC = base64.b64encode(SIGNER.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def start_ray(monkeypatch: pytest.MonkeyPatch, keyring: str) -> None:
    """A fresh local Ray whose workers see ``keyring``: they take the environment of the moment Ray starts."""
    monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", keyring)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)


def test_encrypted_signed_run_resumes_predicts_and_refuses_a_wrong_key(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FINETUNE_SIGNING_KEY", PEM)
    monkeypatch.setenv("FINETUNE_VERIFY_KEYS", PUBLIC)
    monkeypatch.setenv("FINETUNE_REQUIRE_SIGNED", "true")
    protected = {"encryption": {"clientSide": True}, "sign": True}
    cfg = driver.absolute_output(make_config("sealed", hyperparameters={"epochs": 3}, output=protected))
    start_ray(monkeypatch, KEY)
    try:
        with pytest.raises(TrainingFailedError, match="injected failure after epoch 2"):
            driver.build_trainer(cfg, fail_after_epoch=2, local=True).fit()
        checkpoints = sorted(Path(cfg.run_dir).glob("checkpoint_epoch_*/checkpoint.pt"))
        assert checkpoints and all(is_sealed_file(p) for p in checkpoints)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(checkpoints[-1], weights_only=True)

        result = driver.build_trainer(cfg, local=True).fit()
        assert result.metrics is not None and result.metrics["resumed_from"] == 2
    finally:
        ray.shutdown()

    run_dir = Path(cfg.run_dir)
    assert is_sealed_file(run_dir / "model.pt") and (run_dir / "model.json.sig").exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(run_dir / "model.pt", weights_only=True)
    assert verify_command(argparse.Namespace(model=str(run_dir), require_signed=True)) == 0
    assert "decrypts with key id k1" in capsys.readouterr().out
    image = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8), "L").save(image)
    args = argparse.Namespace(model=str(run_dir), images=[str(image)], top_k=1, require_signed=True)
    assert predict_command(args) == 0
    assert str(image) in capsys.readouterr().out

    # A relaunch whose Secret holds another key for k1: one line, neither a fallback nor a fresh start.
    start_ray(monkeypatch, WRONG)
    try:
        with pytest.raises(TrainerError, match=r"does not decrypt with key id 'k1': wrong key") as raised:
            driver.run(cfg, local=True)
        assert "\n" not in str(raised.value)
    finally:
        ray.shutdown()
    monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", WRONG)
    assert predict_command(args) == 2
    assert "model.pt: chunk 0 does not decrypt with key id 'k1'" in capsys.readouterr().err
