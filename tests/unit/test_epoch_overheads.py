"""What each epoch's report costs besides the checkpoint (issue 14 item 4): ``metrics.jsonl`` is read once per
attempt, not before every epoch's write (one PUT per epoch on an object store, no GET), and the random states
go to rank 0 alone (a gather, not an all-gather)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from finetune_trainer import metrics_log, storage
from finetune_trainer.metrics_log import EpochRecord, MetricsLog, read_metrics
from finetune_trainer.seeding import gather_rng_states


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
