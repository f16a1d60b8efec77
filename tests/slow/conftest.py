"""Shared pieces of the slow tier: one local Ray per test module, and small FineTuneJobs on the bundled
digits that train in seconds on two cores (a `fit()` alone costs ~12 s, so each test runs few)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec

# resnet18 at 32×32 on three digit classes, 30 training images each: a couple of seconds per epoch.
BASE_SPEC: dict[str, Any] = {
    "model": {"name": "resnet18"},
    "dataset": {
        "format": "digits",
        "classes": [0, 1, 2],
        "maxPerClass": 30,
        "imageSize": 32,
        "augmentation": "none",
        "loaderWorkers": 0,
    },
    "strategy": {"method": "full"},
    "hyperparameters": {"epochs": 2, "batchSize": 16, "learningRate": 0.003, "seed": 0},
    "resources": {"workers": 1, "cpusPerWorker": 1},
    "output": {"uri": "unused"},
}

MakeConfig = Callable[..., TrainerConfig]


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in section by section; a None value removes the field."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def job_config(name: str, output_root: Path, **sections: Any) -> TrainerConfig:
    """A TrainerConfig of BASE_SPEC with ``sections`` merged in (see ``merge``)."""
    spec = FineTuneJobSpec.model_validate(merge(BASE_SPEC, sections))
    return TrainerConfig(job_name=name, spec=spec, output_root=str(output_root), sinks=["console"])


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """``make_config(name, **sections)``: ``job_config`` writing under this test's tmp_path."""

    def make(name: str, **sections: Any) -> TrainerConfig:
        return job_config(name, tmp_path / "runs", **sections)

    return make


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """An embedded Ray for the module's tests: two logical CPUs, as on the machine the tier targets."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)  # never a `ray start` cluster
    yield
    ray.shutdown()
