"""``rank_zero.from_rank_zero``: rank 0 computes, every rank gets its result or its one-line error. The table runs
the ranks over a recorded broadcast; the last test runs two real processes on a gloo process group."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finetune_trainer.errors import TrainerError, WeightsError
from finetune_trainer.rank_zero import from_rank_zero, torch_broadcast


def _ranks(compute: Callable[[int], Callable[[], Any]], world: int = 3) -> list[tuple[str, Any]]:
    """Each rank's outcome, ``("ok", value)`` or ``(exception type name, message)``, rank 0 first (a broadcast sends
    what rank 0 passed to the ranks after it)."""
    sent: list[Any] = []

    def broadcast(data: Any) -> Any:
        if not sent:
            sent.append(data)
        return sent[0]

    outcomes: list[tuple[str, Any]] = []
    for rank in range(world):
        try:
            outcomes.append(("ok", from_rank_zero(compute(rank), rank, world, broadcast)))
        except Exception as e:
            outcomes.append((type(e).__name__, str(e)))
    return outcomes


def _only_rank_zero(value: Callable[[], Any]) -> Callable[[int], Callable[[], Any]]:
    def compute(rank: int) -> Callable[[], Any]:
        def run() -> Any:
            assert rank == 0, f"rank {rank} computed what rank 0 shares"
            return value()

        return run

    return compute


def _raise(e: Exception) -> Callable[[], Any]:
    def run() -> Any:
        raise e

    return run


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # rank 0's result on every rank: a listing, as data.build_datasets gets it
        (lambda: (["a", "b"], [("s3://x/a/1.png", 0)]), [("ok", (["a", "b"], [("s3://x/a/1.png", 0)]))] * 3),
        (lambda: None, [("ok", None)] * 3),
        # the job's input at fault: the same one line on every rank
        (
            _raise(TrainerError("dataset.trainUri: s3://x: cannot list: NoSuchBucket")),
            [("TrainerError", "dataset.trainUri: s3://x: cannot list: NoSuchBucket")] * 3,
        ),
        (
            _raise(WeightsError("weights_uri w.pt does not fit resnet18")),
            [("TrainerError", "weights_uri w.pt does not fit resnet18")] * 3,
        ),
        # a bug: rank 0 raises it as it is, the others say that rank 0 failed and how
        (
            _raise(KeyError("classes")),
            [("KeyError", "'classes'")]
            + [("RuntimeError", "rank 0 failed on what it works out for every worker: KeyError: 'classes'")] * 2,
        ),
    ],
)
def test_rank_zero_computes_and_every_rank_gets_the_result(value: Callable[[], Any], expected: list[tuple[str, Any]]) -> None:
    assert _ranks(_only_rank_zero(value)) == expected


def test_one_worker_computes_without_a_broadcast() -> None:
    def no_broadcast(data: Any) -> Any:
        raise AssertionError("a single worker broadcast")

    assert from_rank_zero(lambda: 7, 0, 1, no_broadcast) == 7
    with pytest.raises(TrainerError, match="bad"):
        from_rank_zero(_raise(TrainerError("bad")), 0, 1, no_broadcast)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gloo_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    broadcast = torch_broadcast(torch.device("cpu"))
    calls: list[str] = []
    lines = []

    def listing() -> Any:
        calls.append("listing")
        # Large enough to need more than one gloo message: ImageNet's listing is ~100 MB pickled.
        return (["a", "b"], [(f"s3://bucket/{'ab'[i % 2]}/{i:07d}.jpg", i % 2) for i in range(50_000)])

    classes, samples = from_rank_zero(listing, rank, world, broadcast)
    lines.append(f"value {len(classes)} {len(samples)} {samples[-1][0]}")
    try:
        from_rank_zero(_raise(TrainerError("dataset.trainUri: s3://x: no such bucket")), rank, world, broadcast)
    except TrainerError as e:
        lines.append(f"user error {e}")
    lines.append(f"computed {len(calls)}")
    dist.destroy_process_group()
    Path(out, f"rank{rank}").write_text("\n".join(lines))


def test_two_processes_on_gloo_share_rank_zeros_listing(tmp_path: Path) -> None:
    mp.spawn(_gloo_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    rank0, rank1 = ((tmp_path / f"rank{r}").read_text().splitlines() for r in range(2))
    shared = ["value 2 50000 s3://bucket/b/0049999.jpg", "user error dataset.trainUri: s3://x: no such bucket"]
    assert rank0 == [*shared, "computed 1"]
    assert rank1 == [*shared, "computed 0"]


def _slow_rank(rank: int, world: int, port: int, out: str, barrier: Any) -> None:
    import datetime
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A process group whose collectives give up after 2 s, and a listing that takes 4.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=2))
    broadcast = torch_broadcast(torch.device("cpu"), wait=barrier.wait)

    def listing() -> Any:
        time.sleep(4)
        return ["a", "b"]

    result = from_rank_zero(listing, rank, world, broadcast)
    dist.destroy_process_group()
    Path(out, f"rank{rank}").write_text(" ".join(result))


def test_a_listing_longer_than_the_process_groups_timeout_is_waited_for(tmp_path: Path) -> None:
    """The workers wait for rank 0 in a barrier without a deadline (Ray Train's, in a run), not in the broadcast,
    which would time out with the process group's collectives (gloo here: 2 s)."""
    barrier = mp.get_context("spawn").Barrier(2)
    mp.spawn(_slow_rank, args=(2, _free_port(), str(tmp_path), barrier), nprocs=2, join=True)

    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["a b", "a b"]
