"""What the streaming path hands Ray Data, without a Ray runtime: the decode step is configured with
``map_batches``' named parameters only (Ray 2.60 deprecates the rest)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import ray
import ray.data
from ray.data import TaskPoolStrategy
from ray.util.annotations import RayDeprecationWarning

from finetune_trainer import streaming
from finetune_trainer.data import eval_transform
from finetune_trainer.inputs import InputSpec
from finetune_trainer.streaming import Decoder

INPUT = InputSpec(
    image_size=16, resize_size=18, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", grayscale_to_rgb=True
)


class Unexecuted(ray.data.Dataset):
    """A Dataset with no plan, never executed: only ``map_batches``' own checks run on it."""

    def __init__(self) -> None:
        pass

    def __del__(self) -> None:
        pass


@pytest.mark.parametrize(
    ("free_cpus", "resources"),
    [(4.0, {"num_cpus": 1, "compute": None}), (0.0, {"num_cpus": 0, "compute": TaskPoolStrategy(size=2)})],
    ids=["a-cpu-free", "every-cpu-held"],
)
def test_the_decode_step_uses_map_batches_named_parameters_only(
    monkeypatch: pytest.MonkeyPatch, free_cpus: float, resources: dict[str, Any]
) -> None:
    """Ray 2.60's public ``map_batches`` on a Dataset that is never executed (no Ray runtime): its deprecation of
    ``**ray_remote_args`` (before: ``scheduling_strategy``) is an error here, and the legacy ``concurrency``
    (before: ``concurrency=2``, deprecated for functions since Ray 2.51) is not used."""
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": free_cpus})
    received: dict[str, Any] = {}

    def build(self: Any, fn: Any, **kwargs: Any) -> Any:  # what map_batches passes on once it has validated
        received.update(kwargs)
        return self

    monkeypatch.setattr(ray.data.Dataset, "map_batches_internal", build)
    dataset = Unexecuted()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        streaming._decoded(dataset, Decoder(eval_transform(INPUT), seed=0, epoch=None))
    remote = {k: v for k, v in received.items() if v is not None and k not in ("fn", "batch_size", "batch_format")}
    assert received["concurrency"] is None
    assert {"num_cpus": received["num_cpus"], "compute": received["compute"]} == resources
    # Nothing else reaches Ray's remote options (the named ones are all None).
    assert set(remote) <= {"num_cpus", "compute", "zero_copy_batch", "udf_modifying_row_count"}
