"""Checkpoints and the training state they carry (issue 11 items 1, 2, 9), on the CPU without a Ray runtime:
per-stage early stopping, the best epoch on ties (Ray's retention rule), checksums, the fallback from a
corrupt checkpoint to an older one, and a CPU checkpoint resumed under fp16 autocast with a live GradScaler."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import ray.train
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune_trainer.checkpoint import (
    CHECKPOINT_FILE,
    CHECKSUM_FILE,
    CorruptCheckpoint,
    TrainState,
    checkpoint_dir_name,
    read_checkpoint,
    restore_training,
)
from finetune_trainer.engine import Precision, train_one_epoch
from finetune_trainer.errors import TrainerError
from finetune_trainer.resume import order_candidates, read_weights, resume_from
from tests.support.checkpoints import save_checkpoint

FP = "fp-1"


def save(directory: Path, state: TrainState, seed: int = 0, scaler: torch.amp.GradScaler | None = None) -> nn.Module:
    """A checkpoint of a small model (its weights drawn from ``seed``) in ``directory``; returns the model."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    save_checkpoint(directory, model, state, FP, scaler=scaler)
    return model


def truncate(directory: Path) -> None:
    path = directory / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ------------------------------------------------------------------------------- early stopping
def run_stages(stages: list[tuple[str, int, int]], accuracies: dict[int, float], patience: int, min_delta: float) -> list[int]:
    """The epochs trained, walking ``stages`` (name, first, last) as ``loop._run_stages`` does."""
    state, trained = TrainState(), []
    for name, first, last in stages:
        if state.stage_done(name, last):
            continue
        state.enter_stage(name)
        for epoch in range(max(first, state.epoch + 1), last + 1):
            state.observe(epoch, accuracies.get(epoch, 0.5), min_delta)
            trained.append(epoch)
            if state.bad_epochs >= patience:
                state.stopped_early = True
                break
    return trained


LP_FT = [("probe", 1, 4), ("fine-tune", 5, 10)]


@pytest.mark.parametrize(
    ("accuracies", "patience", "min_delta", "expected"),
    [
        # The probe plateaus at epoch 2: it stops, and fine-tuning still runs (it plateaus too, from epoch 6).
        ({}, 1, 0.0, [1, 2, 5, 6]),
        # A fresh patience at the switch: fine-tuning below the probe's best is not "no improvement" yet.
        ({1: 0.9, 5: 0.2, 6: 0.3, 7: 0.4, 8: 0.4}, 1, 0.0, [1, 2, 5, 6, 7, 8]),
        ({1: 0.9, 5: 0.2, 6: 0.3, 7: 0.4, 8: 0.4, 9: 0.4}, 2, 0.0, [1, 2, 3, 5, 6, 7, 8, 9]),
        # min_delta: a rise of 0.005 is no improvement.
        ({1: 0.5, 2: 0.505, 5: 0.6, 6: 0.7}, 1, 0.01, [1, 2, 5, 6, 7]),
        # No plateau: every epoch of both stages.
        ({e: e / 10 for e in range(1, 11)}, 1, 0.0, list(range(1, 11))),
    ],
)
def test_early_stopping_is_per_stage(accuracies: dict[int, float], patience: int, min_delta: float, expected: list[int]) -> None:
    assert run_stages(LP_FT, accuracies, patience, min_delta) == expected


def test_a_stage_stopped_early_is_resumed_at_the_next_stage() -> None:
    # What a checkpoint written when the probe stopped early holds.
    state = TrainState(
        epoch=2, stage="probe", best_val_accuracy=0.5, best_epoch=1, bad_epochs=1, stopped_early=True, stage_best=0.5
    )
    assert state.stage_done("probe", 4)
    assert not state.stage_done("fine-tune", 10)
    state.enter_stage("fine-tune")
    assert (state.stage, state.bad_epochs, state.stage_best, state.stopped_early) == ("fine-tune", 0, None, False)
    # The best of the whole run is kept across stages.
    assert (state.best_val_accuracy, state.best_epoch) == (0.5, 1)


