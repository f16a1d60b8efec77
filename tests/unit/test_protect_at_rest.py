"""Issue 15, what reaches the output store: with client-side encryption the clear weights are staged outside the
run directory (never on the PVC), and each sealed file is bound to what it is (a checkpoint's name, an artifact's
file name), so a copy of another sealed file over it is refused although it decrypts; a directory check reports
the model files its card does not list. A sealed checkpoint cut short without its checksum is corrupt (skipped for an
older one), not a key problem. A relaunch killed while it writes the artifacts again leaves a model that verifies."""

from __future__ import annotations

import base64
import contextlib
import shutil
from pathlib import Path

import pytest
import ray.train
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import Artifacts, FineTuneJobSpec
from finetune_trainer import artifacts as art
from finetune_trainer import storage
from finetune_trainer.checkpoint import CHECKPOINT_FILE, CHECKSUM_FILE, TrainState, checkpoint_dir_name, read_checkpoint
from finetune_trainer.errors import ArtifactError, TrainerError
from finetune_trainer.evaluation import EvalResult
from finetune_trainer.inputs import InputSpec
from finetune_trainer.model import build_model
from finetune_trainer.model_card import MODEL_FILE
from finetune_trainer.resume import resume_from
from finetune_trainer.sealing import Keyring
from finetune_trainer.verify import verify_artifacts
from tests.support.checkpoints import save_checkpoint
from tests.support.tiny_model import write_tiny_artifacts

KEY = base64.b64encode(bytes(range(32))).decode()
PEM = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
CLASSES = ["a", "b", "c"]
INPUT = InputSpec(
    image_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", grayscale_to_rgb=True
)


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FINETUNE_SIGNING_KEY", "FINETUNE_VERIFY_KEYS", "FINETUNE_REQUIRE_SIGNED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", f"k1:{KEY}")


def write_encrypted(output: Path, exports: list[str], *, sign: bool = False) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "fake", "imageSize": 32, "fake": {"classes": 3}},
            "output": {"uri": str(output), "encryption": {"clientSide": True}, "exports": exports, "sign": sign},
        }
    )
    cfg = TrainerConfig(job_name="pets", spec=spec, output_root=str(output))
    ship(cfg, build_model("resnet18", None, 3))
    return cfg


def ship(cfg: TrainerConfig, model: nn.Module) -> Artifacts:
    """``write_artifacts`` of ``model`` for ``cfg``'s run: a perfect evaluation on the three classes, epoch 1."""
    return art.write_artifacts(
        cfg.run_dir,
        model=model,
        cfg=cfg,
        class_names=CLASSES,
        input_spec=INPUT,
        evaluation=EvalResult([0, 1, 2], [0, 1, 2], CLASSES),
        best_val_accuracy=1.0,
        best_epoch=1,
        checkpoint_uri=None,
    )


