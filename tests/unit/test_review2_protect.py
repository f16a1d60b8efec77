"""Adversarial review of issue 15 (artifact protection): each test states a defect found in review and fails
on the merged code (2e81999). Production code is not changed here."""

from __future__ import annotations

import base64
import importlib
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from torch import nn

from finetune_operator.admission import protection_errors
from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec, OutputSpec
from finetune_trainer import artifacts as art
from finetune_trainer import storage
from finetune_trainer.checkpoint import TrainState, read_checkpoint, write_checkpoint
from finetune_trainer.errors import TrainerError
from finetune_trainer.evaluation import EvalResult
from finetune_trainer.inputs import InputSpec
from finetune_trainer.model import build_model
from finetune_trainer.sealing import Keyring, SealError

KEY = base64.b64encode(bytes(range(32))).decode()
KEY_ENV = ("FINETUNE_ENCRYPTION_KEY", "FINETUNE_SIGNING_KEY", "FINETUNE_VERIFY_KEYS", "FINETUNE_REQUIRE_SIGNED")


@pytest.fixture(autouse=True)
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KEY_ENV:
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- key material leaks
@pytest.mark.parametrize("name", ["FINETUNE_ENCRYPTION_KEY", "FINETUNE_SIGNING_KEY"])
def test_key_inlined_in_runtime_env_is_refused(name: str) -> None:
    """`looks_like_secret` misses *_ENCRYPTION_KEY / *_SIGNING_KEY: an inline key is admitted and then sits in the
    FineTuneJob, the RayJob, the trainer ConfigMap and (spec.to_wire()) the unencrypted model.json."""
    with pytest.raises(ValueError, match="envFrom"):
        FineTuneJobSpec.model_validate(
            {
                "model": {"name": "resnet18"},
                "dataset": {"format": "digits"},
                "output": {"uri": "s3://b/runs", "encryption": {"clientSide": True}, "sign": True},
                "runtime": {"env": [{"name": name, "value": KEY}]},
            }
        )


@pytest.mark.parametrize("text", [f"{KEY}:k1", f"{KEY}:", f"k1:{KEY},{KEY}:k2"], ids=["reversed", "colon", "second"])
def test_keyring_error_never_echoes_the_key(text: str) -> None:
    """An entry written `KEY:id` (reversed) makes the key the 'id', which the SealError quotes: the key reaches the
    job's status message and logs."""
    with pytest.raises(SealError) as info:
        Keyring.parse(text)
    assert KEY not in str(info.value)


def test_keyring_repr_hides_the_keys() -> None:
    """A frozen dataclass repr prints the raw key bytes (tracebacks with locals, debug logging)."""
    ring = Keyring.parse(KEY)
    assert repr(ring.keys[ring.current]) not in repr(ring)