# ------------------------------------------------------------------------------------------ ties
@pytest.mark.parametrize(
    ("accuracies", "best_epoch"),
    [
        ([0.5, 0.5, 0.5], 3),  # a metric that does not change: the latest, as Ray's retention keeps it
        ([0.5, 0.7, 0.7, 0.6], 3),
        ([0.5, 0.7, 0.6, 0.7], 4),
        ([0.9, 0.5, 0.6], 1),
    ],
)
def test_best_epoch_on_ties_is_the_later_one(accuracies: list[float], best_epoch: int) -> None:
    state = TrainState()
    for epoch, acc in enumerate(accuracies, start=1):
        state.observe(epoch, acc, min_delta=0.0)
    assert state.best_epoch == best_epoch
    assert state.best_checkpoint == checkpoint_dir_name(best_epoch)


def test_best_checkpoint_names_the_lineage_it_was_written_in() -> None:
    state = TrainState(epoch=4, best_val_accuracy=0.6, best_epoch=3, best_checkpoint=checkpoint_dir_name(3), lineage=1)
    state.observe(5, 0.5, 0.0)
    assert state.best_checkpoint == "checkpoint_epoch_0003"
    state.observe(6, 0.6, 0.0)
    assert state.best_checkpoint == "checkpoint_epoch_0006_r1"


# ------------------------------------------------------------------------------------- checksums
def swap(path: Path, make: Callable[[Path], object]) -> None:
    path.unlink()
    make(path)


def write_raw(directory: Path, content: object) -> None:
    """``content`` as the checkpoint file, with its checksum: a forged file, since nothing else authenticates one."""
    buffer = io.BytesIO()
    torch.save(content, buffer)
    (directory / CHECKPOINT_FILE).write_bytes(buffer.getvalue())
    (directory / CHECKSUM_FILE).write_text(hashlib.sha256(buffer.getvalue()).hexdigest() + "\n")


def forge(directory: Path, **parts: object) -> None:
    """The checkpoint in ``directory`` with ``parts`` replaced (the fingerprint kept)."""
    content = torch.load(directory / CHECKPOINT_FILE, weights_only=True)
    write_raw(directory, {**content, **parts})


def test_a_checkpoint_reads_back_with_its_checksum(tmp_path: Path) -> None:
    state = TrainState(epoch=3, stage="probe", best_val_accuracy=0.5, best_epoch=2)
    model = save(tmp_path, state)
    written = hashlib.sha256((tmp_path / CHECKPOINT_FILE).read_bytes()).hexdigest()
    assert (tmp_path / CHECKSUM_FILE).read_text().strip() == written
    data = read_checkpoint(tmp_path, FP, "runs/x")
    assert data["train_state"] == state
    torch.testing.assert_close(data["model"], model.state_dict())


