"""A job run twice with one seed on one machine computes the same run, with one worker or two (DDP):
every epoch's losses and accuracies, and the final model."""

from __future__ import annotations

import pytest

from finetune_trainer import driver
from finetune_trainer.artifacts import read_metrics
from tests.slow.conftest import MakeConfig
from tests.support.runs import curve, same_weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


# Two workers (DDP) only: one worker's run is reproduced exactly by test_resume's resumed run, which
# starts again from the seed, so a run that is not reproducible on one worker fails there.
@pytest.mark.parametrize("workers", [2])
def test_one_seed_gives_one_run(make_config: MakeConfig, workers: int) -> None:
    runs = []
    for name in ("first", "again"):
        cfg = driver.absolute_output(
            make_config(
                f"{name}-{workers}",
                # Random numbers every epoch: crops and flips, and dropout in MobileNet's classifier.
                model={"name": "mobilenet_v3_small"},
                dataset={"augmentation": "standard"},
                resources={"workers": workers, "cpusPerWorker": 1},
            )
        )
        result = driver.build_trainer(cfg, local=True).fit()
        assert result.metrics is not None and result.metrics["world_size"] == workers
        runs.append(cfg.run_dir)

    first, again = (curve(read_metrics(run)) for run in runs)
    assert len(first) == 2 and first == again
    assert same_weights(*runs)