# ----------------------------------------------------------------------------- server-side encryption
class FakeGCS(MemoryFileSystem):
    """gcsfs as it behaves: GCSFileSystem(**kw) swallows unknown options; GCSFile takes kms_key_name from open()."""

    protocol = ("gs", "gcs")
    opened: ClassVar[list[Any]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        FakeGCS.opened.append(kwargs.pop("kms_key_name", None))
        return super()._open(path, mode, **kwargs)


def test_gcs_cmek_reaches_the_object_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """storage.upload_file passes kms_key_name to fsspec.open(), i.e. to the filesystem *constructor*; gcsfs reads it
    only as an open()/GCSFile option, so gs:// objects are written without the CMEK while status and card say
    serverSideEncryption: gcs-cmek."""
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(registry._registry, "gs", FakeGCS)
    FakeGCS.clear_instance_cache()
    FakeGCS.opened.clear()
    src = tmp_path / "model.pt"
    src.write_bytes(b"weights")
    key = "projects/p/locations/l/keyRings/r/cryptoKeys/k"
    storage.upload_file(src, "gs://bucket/run/model.pt", kms_key=key)
    assert FakeGCS.opened == [key]


def test_server_side_only_is_not_enough_when_protection_is_required() -> None:
    """With serverSide only, checkpoints are guarded by an unsigned sidecar sha256 alone; model.pt is read back from
    the best checkpoint in the bucket (finish._ship_weights) and resumes read them too, then the card is *signed*:
    whoever can write the bucket gets their weights signed. The required policy admits this configuration."""
    output = OutputSpec.model_validate({"uri": "s3://b/runs", "encryption": {"serverSide": {"kmsKey": "alias/m"}}, "sign": True})
    assert protection_errors(output) != []


# ----------------------------------------------------------------------------- clear weights at rest
def test_clear_weights_are_never_staged_in_the_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For a local/PVC output, write_artifacts stages in <run_dir>/.artifacts-*/ and torch.save's model.pt (and the
    exports) there in the clear before sealing: the PVC (and its snapshots) hold the weights, and a kill during export
    (ONNX is memory-hungry) leaves them there for good."""
    monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", f"k1:{KEY}")
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "fake", "imageSize": 32, "fake": {"classes": 3}},
            "output": {"uri": str(tmp_path), "encryption": {"clientSide": True}},
        }
    )
    cfg = TrainerConfig(job_name="pets", spec=spec, output_root=str(tmp_path))
    staged: list[Path] = []
    real = art.seal_staged

    def spy(out: Path, keyring: Keyring) -> None:
        staged.append(out)
        real(out, keyring)

    monkeypatch.setattr(art, "seal_staged", spy)
    classes = ["a", "b", "c"]
    inputs = InputSpec(
        image_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", grayscale_to_rgb=True
    )
    art.write_artifacts(
        cfg.run_dir,
        model=build_model("resnet18", None, 3),
        cfg=cfg,
        class_names=classes,
        input_spec=inputs,
        evaluation=EvalResult([0, 1, 2], [0, 1, 2], classes),
        best_val_accuracy=1.0,
        best_epoch=1,
        checkpoint_uri=None,
    )
    assert staged and not staged[0].resolve().is_relative_to(Path(cfg.run_dir).resolve())


# ----------------------------------------------------------------------------- checkpoint replay
def _checkpoint(directory: Path, epoch: int, keyring: Keyring) -> None:
    directory.mkdir(parents=True)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    write_checkpoint(
        directory,
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        state=TrainState(epoch=epoch),
        fingerprint="fp",
        keyring=keyring,
    )


def test_sealed_checkpoint_copied_over_another_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Docs: encrypted checkpoints 'are authenticated by AES-GCM'. The sealed header binds nothing about which
    checkpoint it is (dir/epoch/run): copying an older (or another job's, same key and spec) checkpoint.pt and its
    sidecar over checkpoint_epoch_0005 is accepted, so a bucket writer rolls back resume or the shipped 'best'."""
    ring = Keyring.parse(f"k1:{KEY}")
    monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", f"k1:{KEY}")
    old, new = tmp_path / "checkpoint_epoch_0001", tmp_path / "checkpoint_epoch_0005"
    _checkpoint(old, 1, ring)
    _checkpoint(new, 5, ring)
    for name in ("checkpoint.pt", "checkpoint.sha256"):
        shutil.copyfile(old / name, new / name)
    try:
        data = read_checkpoint(new, "fp", "run", encrypted=True)
    except TrainerError:
        return
    assert data["train_state"].epoch == 5, "epoch 1's checkpoint accepted as checkpoint_epoch_0005"


# ----------------------------------------------------------------------------- settings and spec
def test_operator_refuses_a_private_key_as_the_trusted_verify_key() -> None:
    """FINETUNE_OPERATOR_VERIFY_KEYS is only pattern-checked; a PKCS#8 *private* PEM (an easy mix-up: signing.pem vs
    verify.pem) passes and is copied as a literal value into every RayJob's env (_operator_env)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from finetune_operator.settings import OperatorSettings, SettingsError

    private = (
        Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    with pytest.raises(SettingsError):
        OperatorSettings.from_env(
            {"FINETUNE_OPERATOR_REQUIRE_PROTECTED_ARTIFACTS": "true", "FINETUNE_OPERATOR_VERIFY_KEYS": private}
        )


@pytest.mark.parametrize("encryption", [{}, {"clientSide": False}], ids=["empty", "clientSide-false"])
def test_an_encryption_block_that_encrypts_nothing_is_refused(encryption: dict[str, Any]) -> None:
    """Without the platform flag, `encryption: {}` / `{clientSide: false}` is admitted and silently encrypts nothing
    (only the required policy calls it 'encrypts nothing')."""
    with pytest.raises(ValueError, match="encryption"):
        OutputSpec.model_validate({"uri": "s3://b/runs", "encryption": encryption})
