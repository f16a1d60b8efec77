"""Issue 15 on an object store: `spec.output.encryption.serverSide` reaches S3 as SSE-KMS on every artifact (checked
with head_object against moto's S3 server on localhost), and client-side encryption and `finetune verify` work on
an s3:// run directory as on a local one; on gs:// the CMEK reaches the object writer (gcsfs's open())."""

from __future__ import annotations

import argparse
import base64
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from finetune_trainer import storage
from finetune_trainer.inputs import InputSpec
from finetune_trainer.sealing import is_sealed
from finetune_trainer.verify_cli import verify_command
from tests.support.s3 import s3_server
from tests.support.tiny_model import write_tiny_artifacts

BUCKET = "finetune-models"
KMS_KEY = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
CLASSES = ["a", "b"]
INPUT = InputSpec(
    image_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear", grayscale_to_rgb=True
)


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """moto's S3 API on localhost; s3fs and boto3 reach it through AWS_ENDPOINT_URL."""
    with s3_server(BUCKET) as server:
        yield server.client


def test_server_side_and_client_side_encryption_on_s3(
    s3: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", "k1:" + base64.b64encode(bytes(32)).decode())
    monkeypatch.delenv("FINETUNE_SIGNING_KEY", raising=False)
    monkeypatch.delenv("FINETUNE_REQUIRE_SIGNED", raising=False)
    root = f"s3://{BUCKET}/runs"
    output = {"encryption": {"clientSide": True, "serverSide": {"kmsKey": KMS_KEY}}}
    run = write_tiny_artifacts(root, CLASSES, INPUT, job_name="sse", output=output)
    cfg, artifacts = run.cfg, run.artifacts
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/sse/")["Contents"])
    assert "runs/sse/model.pt" in keys and "runs/sse/model.json" in keys
    for key in keys:
        head = s3.head_object(Bucket=BUCKET, Key=key)
        assert (head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")) == ("aws:kms", KMS_KEY), key
    model = s3.get_object(Bucket=BUCKET, Key="runs/sse/model.pt")["Body"].read()
    assert is_sealed(model)
    assert artifacts.protection is not None
    assert (artifacts.protection.server_side_encryption, artifacts.protection.server_side_key) == ("aws:kms", KMS_KEY)
    assert artifacts.protection.encrypted and artifacts.protection.encryption_key_id == "k1"
    assert verify_command(argparse.Namespace(model=cfg.run_dir, require_signed=False)) == 0
    assert "decrypts with key id k1" in capsys.readouterr().out
    # Tampering in the bucket is caught as on a disk.
    s3.put_object(Bucket=BUCKET, Key="runs/sse/model.pt", Body=model[:-1])
    assert verify_command(argparse.Namespace(model=cfg.run_dir, require_signed=False)) == 1
    assert f"{cfg.run_dir}/model.pt: sha256 " in capsys.readouterr().err


def test_no_server_side_encryption_unless_asked(s3: Any, tmp_path: Path) -> None:
    from finetune_trainer import storage

    (tmp_path / "f").write_bytes(b"x")
    storage.upload_file(tmp_path / "f", f"s3://{BUCKET}/plain/f")
    assert s3.head_object(Bucket=BUCKET, Key="plain/f").get("ServerSideEncryption") in (None, "AES256")


class FakeGCS(MemoryFileSystem):
    """gcsfs as it behaves: GCSFileSystem(**kw) swallows unknown options; GCSFile takes kms_key_name from open()."""

    protocol = ("gs", "gcs")
    opened: ClassVar[list[Any]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        FakeGCS.opened.append(kwargs.pop("kms_key_name", None))
        return super()._open(path, mode, **kwargs)


def test_gcs_cmek_is_passed_to_the_object_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given to the filesystem's constructor, gcsfs would drop kms_key_name and write gs:// objects without the CMEK
    while status and card say serverSideEncryption: gcs-cmek."""
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(registry._registry, "gs", FakeGCS)
    FakeGCS.clear_instance_cache()
    FakeGCS.opened.clear()
    src = tmp_path / "model.pt"
    src.write_bytes(b"weights")
    key = "projects/p/locations/l/keyRings/r/cryptoKeys/k"
    storage.upload_file(src, "gs://bucket/run/model.pt", kms_key=key)
    assert FakeGCS.opened == [key]
