"""Frozen-backbone checkpoints (issue 14 item 4): a probe stage's checkpoint stores only what trains, with the
starting weights' reference and sha256; a resume rebuilds the model from those weights, checks the sha256 and
loads the stored part. On the CPU, no Ray runtime; resnet18 with random starting weights (no download)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune_trainer.checkpoint import TrainState, full_weights, read_checkpoint, restore_model, stored_weights
from finetune_trainer.errors import TrainerError
from finetune_trainer.model import StartingWeights, build_model, starting_weights
from finetune_trainer.resume import read_weights
from finetune_trainer.sealing import Keyring, is_sealed_file
from finetune_trainer.strategy import apply_strategy, set_train_mode
from tests.support.checkpoints import save_checkpoint

FP = "fp-probe"
KEY = base64.b64encode(bytes(range(32))).decode()
HEAD = {"fc.weight", "fc.bias"}
STATE = TrainState(epoch=1, stage="probe")


def resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # as the loop seeds before building: the same model on every rank and attempt
    return build_model("resnet18", None, 5)


def probe(model: nn.Module, freeze_batch_norm: bool = True) -> StartingWeights:
    """Fingerprint ``model`` as built, freeze its backbone (linear probe) and train it a little."""
    start = starting_weights(model, "resnet18 random (seed 0)", keep=True)
    groups = apply_strategy(model, "linear-probe", freeze_batch_norm=freeze_batch_norm)
    optimizer = torch.optim.SGD(groups.parameters(), lr=0.5)
    set_train_mode(model, frozen_bn=freeze_batch_norm)
    torch.manual_seed(1)
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    return start


def test_a_linear_probe_checkpoint_stores_the_head_alone(tmp_path: Path) -> None:
    model = resnet18()
    start = probe(model)
    full = save_checkpoint(tmp_path / "full", model, STATE, FP)  # what every epoch wrote before
    partial = save_checkpoint(tmp_path / "probe", model, STATE, FP, frozen_from=start)
    saved = torch.load(partial, weights_only=True)
    assert set(saved["model"]) == HEAD
    assert saved["base"] == {"reference": "resnet18 random (seed 0)", "sha256": start.sha256}
    assert set(torch.load(full, weights_only=True)["model"]) == set(model.state_dict())
    # resnet18 with 5 classes: 44.7 MB before, the head's 2,565 numbers (about 13 kB with the rest) after.
    print(f"resnet18 linear-probe checkpoint: {full.stat().st_size} bytes whole, {partial.stat().st_size} head only")
    assert partial.stat().st_size * 100 < full.stat().st_size


def test_batch_norm_statistics_that_moved_are_stored_too(tmp_path: Path) -> None:
    """Without freezeBatchNorm a probe's BatchNorm layers keep adapting their statistics in train mode: those
    buffers differ from the starting weights and are stored; the frozen convolutions are not."""
    model = resnet18()
    start = probe(model, freeze_batch_norm=False)
    stored, base = stored_weights(model, start)
    assert base is not None and set(stored) > HEAD
    assert "bn1.running_mean" in stored and "layer4.1.bn2.num_batches_tracked" in stored
    assert not any(k.endswith(("conv1.weight", "bn1.weight")) for k in stored)  # frozen parameters


def test_resume_rebuilds_the_probed_model_bit_for_bit(tmp_path: Path) -> None:
    model = resnet18()
    start = probe(model, freeze_batch_norm=False)
    save_checkpoint(tmp_path / "ckpt", model, STATE, FP, frozen_from=start)
    data = read_checkpoint(tmp_path / "ckpt", FP, "run")

    rebuilt = resnet18()  # the relaunched attempt builds the model from its starting weights again
    restore_model(rebuilt, data, starting_weights(rebuilt, "resnet18 random (seed 0)"))
    expected, found = model.state_dict(), rebuilt.state_dict()
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[k], found[k]) for k in expected)
    # What ships the best (probe) epoch: the starting weights' copy with the stored part on top.
    shipped = read_weights(str(tmp_path), "ckpt", FP, start=start)
    assert all(torch.equal(expected[k], shipped[k]) for k in expected)


def test_other_starting_weights_fail_in_one_line(tmp_path: Path) -> None:
    model = resnet18()
    save_checkpoint(tmp_path / "ckpt", model, STATE, FP, frozen_from=probe(model))
    data = read_checkpoint(tmp_path / "ckpt", FP, "run")
    other = resnet18(seed=7)  # a weights file replaced since: another backbone under the same name
    with pytest.raises(TrainerError) as info:
        restore_model(other, data, starting_weights(other, "s3://models/base.pt"), "the checkpoint of epoch 1")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("the checkpoint of epoch 1: stores only what trains on top of resnet18 random (seed 0)")
    assert "this job starts from s3://models/base.pt" in message
    with pytest.raises(TrainerError, match="this job starts from no starting weights"):
        full_weights(data, None)


def test_a_sealed_probe_checkpoint_resumes_with_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = resnet18()
    start = probe(model)
    path = save_checkpoint(tmp_path / "ckpt", model, STATE, FP, keyring=Keyring.parse(f"k1:{KEY}"), frozen_from=start)
    assert is_sealed_file(path)
    monkeypatch.setenv("FINETUNE_ENCRYPTION_KEY", f"k1:{KEY}")
    data = read_checkpoint(tmp_path / "ckpt", FP, "run", encrypted=True)
    assert set(data["model"]) == HEAD
    rebuilt = resnet18()
    restore_model(rebuilt, data, starting_weights(rebuilt, "resnet18 random (seed 0)"))
    assert torch.equal(rebuilt.state_dict()["fc.weight"], model.state_dict()["fc.weight"])


def test_a_frozen_backbone_checkpoint_missing_a_trained_tensor_is_refused() -> None:
    """Review F13: only unexpected keys were checked, so a checkpoint without the head's bias resumed silently with
    that tensor at its fresh initialisation beside a restored optimizer."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    backbone = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("0.")}
    start = StartingWeights("backbone", "f" * 64, backbone)
    data = {"base": {"reference": "backbone", "sha256": "f" * 64}, "model": {"1.weight": torch.ones(2, 4)}}
    with pytest.raises(TrainerError, match=r"1\.bias") as info:
        restore_model(model, data, start, "checkpoint_epoch_0001")
    assert "\n" not in str(info.value) and str(info.value).startswith("checkpoint_epoch_0001: lacks tensors that trained")


def test_a_probe_checkpoint_without_its_head_bias_is_refused(tmp_path: Path) -> None:
    model = resnet18()
    save_checkpoint(tmp_path / "ckpt", model, STATE, FP, frozen_from=probe(model))
    data = read_checkpoint(tmp_path / "ckpt", FP, "run")
    del data["model"]["fc.bias"]
    rebuilt = resnet18()
    with pytest.raises(TrainerError, match=r"the checkpoint of epoch 1: lacks tensors that trained \(fc\.bias\)"):
        restore_model(rebuilt, data, starting_weights(rebuilt, "resnet18 random (seed 0)"), "the checkpoint of epoch 1")