def test_clear_weights_are_staged_outside_the_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Staged under <run_dir>/.artifacts-*/, model.pt (and the exports) would sit on the PVC in the clear before
    sealing, and for good after a kill mid-export."""
    staged: list[Path] = []
    real = art.seal_staged

    def spy(out: Path, keyring: Keyring) -> None:
        staged.append(out)
        assert out.stat().st_mode & 0o077 == 0  # private to the trainer's user
        real(out, keyring)

    monkeypatch.setattr(art, "seal_staged", spy)
    cfg = write_encrypted(tmp_path / "out", ["state_dict"])
    assert len(staged) == 1 and not staged[0].resolve().is_relative_to((tmp_path / "out").resolve())
    assert not staged[0].exists()  # removed once published
    assert verify_artifacts(cfg.run_dir).card.files[MODEL_FILE].encryption_key_id == "k1"


def test_a_sealed_model_file_copied_over_another_is_refused(tmp_path: Path) -> None:
    """model.safetensors sealed with the same key, copied over model.pt (and the card's sha256 edited to match, as
    an unsigned card allows): it decrypts, but was sealed as another file."""
    cfg = write_encrypted(tmp_path / "out", ["state_dict", "safetensors"])
    run = Path(cfg.run_dir)
    shutil.copyfile(run / "model.safetensors", run / MODEL_FILE)
    card = (run / "model.json").read_text()
    old = verify_artifacts(cfg.run_dir, only=[]).card.files[MODEL_FILE].sha256
    new = verify_artifacts(cfg.run_dir, only=[]).card.files["model.safetensors"].sha256
    (run / "model.json").write_text(card.replace(old, new))
    with pytest.raises(ArtifactError, match=r"model.pt: sealed as 'artifact model.safetensors', not 'artifact model.pt'"):
        verify_artifacts(cfg.run_dir, only=[MODEL_FILE])


def test_a_sealed_checkpoint_copied_over_a_newer_one_is_refused(tmp_path: Path) -> None:
    """Same key, same spec: epoch 1's checkpoint.pt and its sidecar copied over checkpoint_epoch_0005 would roll back
    the resume (or the shipped 'best') without a word; it stops the run instead, naming what it was sealed as."""
    ring = Keyring.parse(f"k1:{KEY}")
    old, new = tmp_path / "checkpoint_epoch_0001", tmp_path / "checkpoint_epoch_0005"
    save_checkpoint(old, nn.Linear(4, 3), TrainState(epoch=1), "fp", keyring=ring)
    save_checkpoint(new, nn.Linear(4, 3), TrainState(epoch=5), "fp", keyring=ring)
    assert read_checkpoint(new, "fp", "run", encrypted=True)["train_state"].epoch == 5
    for name in ("checkpoint.pt", "checkpoint.sha256"):
        shutil.copyfile(old / name, new / name)
    with pytest.raises(TrainerError, match=r"sealed as 'checkpoint checkpoint_epoch_0001/checkpoint.pt', not 'checkpoint "):
        read_checkpoint(new, "fp", "run", encrypted=True)


def test_verify_reports_model_files_the_card_does_not_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory check that says 'verified' while an unlisted model file sits beside the card invites a server that
    loads what it finds to load it; with signatures required it is refused."""
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    monkeypatch.setenv("FINETUNE_SIGNING_KEY", private.private_bytes(*PEM).decode())
    monkeypatch.setenv("FINETUNE_VERIFY_KEYS", base64.b64encode(raw).decode())
    cfg = write_encrypted(tmp_path / "out", ["state_dict"], sign=True)
    (Path(cfg.run_dir) / "model_v2.onnx").write_bytes(b"not listed")
    checks = verify_artifacts(cfg.run_dir).checks
    assert "unlisted: model_v2.onnx is not in the model card (not verified; do not load it)" in checks
    assert verify_artifacts(cfg.run_dir, only=[MODEL_FILE]).checks[-1].startswith("sha256 model.pt: ok")  # one file asked
    with pytest.raises(ArtifactError, match=r"model_v2.onnx: a model file the model card does not list \(1 such"):
        verify_artifacts(cfg.run_dir, require_signed=True)


def test_the_source_head_is_kept_only_on_a_verified_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """weightsUri: whether the source's head is reused was read from its card unverified; a card whose signature no
    longer matches (edited) must not decide it."""
    from finetune_trainer.loop import _same_classes_as_source

    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    monkeypatch.setenv("FINETUNE_SIGNING_KEY", private.private_bytes(*PEM).decode())
    monkeypatch.setenv("FINETUNE_VERIFY_KEYS", base64.b64encode(raw).decode())
    cfg = write_encrypted(tmp_path / "out", ["state_dict"], sign=True)
    weights = str(Path(cfg.run_dir) / MODEL_FILE)
    assert _same_classes_as_source(weights, CLASSES)
    card = Path(cfg.run_dir) / "model.json"
    card.write_text(card.read_text().replace('"createdAt"', '"createdAt" ', 1))  # same content, other bytes
    assert not _same_classes_as_source(weights, CLASSES)


def test_a_sealed_checkpoint_cut_short_without_its_checksum_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    """An encrypted checkpoint that Ray Train was copying into a local run directory when the attempt was killed:
    checkpoint.pt cut short, checkpoint.sha256 not there. Corrupt like any other damaged checkpoint (the run falls
    back to the previous one), not a key problem that stops the run."""
    ring, run = Keyring.parse(f"k1:{KEY}"), tmp_path / "job"
    for epoch in (1, 2):
        save_checkpoint(run / checkpoint_dir_name(epoch), nn.Linear(4, 3), TrainState(epoch=epoch), "fp", keyring=ring)
    cut = run / checkpoint_dir_name(2)
    (cut / CHECKSUM_FILE).unlink()
    (cut / CHECKPOINT_FILE).write_bytes((cut / CHECKPOINT_FILE).read_bytes()[:-100])

    resumed = resume_from(ray.train.Checkpoint(path=str(cut)), "fp", str(run), encrypted=True)

    assert resumed.data["train_state"].epoch == 1
    (warning,) = resumed.warnings
    assert warning.startswith("checkpoint checkpoint_epoch_0002: ")
    assert warning.endswith("; resumed from checkpoint checkpoint_epoch_0001 (epoch 1)")


