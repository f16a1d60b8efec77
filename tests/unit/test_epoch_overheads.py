"""What each epoch's report costs besides the checkpoint (issue 14 item 4): ``metrics.jsonl`` is read once per
attempt, not before every epoch's write (one PUT per epoch on an object store, no GET), and the random states
go to rank 0 alone (a gather, not an all-gather); the checkpoint is written once, straight into a local run
directory (whole or not at all), and hashed as it is written."""

from __future__ import annotations

import contextlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray.train
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.utils.serialization
from torch import nn

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer import metrics_log, storage, worker_report
from finetune_trainer.checkpoint import CHECKPOINT_FILE, CHECKSUM_FILE, TrainState, checkpoint_dir_name, read_checkpoint
from finetune_trainer.engine import Precision
from finetune_trainer.metrics_log import EpochRecord, MetricsLog, read_metrics
from finetune_trainer.sealing import Keyring
from finetune_trainer.seeding import gather_rng_states
from finetune_trainer.worker_report import Worker
from tests.support.checkpoints import save_checkpoint


def record(epoch: int, lr: float = 0.1) -> EpochRecord:
    return EpochRecord(epoch, "probe", 1.0, 1.0, 0.5, None, 10.0, 1.0, lr)


def test_the_metrics_log_is_read_once_per_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = str(tmp_path)
    for epoch in (1, 2, 3):  # an earlier attempt wrote epochs 1-3
        metrics_log.append_metrics(run, record(epoch))
    reads: list[str] = []
    real = storage.read_text

    def counted(uri: str) -> str:
        reads.append(uri)
        return real(uri)

    monkeypatch.setattr(storage, "read_text", counted)
    log = MetricsLog(run)  # the resumed attempt continues after epoch 2 (it re-runs epoch 3)
    for epoch in (3, 4, 5):
        log.append(record(epoch, lr=0.2))
    assert len(reads) == 1
    monkeypatch.undo()
    assert [(r.epoch, r.lr) for r in read_metrics(run)] == [(1, 0.1), (2, 0.1), (3, 0.2), (4, 0.2), (5, 0.2)]