def flip_last_byte(directory: Path) -> None:
    path = directory / CHECKPOINT_FILE
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def flip_a_weight(directory: Path) -> None:
    """One bit of the stored weights: torch.load would load it without a word (it never checks the zip's CRC32)."""
    path = directory / CHECKPOINT_FILE
    raw = bytearray(path.read_bytes())
    torch.manual_seed(0)  # save()'s model
    at = raw.find(nn.Linear(4, 3).weight.detach().numpy().tobytes())
    assert at > 0
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (truncate, r"^checkpoint ckpt: checkpoint\.pt has sha256 \w+…, written as \w+… \(\d+ bytes; truncated or altered\)$"),
        (flip_last_byte, r"^checkpoint ckpt: checkpoint\.pt has sha256 .* truncated or altered\)$"),
        (flip_a_weight, r"^checkpoint ckpt: checkpoint\.pt has sha256 .* truncated or altered\)$"),
        (lambda d: (d / CHECKPOINT_FILE).unlink(), r"^checkpoint ckpt: checkpoint\.pt is unreadable: FileNotFoundError: "),
        # Written before checksums: cut short, a zip archive without its directory (at the end).
        (
            lambda d: ((d / CHECKSUM_FILE).unlink(), truncate(d)),
            r"^checkpoint ckpt: checkpoint\.pt is a zip archive whose directory cannot be read \(truncated or damaged: ",
        ),
        # What someone who can write the run's volume may put there; each was a hang, unbounded memory or a traceback.
        (lambda d: swap(d / CHECKPOINT_FILE, os.mkfifo), r"^checkpoint ckpt: checkpoint\.pt is unreadable: NotAFile: a FIFO, "),
        (
            lambda d: ((d / CHECKSUM_FILE).unlink(), swap(d / CHECKPOINT_FILE, os.mkfifo)),
            r"^checkpoint ckpt: checkpoint\.pt is unreadable: NotAFile: a FIFO, ",
        ),
        (
            lambda d: swap(d / CHECKSUM_FILE, lambda p: p.symlink_to("/dev/zero")),
            r"^checkpoint ckpt: cannot read checkpoint\.sha256: NotAFile: a character device, not a plain file$",
        ),
        (
            lambda d: ((d / CHECKSUM_FILE).unlink(), (d / CHECKPOINT_FILE).write_text("root:x:0:0:root:/root:/bin/bash\n")),
            r"^checkpoint ckpt: checkpoint\.pt is not a zip archive ",
        ),
        (lambda d: write_raw(d, [1, 2]), r"^checkpoint ckpt: checkpoint\.pt holds a list, not a checkpoint$"),
        (lambda d: forge(d, train_state="x"), r"is not a checkpoint of this trainer \(train state: a str\)$"),
        (lambda d: forge(d, train_state={"nope": 1}), r"\(train state: unknown key 'nope'\)$"),
        (lambda d: forge(d, train_state={"epoch": "x" * 10**6}), r"\(train state: epoch 'x{40,}\.\.\.\)$"),
        (lambda d: forge(d, train_state={"stopped_early": 1}), r"\(train state: stopped_early 1\)$"),
        (lambda d: forge(d, model=None), r"is not a checkpoint of this trainer \(model: a NoneType\)$"),
    ],
)
@pytest.mark.timeout(30)
def test_a_damaged_checkpoint_is_corrupt_in_one_line(tmp_path: Path, damage: Callable[[Path], object], message: str) -> None:
    directory = tmp_path / "ckpt"
    save(directory, TrainState(epoch=1))
    damage(directory)
    with pytest.raises(CorruptCheckpoint, match=message) as raised:
        read_checkpoint(directory, FP, "runs/x")
    assert "\n" not in str(raised.value)


# -------------------------------------------------------------------------------------- fallback
@pytest.mark.parametrize(
    ("latest", "names", "expected"),
    [
        ("0003", ["0001", "0003", "0002"], ["0003", "0002", "0001"]),
        # Ray keeps the best and the latest, not every epoch; foreign folders are no candidates.
        ("0009", ["0004", "0009", ".tmp", "model.pt", "checkpoint_epoch_x"], ["0009", "0004"]),
        # After a fallback: by epoch, then by lineage; an older lineage only before the epochs a newer one re-ran
        # (lineage 1 began at epoch 4 or before: lineage 0's 0004 and 0005 were abandoned).
        ("0006_r1", ["0005", "0005_r1", "0004", "0006_r1", "0004_r1"], ["0006_r1", "0005_r1", "0004_r1"]),
        ("0006_r1", ["0002", "0003", "0004_r1", "0005_r1", "0006_r1"], ["0006_r1", "0005_r1", "0004_r1", "0003", "0002"]),
        # Two fallbacks: lineage 2 began at epoch 3, lineage 1 at epoch 5 (or before).
        ("0004_r2", ["0001", "0002", "0005", "0006_r1", "0005_r1", "0003_r2", "0004_r2"], ["0004_r2", "0003_r2", "0002", "0001"]),
        # Later epochs than Ray's latest, and its own epoch in another lineage, were never registered.
        ("0003", ["0001", "0002", "0003", "0004", "0003_r1"], ["0003", "0002", "0001"]),
    ],
)
def test_fallback_order_is_newest_first(latest: str, names: list[str], expected: list[str]) -> None:
    def full(n: str) -> str:
        return n if not n[0].isdigit() else f"checkpoint_epoch_{n}"

    assert order_candidates(full(latest), [full(n) for n in names]) == [full(n) for n in expected]


def write_run(run: Path, epochs: int) -> dict[int, nn.Module]:
    """Checkpoints of epochs 1..``epochs`` in ``run``, as the loop names them."""
    models = {}
    state = TrainState()
    for epoch in range(1, epochs + 1):
        state.observe(epoch, 0.5, 0.0)
        models[epoch] = save(run / checkpoint_dir_name(epoch), copy.deepcopy(state), seed=epoch)
    return models