class Killed(BaseException):
    """The trainer's process killed at this step: nothing on the way out handles it."""


def test_a_relaunch_killed_while_republishing_leaves_the_published_model_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relaunch of a finished run (a retry after a crash past the artifacts, `finetune run` again) ships the same
    weights and wrote them again, sealed afresh under the same names: killed right after model.pt landed, the old
    card was left beside the new model.pt, and no model verified where one had."""
    output = {"exports": ["state_dict"], "encryption": {"clientSide": True}}
    run = write_tiny_artifacts(tmp_path, CLASSES, INPUT, output=output)
    published = verify_artifacts(str(run.run_dir)).card
    upload = storage.upload_file

    def killed_after_model_pt(src: str | Path, uri: str, *, kms_key: str | None = None) -> None:
        upload(src, uri, kms_key=kms_key)
        if uri.endswith(f"/{MODEL_FILE}"):
            raise Killed

    monkeypatch.setattr(storage, "upload_file", killed_after_model_pt)
    with contextlib.suppress(Killed):
        write_tiny_artifacts(tmp_path, CLASSES, INPUT, output=output)

    assert verify_artifacts(str(run.run_dir)).card.files == published.files


def test_a_relaunch_publishes_other_weights_and_completes_a_publication_killed_midway(tmp_path: Path) -> None:
    """What a relaunch keeps is only the very model it would publish, verified: other weights are published, and so
    is the same model over a directory left incomplete (a file that no longer matches its card)."""
    run = write_tiny_artifacts(tmp_path, CLASSES, INPUT)
    (run.run_dir / "README.md").write_text("cut short")
    assert write_tiny_artifacts(tmp_path, CLASSES, INPUT).artifacts == run.artifacts
    verify_artifacts(str(run.run_dir))

    torch.manual_seed(1)
    other = build_model("resnet18", None, len(CLASSES))
    shipped = ship(run.cfg, other)
    assert shipped.sha256 != run.artifacts.sha256
    assert verify_artifacts(str(run.run_dir)).card.files[MODEL_FILE].sha256 == shipped.sha256


def test_a_relaunch_repairs_a_signature_left_by_a_republication_killed_before_the_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(review) A signed run's evaluation.json cut short: a relaunch republishes the same model and is killed right
    after model.json.sig landed, before model.json, so the old card sits beside a signature of the new one. Every
    file the card lists verifies again, and the trainer checks no signature (no FINETUNE_VERIFY_KEYS), so the next
    relaunch keeps that directory for good: a signed-only consumer refuses the model for ever."""
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    monkeypatch.setenv("FINETUNE_SIGNING_KEY", private.private_bytes(*PEM).decode())
    output = {"exports": ["state_dict"], "sign": True}
    run = write_tiny_artifacts(tmp_path, CLASSES, INPUT, output=output)
    (run.run_dir / "evaluation.json").write_text("{")
    upload = storage.upload_file

    def killed_after_the_signature(src: str | Path, uri: str, *, kms_key: str | None = None) -> None:
        upload(src, uri, kms_key=kms_key)
        if uri.endswith("/model.json.sig"):
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(storage, "upload_file", killed_after_the_signature)
        with contextlib.suppress(Killed):
            write_tiny_artifacts(tmp_path, CLASSES, INPUT, output=output)
    write_tiny_artifacts(tmp_path, CLASSES, INPUT, output=output)  # the next relaunch

    monkeypatch.setenv("FINETUNE_VERIFY_KEYS", base64.b64encode(raw).decode())
    verify_artifacts(str(run.run_dir))


def test_a_relaunch_restores_a_missing_signature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(review) The smallest form of the above: a signed card whose model.json.sig is gone is kept as published."""
    monkeypatch.setenv("FINETUNE_SIGNING_KEY", Ed25519PrivateKey.generate().private_bytes(*PEM).decode())
    output = {"exports": ["state_dict"], "sign": True}
    run = write_tiny_artifacts(tmp_path, CLASSES, INPUT, output=output)
    (run.run_dir / "model.json.sig").unlink()
    write_tiny_artifacts(tmp_path, CLASSES, INPUT, output=output)
    assert (run.run_dir / "model.json.sig").exists()