def _gather(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        states = gather_rng_states()
        Path(f"{out}.{rank}").write_text("none" if states is None else str(len(states)))
    finally:
        dist.destroy_process_group()


def test_random_states_are_gathered_onto_rank_0_alone(tmp_path: Path) -> None:
    out = str(tmp_path / "states")
    mp.spawn(_gather, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    assert Path(f"{out}.0").read_text() == "2"  # every worker's states, for rank 0's checkpoint
    assert Path(f"{out}.1").read_text() == "none"  # before: all of them, on every rank, every epoch


# ------------------------------------------------------------------------ the checkpoint, written once
def _worker(output_root: str) -> Worker:
    spec = FineTuneJobSpec.model_validate(
        {"model": {"name": "resnet18"}, "dataset": {"format": "digits"}, "output": {"uri": output_root}}
    )
    cfg = TrainerConfig(job_name="job", spec=spec, output_root=output_root)
    model = nn.Linear(4, 3)
    precision = Precision(torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False))
    return Worker(
        cfg,
        cfg.spec_fingerprint(),
        0,
        1,
        torch.device("cpu"),
        model,
        ["a", "b", "c"],
        precision,
        nn.CrossEntropyLoss(),
        None,
        None,
    )


@dataclass
class Reported:
    path: str
    mode: object
    files: list[str]
    """The checkpoint directory's files when report() was called (a temporary one is gone afterwards)."""


def _report(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> tuple[Reported, list[str]]:
    """One epoch's ``report_epoch`` on rank 0 with ``ray.train.report`` recorded; (what it was handed, the
    files ``storage.sha256_file`` read back)."""
    calls: list[Reported] = []
    hashed: list[str] = []

    def report(metrics: dict[str, Any], *, checkpoint: ray.train.Checkpoint, checkpoint_dir_name: str, **kw: Any) -> None:
        files = sorted(p.name for p in Path(checkpoint.path).iterdir())
        calls.append(Reported(checkpoint.path, kw.get("checkpoint_upload_mode", ray.train.CheckpointUploadMode.SYNC), files))

    real_sha = storage.sha256_file

    def sha(path: str | Path) -> str:
        hashed.append(str(path))
        return real_sha(path)

    monkeypatch.setattr(ray.train, "report", report)  # looked up by worker_report at each call
    monkeypatch.setattr(storage, "sha256_file", sha)
    optimizer = torch.optim.SGD(worker.model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = TrainState(epoch=1, stage="fine-tune")
    worker_report.report_epoch(worker, record(1), state, optimizer, scheduler, {})
    (call,) = calls
    return call, hashed


def test_a_local_run_dir_gets_the_checkpoint_written_once_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = _worker(str(tmp_path))
    call, hashed = _report(worker, monkeypatch)
    name = checkpoint_dir_name(1)
    # Where Ray Train would have copied it (its run dir, RunConfig(storage_path, name)), and no copy asked for;
    # before: a temporary directory, copied by Ray (SYNC).
    assert Path(call.path) == tmp_path / "job" / name
    assert call.mode == ray.train.CheckpointUploadMode.NO_UPLOAD
    assert call.files == [CHECKPOINT_FILE, CHECKSUM_FILE]
    assert hashed == []  # hashed as written, never read back for its checksum
    assert read_checkpoint(call.path, worker.cfg.spec_fingerprint(), worker.cfg.run_dir)["train_state"].epoch == 1
    # The staging directory is gone: the run dir holds the metrics log and the checkpoint alone.
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == sorted([name, "metrics.jsonl"])


def test_an_object_store_run_dir_gets_a_temporary_directory_that_ray_uploads(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = _worker("s3://bucket/out")
    monkeypatch.setattr(worker_report, "MetricsLog", lambda run_dir: SimpleNamespace(append=lambda record: None))
    call, _ = _report(worker, monkeypatch)
    assert call.mode == ray.train.CheckpointUploadMode.SYNC  # uploaded before report() returns
    assert call.files == [CHECKPOINT_FILE, CHECKSUM_FILE]
    assert not Path(call.path).exists()  # the local copy goes once Ray has uploaded it


def test_an_encrypted_checkpoint_is_never_in_the_clear_under_the_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ring = Keyring({"k1": bytes(32)}, "k1")
    monkeypatch.setattr(worker_report, "keyring_for", lambda cfg: ring)
    seen: list[str] = []
    real_save = torch.save

    def save(obj: object, f: Any) -> None:
        seen.append(str(f))  # where the clear bytes go, before sealing
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    worker = _worker(str(tmp_path / "out"))
    call, _ = _report(worker, monkeypatch)
    assert call.mode == ray.train.CheckpointUploadMode.SYNC  # the sealed file, copied by Ray
    assert seen and not any(path.startswith(str(tmp_path / "out")) for path in seen)
    assert not Path(call.path).exists()


def _fail(_: Path) -> None:
    raise OSError("disk full")


@pytest.mark.parametrize("before", [None, "old"], ids=["new", "replaces-leftover"])
@pytest.mark.parametrize("fill", ["ok", "fails"])
def test_an_atomic_directory_appears_whole_or_not_at_all(tmp_path: Path, before: str | None, fill: str) -> None:
    target = tmp_path / "checkpoint_epoch_0002"
    (tmp_path / ".checkpoint_epoch_0002.0123456789ab.tmp").mkdir()  # a killed writer's staging
    if before is not None:
        target.mkdir()
        (target / "checkpoint.pt").write_text(before)
    with contextlib.suppress(OSError), storage.atomic_directory(target) as directory:
        (directory / "checkpoint.pt").write_text("new")
        if fill == "fails":
            _fail(directory)
    expected = {"ok": "new", "fails": before}[fill]
    found = (target / "checkpoint.pt").read_text() if target.exists() else None
    assert found == expected
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_a_checkpoint_is_saved_without_the_zip_crc32_that_nothing_checks(tmp_path: Path) -> None:
    # torch.save computes a CRC32 per record (a third of the CPU of saving resnet18 + AdamW) that torch.load never
    # checks; the checkpoint's sha256, checked before every load, is what protects it (test_checkpoint's damage cases).
    before = torch.utils.serialization.config.save.compute_crc32
    save_checkpoint(tmp_path, nn.Linear(4, 3), TrainState(epoch=1), "fp")
    with zipfile.ZipFile(tmp_path / CHECKPOINT_FILE) as archive:
        crcs = {info.filename: info.CRC for info in archive.infolist()}
    assert crcs and set(crcs.values()) == {0}, crcs  # torch writes 0 where it computes none
    assert torch.utils.serialization.config.save.compute_crc32 == before  # process-wide: left as found
    assert read_checkpoint(tmp_path, "fp", "runs/x")["train_state"].epoch == 1
