"""What rank 0 works out once and every worker then uses: ``from_rank_zero``.

Why the workers must not each work it out themselves: the dataset's listing (and the ingest path that depends on
its size) is of a folder or bucket that can change while a job starts. Ranks that list it a second apart can see
different files, split them differently and run different numbers of steps: a collective that never completes,
not an error. Listing once also makes one listing's requests to an object store instead of one per worker
(ImageNet on s3: 1.28 M objects, over a thousand requests, per rank).

The value crosses with ``torch.distributed.broadcast_object_list`` on the job's own process group (gloo or NCCL,
set up by Ray Train before the training function runs): any size, nothing left in Ray's object store, and Ray
Train's ``broadcast_from_rank_zero`` carries only about a kilobyte. A user error on rank 0 (a ``TrainerError``: no
such bucket, too few images) is raised on every rank, so the job fails with that one line whichever rank Ray Train
reports first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from finetune_trainer.errors import TrainerError, WeightsError

__all__ = ["from_rank_zero", "torch_broadcast"]

T = TypeVar("T")

Broadcast = Callable[[Any], Any]
"""Rank 0's argument, returned on every rank (the others pass None)."""


def torch_broadcast(device: torch.device, wait: Callable[[], None] | None = None) -> Broadcast:
    """``broadcast_object_list`` from rank 0 on the default process group, staged on ``device`` (NCCL needs the
    worker's own GPU; gloo the CPU). ``wait``: a barrier without a deadline, entered first (Ray Train's: it only
    warns, once a minute, naming the ranks not there yet). The process group's collectives time out (Ray Train's
    default: 30 minutes) and a listing of tens of millions of objects can take longer; the broadcast itself then
    starts when rank 0 is ready."""

    def broadcast(data: Any) -> Any:
        if wait is not None:
            wait()
        box = [data]
        torch.distributed.broadcast_object_list(box, src=0, device=device)
        return box[0]

    return broadcast


def from_rank_zero(compute: Callable[[], T], rank: int, world: int, broadcast: Broadcast) -> T:
    """``compute()`` run on rank 0 alone and its result returned on every rank. Every rank calls this, in the same
    order (it is a collective); one worker computes it without a broadcast."""
    if world == 1:
        return compute()
    message: tuple[str, Any] | None = None
    error: Exception | None = None
    if rank == 0:
        try:
            message = ("value", compute())
        except (TrainerError, WeightsError) as e:
            message = ("user error", str(e))
        except Exception as e:  # a bug: rank 0 raises it as it is, the others say where it happened
            error = e
            message = ("failed", f"{type(e).__name__}: {e}"[:500])
    kind, payload = broadcast(message)
    if kind == "user error":
        raise TrainerError(payload)
    if kind == "failed":
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed on what it works out for every worker: {payload}")
    return payload  # type: ignore[no-any-return]
