"""The streaming path on a multi-node Ray (``ray.cluster_utils.Cluster``) shaped like a RayJob with
``resources.dataWorkers``: a CPU-only data node that offers no ``TRAIN_RESOURCE`` decodes and augments, a training
node that offers it trains. A training worker's node is killed mid-run; the run resumes from its checkpoint and
ends exactly where an uninterrupted run on the same cluster ends (per-epoch curves and model.pt equal)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray.cluster_utils import Cluster

from finetune_operator.api.contract import TRAIN_RESOURCE, TrainerConfig
from finetune_trainer import driver
from finetune_trainer.metrics_log import read_metrics
from tests.slow.conftest import MakeConfig
from tests.support.ray_nodes import NodeTitles
from tests.support.runs import BackgroundFit, curve, same_weights, streamed_folder, wait_for_path, write_image_folder

pytestmark = pytest.mark.slow

CLASSES = ("top", "bottom")
PER_CLASS = 24  # 48 JPEGs of 32 px, 12 held out
EPOCHS = 3
# Ray Train V2's checkpoint manager writes this beside the run's checkpoints once it has registered one.
SNAPSHOT = "checkpoint_manager_snapshot.json"


def _add_train_node(cluster: Cluster) -> Any:
    """A training node as the RayJob's worker group renders it: one CPU and the custom resource only it offers."""
    return cluster.add_node(num_cpus=1, resources={TRAIN_RESOURCE: 1})


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, str]]:
    """(cluster, data node id): a head without CPUs, a two-CPU data node without TRAIN_RESOURCE, one training node."""
    import ray

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    data_node = cluster.add_node(num_cpus=2)
    _add_train_node(cluster)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, data_node.node_id
    ray.shutdown()
    cluster.shutdown()  # type: ignore[no-untyped-call]


def _config(make_config: MakeConfig, name: str, folder: Path) -> TrainerConfig:
    return driver.absolute_output(
        make_config(
            name,
            dataset=streamed_folder(folder),
            strategy={"preciseBatchNorm": False},
            # dataWorkers: the training workers ask for TRAIN_RESOURCE (not local: no embedded Ray here).
            resources={"workers": 1, "cpusPerWorker": 1, "dataWorkers": {"replicas": 1, "cpusPerWorker": 2}},
            hyperparameters={"epochs": EPOCHS, "batchSize": 8},
            output={"keepCheckpoints": EPOCHS},  # every epoch's reported metrics stay in the result
            runPolicy={"maxWorkerFailures": 2},
        )
    )


def _fit_killing_the_train_node(cluster: Cluster, data_node: str, cfg: TrainerConfig) -> Any:
    """Fit ``cfg`` while the training worker's node is removed (its worker dies with it) once Ray Train has
    registered a checkpoint, and a new training node joins; the result of the run that continues."""
    # add_node and remove_node must run in the main thread, so the fit runs beside them.
    fit = BackgroundFit(driver.build_trainer(cfg).fit)
    wait_for_path(Path(cfg.run_dir) / SNAPSHOT, fit.done)
    assert not fit.done.is_set(), f"training ended before its node could be removed: {fit}"
    victim = next(node for node in cluster.worker_nodes if node.node_id != data_node)
    cluster.remove_node(victim)
    _add_train_node(cluster)
    return fit.result()


def test_streamed_run_on_a_data_node_survives_a_killed_worker(
    cluster: tuple[Cluster, str], make_config: MakeConfig, tmp_path: Path
) -> None:
    ray_cluster, data_node = cluster
    folder = write_image_folder(tmp_path / "shapes", CLASSES, PER_CLASS, suffix=".jpg")
    straight = _config(make_config, "straight", folder)
    killed = _config(make_config, "killed", folder)
    with NodeTitles(ray_cluster) as titles:
        driver.build_trainer(straight).fit()
        result = _fit_killing_the_train_node(ray_cluster, data_node, killed)

    assert result.metrics["epoch"] == EPOCHS
    # The attempt that finished started from a checkpoint, not from scratch, and trained epochs after it.
    assert 1 <= result.metrics["resumed_from"] < EPOCHS
    # Every epoch's evaluation, the lost attempt's included: each of the 12 held-out images counted once.
    assert sorted((m["epoch"], m["val_images"]) for _, m in result.best_checkpoints) == [(e, 12) for e in range(1, EPOCHS + 1)]
    # The resumed epochs drew the same crops and flips in the same order as the uninterrupted run's.
    assert [r.epoch for r in read_metrics(killed.run_dir)] == list(range(1, EPOCHS + 1))
    assert curve(read_metrics(killed.run_dir)) == curve(read_metrics(straight.run_dir))
    assert same_weights(straight.run_dir, killed.run_dir)

    # Where things ran, as the operating system and Ray's process titles show it (nothing the trainer reports).
    train_nodes = [node for node in titles.seen if node != data_node]
    assert titles.ran(data_node, "BlockDecoder"), dict(titles.seen)  # the decode stage: Ray Data names the tasks after it
    assert not any(titles.ran(node, "BlockDecoder") for node in train_nodes), dict(titles.seen)
    assert not titles.ran(data_node, "RayTrainWorker"), dict(titles.seen)
    # The first training node and the one that replaced it: the test saw both workers.
    assert sum(titles.ran(node, "RayTrainWorker") for node in train_nodes) == 2, dict(titles.seen)
