"""Runs one FineTuneJob on the connected Ray cluster: ``run(cfg) -> RunResult``.

Builds the ``TorchTrainer`` from the spec (workers and their resources, checkpoints kept, worker
failures absorbed) with ``RunConfig(name=<job name>, storage_path=<output root>)``. That pair is the
run's identity in Ray Train 2.60 (Train V2): the controller finds the run's checkpoint-manager snapshot
under ``<storage_path>/<name>`` and hands its latest checkpoint to the workers'
``ray.train.get_checkpoint()``, so any relaunch of the same job — a RayJob retry, a suspended job
resumed, ``finetune run`` again — continues where the last one stopped. The caller connects to Ray
(``local.py`` starts an embedded one, ``__main__`` joins the RayJob's cluster).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The V2 classes by their defining modules (the very objects ``ray.train`` exports when Train V2 is on,
# the 2.60 default): type checkers otherwise see the V1 classes behind ``ray.train``'s conditional import.
from ray.train.v2.api.config import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from finetune_operator.api.contract import TRAIN_RESOURCE, TrainerConfig
from finetune_operator.api.dataworkers import data_replicas
from finetune_operator.api.v1alpha1 import FineTuneJobSpec, ResourcesSpec
from finetune_trainer import storage
from finetune_trainer.entry import FAIL_AFTER_EPOCH_KEY, QUIET_KEY, train_fn
from finetune_trainer.errors import ArtifactError, TrainerError, find_user_error
from finetune_trainer.exports import check_exports
from finetune_trainer.metrics_log import EpochRecord, read_metrics
from finetune_trainer.model_card import CARD_FILE, load_model_card
from finetune_trainer.ray_compat import LocalTorchTrainer

__all__ = ["RunResult", "absolute_output", "build_trainer", "may_stream", "run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a finished run reached, read back from its ``metrics.jsonl`` (every epoch, resumed ones too)."""

    job_name: str
    run_dir: str
    epochs: list[EpochRecord]
    val_accuracy: float | None
    best_val_accuracy: float | None
    best_epoch: int | None
    model_card: str
    shipped: EpochRecord | None = None
    """The epoch whose weights ``model.pt`` holds, as the card records it (``metrics.shipped``): the best
    epoch's unless its checkpoint was unusable and the last epoch's shipped instead; None if the card says not."""

    @property
    def shipped_accuracy(self) -> tuple[float | None, int] | None:
        """(validation accuracy, epoch) of the weights ``model.pt`` holds, as the card records them (for the gate)."""
        return None if self.shipped is None else (self.shipped.val_accuracy, self.shipped.epoch)

    @property
    def last_epoch(self) -> int:
        return self.epochs[-1].epoch if self.epochs else 0


def absolute_output(cfg: TrainerConfig) -> TrainerConfig:
    """``cfg`` with a local ``output_root`` made absolute: Ray Train refuses relative storage paths."""
    if storage.is_remote(cfg.output_root):
        return cfg
    return cfg.model_copy(update={"output_root": str(storage.local_path(cfg.output_root).resolve())})