def latest_of(run: Path, epoch: int) -> ray.train.Checkpoint:
    return ray.train.Checkpoint(path=str(run / checkpoint_dir_name(epoch)))


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path: Path) -> None:
    run = tmp_path / "job"
    models = write_run(run, 3)
    truncate(run / checkpoint_dir_name(3))

    resumed = resume_from(latest_of(run, 3), FP, str(run))

    state = resumed.data["train_state"]
    assert state.epoch == 2
    torch.testing.assert_close(resumed.data["model"], models[2].state_dict())
    # Re-run epochs get names of their own: the abandoned checkpoint_epoch_0003 is never written into.
    assert state.lineage == 1
    assert checkpoint_dir_name(3, state.lineage) == "checkpoint_epoch_0003_r1"
    (warning,) = resumed.warnings
    assert warning.startswith("checkpoint checkpoint_epoch_0003: checkpoint.pt has sha256 ")
    assert warning.endswith("; resumed from checkpoint checkpoint_epoch_0002 (epoch 2)")
    assert "\n" not in warning


def test_an_intact_latest_checkpoint_resumes_without_warnings(tmp_path: Path) -> None:
    run = tmp_path / "job"
    write_run(run, 2)
    resumed = resume_from(latest_of(run, 2), FP, str(run))
    assert (resumed.data["train_state"].epoch, resumed.data["train_state"].lineage, resumed.warnings) == (2, 0, [])


def test_no_usable_checkpoint_fails_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "job"
    write_run(run, 2)
    for epoch in (1, 2):
        truncate(run / checkpoint_dir_name(epoch))
    expected = r"^output: no usable checkpoint in .*job: checkpoint checkpoint_epoch_0002: .*; checkpoint checkpoint_epoch_0001: "
    with pytest.raises(TrainerError, match=expected) as raised:
        resume_from(latest_of(run, 2), FP, str(run))
    assert "\n" not in str(raised.value)
    assert not isinstance(raised.value, CorruptCheckpoint)


def test_a_newer_checkpoint_ray_never_registered_is_no_fallback(tmp_path: Path) -> None:
    """checkpoint_epoch_0004 renamed into place by rank 0, then the attempt was killed before ``ray.train.report``
    recorded it: Ray hands back epoch 3 (corrupt here), and the run falls back to epoch 2, behind Ray's latest,
    never ahead of it to an epoch that was never reported (no MLflow points, no status, unknown to Ray's retention)."""
    run = tmp_path / "job"
    write_run(run, 4)
    truncate(run / checkpoint_dir_name(3))

    resumed = resume_from(latest_of(run, 3), FP, str(run))

    state = resumed.data["train_state"]
    assert state.epoch == 2
    # Past every lineage on disk, the unreported folder too: re-run epochs never write into it.
    assert state.lineage == 1
    (warning,) = resumed.warnings
    assert warning.endswith("; resumed from checkpoint checkpoint_epoch_0002 (epoch 2)")


def test_a_checkpoint_of_another_spec_is_not_skipped_but_refused(tmp_path: Path) -> None:
    run = tmp_path / "job"
    write_run(run, 2)
    with pytest.raises(TrainerError, match="holds checkpoints of a different spec"):
        resume_from(latest_of(run, 2), "another", str(run))


def test_a_forged_fingerprint_is_shown_shortened(tmp_path: Path) -> None:
    """A checkpoint's fingerprint is the file's to say: a megabyte of it was the whole message."""
    save(tmp_path, TrainState(epoch=1))
    forge(tmp_path, fingerprint="f" * 10**6)
    with pytest.raises(TrainerError, match=r"\(fingerprint 'f{40,}\.\.\., this job 'fp-1'\)") as raised:
        read_checkpoint(tmp_path, FP, "runs/x")
    assert len(str(raised.value)) < 400


def test_read_weights_of_a_named_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "job"
    models = write_run(run, 3)
    torch.testing.assert_close(read_weights(str(run), checkpoint_dir_name(2), FP), models[2].state_dict())
    truncate(run / checkpoint_dir_name(2))
    with pytest.raises(CorruptCheckpoint):
        read_weights(str(run), checkpoint_dir_name(2), FP)


