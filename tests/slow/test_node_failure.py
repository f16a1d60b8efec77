"""Losing a worker node mid-training: with `maxWorkerFailures` ≥ 1, Ray Train restarts the worker group
from the last checkpoint once a node is back, and the run completes with every epoch recorded once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster

from finetune_trainer import driver
from finetune_trainer.artifacts import read_metrics
from finetune_trainer.checkpoint import checkpoint_dir_name
from tests.slow.conftest import MakeConfig
from tests.support.runs import BackgroundFit, wait_for_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head without CPUs (so no training worker lands there) and two one-CPU worker nodes."""
    import ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()  # type: ignore[no-untyped-call]


def test_run_recovers_from_a_lost_node(cluster: Cluster, make_config: MakeConfig) -> None:
    # The node goes once checkpoint 2 exists (so checkpoint 1 is registered): three epochs are left to lose
    # it in, and the worker on it dies with it, so the other's next collective fails within the epoch.
    epochs = 5
    cfg = driver.absolute_output(
        make_config(
            "node-loss",
            dataset={"classes": None, "maxPerClass": 20},
            strategy={"preciseBatchNorm": False},  # what is tested is the recovery: epochs as short as they go
            hyperparameters={"epochs": epochs},
            resources={"workers": 2, "cpusPerWorker": 1},
            runPolicy={"maxWorkerFailures": 2},
        )
    )
    # add_node must run in the main thread, so the fit runs beside it.
    fit = BackgroundFit(driver.build_trainer(cfg, local=True).fit)
    wait_for_path(Path(cfg.run_dir) / checkpoint_dir_name(2), fit.done)
    assert not fit.done.is_set(), f"training ended before a node could be removed: {fit}"
    victim = next(node for node in cluster.worker_nodes)
    cluster.remove_node(victim)
    cluster.add_node(num_cpus=1)
    result = fit.result()
    assert result.metrics["epoch"] == epochs
    assert result.metrics["world_size"] == 2
    # The attempt that finished started from a checkpoint, not from scratch.
    assert result.metrics["resumed_from"] >= 1
    assert [r.epoch for r in read_metrics(cfg.run_dir)] == list(range(1, epochs + 1))
    assert (Path(cfg.run_dir) / "model.json").exists()