def worker_env() -> dict[str, str]:
    """Environment of the training workers.

    - Ray Train V2 patches print() in its workers to go through logging, whose console handler repeats
      what the patched print already wrote: every console-sink line would appear twice.
    - OMP_WAIT_POLICY only when the caller sets it. OpenMP's default (spinning waits) measured 0.94× a
      plain loop against 0.81× with PASSIVE on a quiet node (bench/README.md); PASSIVE only helps on a
      node that is oversubscribed (a laptop busy with other work, a pod under a tight CFS quota)."""
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if "OMP_WAIT_POLICY" in os.environ:
        env["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    return env


def cpu_share(cpus: float, processes: int) -> float:
    """Each of ``processes`` workers' CPUs out of a pod's ``cpus``, rounded down to Ray's resolution (0.0001)
    so that all of them fit the pod: 2 CPUs for 3 workers are 0.6666 each (0.6667 × 3 would not fit)."""
    return math.floor(cpus / processes * 10_000) / 10_000


def scaling_config(res: ResourcesSpec, *, local: bool = False) -> ScalingConfig:
    """One Ray Train worker per GPU: a pod (or a local machine) with N GPUs runs N 1-GPU workers, each with
    its share of the pod's CPUs, so that Ray packs them onto the pods that hold the GPUs (KubeRay starts
    each worker pod with ``num-gpus`` N) and DDP keeps every card busy. One process driving N cards would
    train on the first and leave the rest idle. On CPU: one worker per pod, as before.

    With ``resources.dataWorkers`` on a cluster, each worker also asks for one ``TRAIN_RESOURCE``, which only
    the training pods offer: a CPU job would otherwise fit on a data pod. Not ``local``: an embedded Ray has
    no data pods and does not offer it."""
    resources = {"CPU": cpu_share(res.cpus_per_worker, max(1, res.gpus_per_worker))}
    if res.gpus_per_worker:
        resources["GPU"] = 1.0
    if data_replicas(res.data_workers) and not local:
        resources[TRAIN_RESOURCE] = 1.0
    return ScalingConfig(num_workers=res.train_workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=resources)


def build_trainer(cfg: TrainerConfig, *, fail_after_epoch: int | None = None, local: bool = False) -> DataParallelTrainer:
    """The TorchTrainer for ``cfg`` (whose output root must be absolute or remote). ``local``: an
    embedded Ray (``finetune run``): no placement-group cleaner, and Ray Train's own INFO lines (every
    report, every checkpoint) kept off the console, where the progress sink already speaks.

    ``fail_after_epoch`` is a test hook, not part of the spec: every worker raises once, right after
    reporting that epoch, to exercise resumption."""
    spec = cfg.spec
    res = spec.resources
    loop_config: dict[str, Any] = {"trainer": cfg.model_dump(mode="json", by_alias=True), QUIET_KEY: local}
    if fail_after_epoch is not None:
        loop_config[FAIL_AFTER_EPOCH_KEY] = fail_after_epoch
    options: dict[str, Any] = dict(
        train_loop_config=loop_config,
        scaling_config=scaling_config(res, local=local),
        run_config=RunConfig(
            name=cfg.job_name,
            storage_path=cfg.output_root,
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.output.keep_checkpoints,
                checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=spec.run_policy.max_worker_failures),
            worker_runtime_env={"env_vars": worker_env()},
            logging_config=LoggingConfig(log_level="WARNING" if local else "INFO"),
        ),
    )
    # Not ``loop.train_loop_per_worker``: shipped by reference, ``entry.train_fn`` imports the loop on the
    # workers only, and this process is spared torchvision and the rest (seconds of start-up).
    if local:
        return LocalTorchTrainer(train_fn, uses_ray_data=may_stream(spec), **options)
    # Here, not at the top: ray.train.v2.torch imports torch, which a local run's driver does without.
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    return TorchTrainer(train_fn, **options)


def may_stream(spec: FineTuneJobSpec) -> bool:
    """Whether the job's workers may read with Ray Data (the streaming ingest): an ``imagefolder`` not pinned
    to ``mapStyle``, as ``listing.choose_ingest`` decides on the workers (``digits`` and ``fake`` never do)."""
    ds = spec.dataset
    return ds.format == "imagefolder" and ds.train_uri is not None and ds.ingest != "mapStyle"


def run(cfg: TrainerConfig, *, fail_after_epoch: int | None = None, local: bool = False) -> RunResult:
    """Train ``cfg`` to the end (resuming its last checkpoint if there is one) and write its artifacts.

    Raises TrainerError, one line, when the job's inputs are at fault (a worker's TrainerError or
    WeightsError, dug out of Ray Train's WorkerGroupError); other failures propagate as Ray raised them."""
    cfg = absolute_output(cfg)
    try:
        # Before any training: a missing exporter found after hours of GPU time loses the run's model.
        check_exports(list(cfg.spec.output.exports))
    except ArtifactError as e:
        raise TrainerError(f"output.exports: {e}") from None
    trainer = build_trainer(cfg, fail_after_epoch=fail_after_epoch, local=local)
    try:
        trainer.fit()
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is not None:
            raise user_error from None
        raise
    return read_result(cfg)


def read_result(cfg: TrainerConfig) -> RunResult:
    records = read_metrics(cfg.run_dir)
    # The later epoch on ties, as the trainer (TrainState.observe) and Ray's checkpoint retention rank them.
    best = max(records, key=lambda r: (r.val_accuracy, r.epoch), default=None)
    card = storage.join(cfg.run_dir, CARD_FILE)
    if not storage.is_remote(card) and not Path(card).exists():
        raise TrainerError(f"output: training finished but {card} was not written")
    return RunResult(
        job_name=cfg.job_name,
        run_dir=cfg.run_dir,
        epochs=records,
        val_accuracy=records[-1].val_accuracy if records else None,
        best_val_accuracy=best.val_accuracy if best else None,
        best_epoch=best.epoch if best else None,
        model_card=card,
        shipped=_shipped(cfg.run_dir),
    )


def _shipped(run_dir: str) -> EpochRecord | None:
    # The summary reports what ships; a card it cannot read only costs that line its shipped epoch.
    try:
        card = load_model_card(run_dir)
    except ArtifactError as e:
        log.warning("%s", e)
        return None
    return card.metrics.shipped if card.metrics is not None else None