# ------------------------------------------------------------------------------- device, precision
def test_a_cpu_checkpoint_resumes_under_fp16_with_a_live_scaler(tmp_path: Path) -> None:
    """What a CPU (fp32) run's checkpoint meets on a GPU with mixedPrecision fp16: a live GradScaler and
    fp16 autocast. No GPU here, so the CPU's own fp16 autocast and GradScaler stand in for CUDA's."""
    save(tmp_path, TrainState(epoch=1))  # a disabled scaler, as every CPU run has: its state is {}
    data = read_checkpoint(tmp_path, FP, "runs/x")
    assert data["scaler"] == {}
    assert all(t.device.type == "cpu" for t in data["model"].values())

    model = nn.Linear(4, 3)
    model.load_state_dict(data["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    restore_training(data, optimizer, scheduler, scaler)  # GradScaler.load_state_dict({}) would raise here

    assert scaler.get_scale() == torch.amp.GradScaler("cpu", enabled=True).get_scale()  # a fresh fp16 run's scale
    precision = Precision(torch.device("cpu"), torch.float16, scaler)
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])), batch_size=4)
    before = copy.deepcopy(model.state_dict())
    loss_sum, seen = train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, scheduler, precision, 1.0, frozen_bn=False)
    assert seen == 8 and torch.isfinite(torch.tensor(loss_sum))
    assert model.weight.dtype == torch.float32  # autocast computes in fp16; the weights stay fp32
    assert not torch.equal(model.weight, before["weight"])


def test_a_live_scalers_state_resumes_on_the_cpu(tmp_path: Path) -> None:
    """The way back: an fp16 run's scaler state into a disabled scaler (a CPU run) is ignored, not an error."""
    live = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    save(tmp_path, TrainState(epoch=1), scaler=live)
    data = read_checkpoint(tmp_path, FP, "runs/x")
    assert data["scaler"]["scale"] == 1024.0
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    restore_training(data, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))
    assert optimizer.state_dict()["param_groups"][0]["momentum"] == 0.9


def test_a_fallback_never_resurrects_the_unregistered_checkpoint_of_an_abandoned_lineage(tmp_path: Path) -> None:
    """(review) The unregistered checkpoint_epoch_0004 of the test above, two attempts later: lineage 1 re-ran epochs
    3..5, Ray's retention (keep_checkpoints: 2) deleted checkpoint_epoch_0004_r1, and checkpoint_epoch_0005_r1 is
    corrupt. The fallback must be lineage 1's epoch 3, never lineage 0's abandoned epoch 4 that Ray never registered."""
    run = tmp_path / "job"
    write_run(run, 4)
    truncate(run / checkpoint_dir_name(3))
    assert resume_from(latest_of(run, 3), FP, str(run)).data["train_state"].epoch == 2  # lineage 1 forks at epoch 2
    for epoch in (3, 4, 5):
        save(run / checkpoint_dir_name(epoch, 1), TrainState(epoch=epoch, lineage=1), seed=10 + epoch)
    shutil.rmtree(run / checkpoint_dir_name(4, 1))  # Ray's retention
    truncate(run / checkpoint_dir_name(5, 1))

    resumed = resume_from(ray.train.Checkpoint(path=str(run / checkpoint_dir_name(5, 1))), FP, str(run))

    (warning,) = resumed.warnings
    assert warning.endswith("; resumed from checkpoint checkpoint_epoch_0003_r1 (epoch 3)")


def test_no_usable_earlier_checkpoint_names_the_later_one_it_ignored(tmp_path: Path) -> None:
    """(review) Ray's latest (epoch 1) corrupt, an intact checkpoint_epoch_0002 renamed into place but never
    reported: the run fails, as it should, in one line; that line names only epoch 1 and tells the user to delete
    the folder, silently discarding the intact epoch 2 it never mentions."""
    run = tmp_path / "job"
    write_run(run, 2)
    truncate(run / checkpoint_dir_name(1))
    with pytest.raises(TrainerError) as raised:
        resume_from(latest_of(run, 1), FP, str(run))
    assert "checkpoint_epoch_0002" in str(raised.value)
