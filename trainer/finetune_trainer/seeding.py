"""Every random number of a run comes from ``hyperparameters.seed``: which generator is seeded from
what, and how their states travel in a checkpoint so that a resumed run continues exactly.

- Model initialisation: the same seed on every worker (``seed_everything``), as DDP starts from one model.
- After it, each worker's global generators (dropout, stochastic depth) get a seed of their own
  (``rank_seed``), as do its DataLoader's generator (``loader_generator``) and loader processes
  (``seed_loader_worker``, NumPy included, which torch leaves alike in every loader process).
- Training augmentation is a function of ``(seed, epoch, image index)`` alone (``EpochSampler`` hands
  the epoch to ``SeededSamples``): two workers never crop or flip their k-th images alike, and the
  crops do not depend on the number of workers or loader processes, nor on a restart.
- ``rng_state`` / ``set_rng_state``: Python's, NumPy's, torch's and CUDA's generators as a checkpoint
  holds them (plain values and tensors, loadable with ``weights_only``), one entry per worker
  (``gather_rng_states``). The sampler needs none: its order is a function of ``(seed, epoch)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "EpochSampler",
    "SeededSamples",
    "derive_seed",
    "gather_rng_states",
    "loader_generator",
    "rank_seed",
    "rng_state",
    "sample_seed",
    "seed_everything",
    "seed_loader_worker",
    "seeded_sample",
    "set_rng_state",
]

# Distinct streams derived from one seed, so that no two uses draw the same numbers.
_RANK: Final = 1
_LOADER: Final = 2
_SAMPLE: Final = 3


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream ``keys`` of ``seed`` (NumPy's SeedSequence: unrelated streams for
    neighbouring keys, unlike ``seed + rank``, which makes rank 1 of seed 0 the rank 0 of seed 1)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def rank_seed(seed: int, rank: int) -> int:
    """The seed of worker ``rank``'s global generators once the model is built."""
    return derive_seed(seed, _RANK, rank)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the augmentation of image ``index`` in ``epoch``."""
    return derive_seed(seed, _SAMPLE, epoch, index)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CUDA's too: ``manual_seed`` seeds every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_generator(seed: int, rank: int) -> torch.Generator:
    """A DataLoader's own generator: the base seed of its loader processes is drawn from it, per worker,
    rather than from the global generator (whose draws would then depend on when loaders start)."""
    return torch.Generator().manual_seed(derive_seed(seed, _LOADER, rank))


def seed_loader_worker(worker_id: int) -> None:
    """``worker_init_fn``: torch seeds a loader process's torch and Python generators from the loader's
    base seed + ``worker_id``, not NumPy's, which every process would inherit alike."""
    np.random.seed(torch.initial_seed() % 2**32)


class EpochSampler(DistributedSampler[Any]):
    """A DistributedSampler (same order, same shards) that yields ``(epoch, index)``, so that the epoch
    reaches ``SeededSamples`` even inside persistent loader processes."""

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class SeededSamples(Dataset[Any]):
    """``dataset[index]`` under torch's and Python's generators seeded by ``sample_seed``, taken by
    ``(epoch, index)``; the generators' states are put back afterwards (dropout draws from them)."""

    def __init__(self, dataset: Dataset[Any], seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with seeded_sample(self.seed, epoch, index):
            return self.dataset[index]


@contextmanager
def seeded_sample(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Torch's CPU generator and Python's seeded by ``sample_seed`` inside, put back afterwards: the augmentation of
    image ``index`` in ``epoch``, the same in a DataLoader process (``SeededSamples``) and a Ray Data task
    (``streaming``). Only the CPU generators: transforms draw their parameters there, even for images on a GPU
    (``torch.manual_seed`` would also seed every accelerator, left seeded afterwards, and costs ~0.13 ms an image;
    this costs a fifth of that, the same stream)."""
    sample = sample_seed(seed, epoch, index)
    generator = torch.default_generator
    python_state, torch_state = random.getstate(), generator.get_state()
    generator.manual_seed(sample)
    random.seed(sample)
    try:
        yield
    finally:
        random.setstate(python_state)
        generator.set_state(torch_state)


def rng_state() -> dict[str, Any]:
    """This process's generator states, as plain values and tensors."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        # Only where CUDA is in use: asking would initialise it in a CPU run.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,  # type: ignore[no-untyped-call]
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what ``rng_state`` returned (CUDA's only where there is a CUDA device)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]] | None:
    """Every worker's ``rng_state``, in rank order, on rank 0 (which writes the checkpoints); None on the
    others (a collective: all must call it). A gather, not an all-gather: the other ranks would only drop
    world copies of it every epoch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [rng_state()]
    rank0 = dist.get_rank() == 0
    states: list[Any] | None = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(rng_state(), states, dst=0)
    return states
