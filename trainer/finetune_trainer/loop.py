"""The Ray Train glue that runs a job on every worker: ``train_loop_per_worker(config)``.

Shape of torchvision's classification reference (``build_datasets`` → ``build_model`` →
``engine.train_one_epoch`` / ``engine.evaluate`` per epoch), run data-parallel through
``ray.train.torch``: ``prepare_model`` (DDP, gloo on CPU) and the loaders of ``loaders``. The job runs
as the stages ``stages.plan_stages`` lays out, each with a fresh optimizer and schedule (``optim``); a
frozen-backbone stage without random augmentation trains the head on backbone features computed once
(``feature_cache``: per rank, float16 on the host). Random numbers and their states in checkpoints: ``seeding``.

Every epoch every worker calls ``ray.train.report`` (a barrier); rank 0 alone attaches the checkpoint
(a frozen-backbone stage's holds only what trains, on top of the starting weights' sha256), appends
``metrics.jsonl`` and feeds the progress sinks (``worker_report``). A relaunch resumes from the checkpoint Ray
Train hands back, or from an older one when that one is corrupt (``resume``). Early stopping ends a
stage, never the run: lp-ft fine-tunes after a probe that plateaued. At the end rank 0 ships the best
epoch's weights, evaluated on the whole validation set, with the artifacts (``finish``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import ray.train
import ray.train.collective
import ray.train.torch
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from finetune_operator.api.contract import TrainerConfig, resolve_uri
from finetune_operator.api.timestamps import utc_now
from finetune_operator.api.v1alpha1 import Progress
from finetune_trainer import storage
from finetune_trainer.artifacts import RunFacts
from finetune_trainer.batchnorm import (
    PRECISE_BN_BATCHES,
    batch_norm_collapse,
    precise_bn_share,
    recompute_batch_norm,
    sync_batch_norm,
)
from finetune_trainer.checkpoint import TrainState, restore_model, restore_training
from finetune_trainer.data import build_datasets
from finetune_trainer.engine import all_reduce, build_precision, evaluate, train_one_epoch
from finetune_trainer.entry import FAIL_AFTER_EPOCH_KEY, QUIET_KEY
from finetune_trainer.errors import ArtifactError, TrainerError, find_user_error
from finetune_trainer.feature_cache import Float32Input, cached_shards
from finetune_trainer.finish import finish_run
from finetune_trainer.gpu import compile_model, enable_tf32
from finetune_trainer.image_folder import StreamedImages
from finetune_trainer.listing import choose_ingest, list_image_folder
from finetune_trainer.loaders import Source, build_loaders, workers
from finetune_trainer.metrics_log import EpochRecord
from finetune_trainer.model import StartingWeights, build_model, starting_weights
from finetune_trainer.optim import build_optimizer, build_scheduler, epoch_lr
from finetune_trainer.progress import build_sinks
from finetune_trainer.protect import check_keys, keyring_for
from finetune_trainer.rank_zero import from_rank_zero, torch_broadcast
from finetune_trainer.ray_compat import quiet_train_reports, user_errors_in_one_line
from finetune_trainer.recipe import BatchPlan, batch_size, with_batch_plan
from finetune_trainer.resume import resume_from
from finetune_trainer.seeding import rank_seed, seed_everything, set_rng_state
from finetune_trainer.stages import Stage, plan_stages, uses_feature_cache
from finetune_trainer.strategy import apply_strategy, split_for_feature_cache
from finetune_trainer.streaming import StreamSource
from finetune_trainer.tracking import Tracker
from finetune_trainer.unreadable import Unreadable
from finetune_trainer.verify import verify_artifacts
from finetune_trainer.worker_report import Worker, report_epoch, step_meter

__all__ = ["FAIL_AFTER_EPOCH_KEY", "QUIET_KEY", "train_loop_per_worker"]

log = logging.getLogger(__name__)
T = TypeVar("T")

Labelled = Dataset[tuple[Tensor, int]]


def _set_threads(cfg: TrainerConfig) -> None:
    """One intra-op thread per CPU the worker reserved (its pod's CPUs ÷ its GPUs: one worker per GPU), never
    more than its share of this node: two workers of two threads on two cores run at a third of the speed of one."""
    ctx = ray.train.get_context()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, ctx.get_local_world_size()))
    res = cfg.spec.resources
    torch.set_num_threads(max(1, min(int(res.cpus_per_worker / max(1, res.gpus_per_worker)), share)))


def _starting_weights(cfg: TrainerConfig, model: nn.Module, rank: int) -> StartingWeights | None:
    """The fingerprint of the model as built, when a stage freezes its backbone (its checkpoints store only
    what trains on top of it); rank 0, which writes checkpoints and ships the best one, keeps a copy."""
    if not any(stage.name == "probe" for stage in plan_stages(cfg.spec)):
        return None
    spec = cfg.spec.model
    seed = cfg.spec.hyperparameters.seed
    reference = spec.weights_uri or (f"{spec.name} {spec.weights}" if spec.weights else f"{spec.name} random (seed {seed})")
    return starting_weights(model, reference, keep=rank == 0)


def _weights_uri(cfg: TrainerConfig) -> str | None:
    uri = cfg.spec.model.weights_uri
    return None if uri is None else resolve_uri(uri)


def _same_classes_as_source(weights_uri: str | None, class_names: list[str]) -> bool:
    """Whether the weights file is an earlier job's model.pt trained on exactly these classes, in order.

    Only then is its head a meaningful start; its model card (model.json beside it) says so. A bare
    state_dict says nothing about its classes, so it gets a new head.
    """
    if weights_uri is None:
        return False
    try:
        # Verified (the signature; no file read): this card decides whether the source's head is kept.
        card = verify_artifacts(storage.parent(weights_uri), only=[]).card
    except ArtifactError:
        return False
    return card.class_names == class_names


def _user_error_line(exc: BaseException) -> str | None:
    error = find_user_error(exc)
    return None if error is None else str(error)


def _planned(cfg: TrainerConfig, train_images: int, world: int) -> tuple[str, TrainerConfig, BatchPlan]:
    """(the checkpoints' fingerprint, ``cfg`` with its batch plan, the plan). The fingerprint is the spec's as written:
    the planned batch size depends on the number of workers (rounded to a multiple of it), and a relaunch on another
    number must resume (inexactly, with a warning), not be refused as another spec."""
    fingerprint = cfg.spec_fingerprint()
    planned, plan = with_batch_plan(cfg, train_images, world)
    return fingerprint, planned, plan


def _driver_says_it(cfg: TrainerConfig, *, quiet: bool) -> bool:
    """Whether a worker's user error can be left out of its log: ``finetune run`` (``quiet``) prints the run's error
    itself, but not where Ray Train retries (``runPolicy.maxWorkerFailures``): the driver sees the last attempt's
    error only, so each earlier attempt's must be said where it happened, in its one line."""
    return quiet and cfg.spec.run_policy.max_worker_failures == 0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on each worker; ``config["trainer"]`` is the TrainerConfig as JSON-ready dict."""
    cfg = TrainerConfig.model_validate(config["trainer"])
    if config.get(QUIET_KEY):
        quiet_train_reports()
    user_errors_in_one_line(_user_error_line, drop=_driver_says_it(cfg, quiet=bool(config.get(QUIET_KEY))))
    rank, world = workers()
    _set_threads(cfg)
    # One seed on every worker until the model is built: DDP starts from one model.
    seed_everything(cfg.spec.hyperparameters.seed)
    sinks = build_sinks(cfg, local=bool(config.get(QUIET_KEY))) if rank == 0 else None
    if sinks is not None:
        sinks.update(Progress(total_epochs=cfg.spec.hyperparameters.epochs, stage="starting", updated_at=utc_now()))
    tracker: Tracker | None = None
    try:
        check_keys(cfg)  # a missing or unreadable key fails now, not after the first epoch
        # Rank 0 decides the ingest path and lists the dataset, for every worker: see ``rank_zero``.
        broadcast = torch_broadcast(ray.train.torch.get_device(), wait=ray.train.collective.barrier)

        def once(compute: Callable[[], T]) -> T:
            return from_rank_zero(compute, rank, world, broadcast)

        ingest = once(lambda: choose_ingest(cfg.spec.dataset))
        if rank == 0:
            log.warning("dataset: %s ingest (%s)", ingest.kind, ingest.why)  # once per run: the path decides speed and disk
        train, val, class_names, input_spec = build_datasets(
            cfg,
            ingest,
            lister=lambda field, uri: once(lambda: list_image_folder(field, uri)),
            agree=lambda digest: once(lambda: digest),
            resuming=ray.train.get_checkpoint() is not None,
        )
        fingerprint, cfg, plan = _planned(cfg, len(train), world)  # type: ignore[arg-type]
        if plan.chosen is not None and rank == 0:
            print(f"recipe: {plan.chosen}", file=sys.stderr, flush=True)
        spec = cfg.spec.model
        uri = _weights_uri(cfg)
        model = build_model(
            spec.name, spec.weights, len(class_names), weights_uri=uri, keep_head=_same_classes_as_source(uri, class_names)
        )
        start = _starting_weights(cfg, model, rank)
        # From here each worker draws its own numbers (dropout, stochastic depth): see ``seeding``.
        seed_everything(rank_seed(cfg.spec.hyperparameters.seed, rank))
        device = ray.train.torch.get_device()
        enable_tf32(device)
        precision = build_precision(cfg.spec, device, model)
        worker = Worker(
            cfg=cfg,
            fingerprint=fingerprint,
            rank=rank,
            world=world,
            device=device,
            model=sync_batch_norm(model, cfg.spec.strategy.sync_batch_norm, world)
            .to(device)
            .to(memory_format=precision.memory_format),
            class_names=class_names,
            precision=precision,
            criterion=nn.CrossEntropyLoss(label_smoothing=cfg.spec.hyperparameters.label_smoothing),
            sinks=sinks,
            fail_after=config.get(FAIL_AFTER_EPOCH_KEY),
            passes=plan.passes,
            start=start,
        )
        state, resumed = _resume(worker)
        worker.resumed_from = state.epoch
        if rank == 0:
            tracker = worker.tracker = Tracker(cfg, state.epoch, on_warning=sinks.warn if sinks is not None else log.warning)
        _run_stages(worker, train, val, state, resumed)
        if rank == 0:
            finish_run(
                worker.cfg,
                fingerprint=worker.fingerprint,
                model=worker.model,
                class_names=class_names,
                precision=worker.precision,
                criterion=worker.criterion,
                val=val,
                state=state,
                input_spec=input_spec,
                sinks=sinks,
                facts=RunFacts(
                    train_images=len(train),  # type: ignore[arg-type]
                    passes=plan.passes,
                    chosen=plan.chosen,
                    warnings=worker.warnings,
                    ingest=ingest.kind if cfg.spec.dataset.format == "imagefolder" else None,
                ),
                start=start,
                streamed=_final_stream(worker, train, val),
            )
            if tracker is not None:
                tracker.finish(worker.model, val, class_names, input_spec)
    except TrainerError as e:
        # User errors fail the same way on every retry; say so where people look, then let Ray fail the run.
        if sinks is not None:
            sinks.finish(error=str(e))
        if tracker is not None:  # a crash (not a user error) keeps the MLflow run open: the retry continues it
            tracker.fail()
        raise


def _resume(worker: Worker) -> tuple[TrainState, dict[str, Any] | None]:
    """The state of the newest usable checkpoint (model weights restored), or a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState(), None
    resumed = resume_from(checkpoint, worker.fingerprint, worker.cfg.run_dir, encrypted=keyring_for(worker.cfg) is not None)
    for warning in resumed.warnings:
        log.warning("%s", warning)
        worker.warnings.append(warning)
        if worker.sinks is not None:
            worker.sinks.warn(warning)
    data = resumed.data
    state: TrainState = data["train_state"]
    restore_model(worker.model, data, worker.start, f"the checkpoint of epoch {state.epoch}")
    log.info("resuming %s after epoch %d (%s stage)", worker.cfg.job_name, state.epoch, state.stage)
    # Nothing draws random numbers between here and the next epoch (loaders have their own generators),
    # so the generators continue as they stood when the checkpoint was written.
    states = data.get("rng")
    if states is not None and len(states) == worker.world:
        set_rng_state(states[worker.rank])
    else:
        log.warning(
            "resuming %s without the random state of %d workers (the checkpoint holds %s): "
            "the run continues, not exactly as an uninterrupted run would",
            worker.cfg.job_name,
            worker.world,
            "none" if states is None else f"{len(states)}",
        )
    return state, data


def _run_stages(worker: Worker, train: Labelled, val: Labelled, state: TrainState, resumed: dict[str, Any] | None) -> None:
    for stage in plan_stages(worker.spec):
        # Early stopping ends this stage only: a probe that plateaued is still followed by fine-tuning.
        if state.stage_done(stage.name, stage.last):
            continue
        # Optimizer and schedule carry over only within the stage the checkpoint was written in.
        carried = resumed if resumed is not None and state.stage == stage.name and state.epoch >= stage.first else None
        state.enter_stage(stage.name)
        _run_stage(worker, stage, train, val, state, carried)


def _stage_model(worker: Worker, stage: Stage, train: Labelled, val: Labelled) -> tuple[nn.Module, nn.Module, Source]:
    """(module to train, module to evaluate, loaders) for ``stage``: the whole model on images, or the
    head alone on cached backbone features."""
    spec = worker.spec
    if uses_feature_cache(spec, stage):
        if worker.sinks is not None:
            worker.sinks.update(
                Progress(
                    epoch=stage.first - 1,
                    total_epochs=spec.hyperparameters.epochs,
                    stage="caching-features",
                    updated_at=utc_now(),
                )
            )
        features, head = split_for_feature_cache(worker.model)
        shards = cached_shards(spec, features, train, val, worker.device, worker.rank, worker.world, worker.passes)
        head = Float32Input(head)
        return _wrap(head, spec.hyperparameters.compile), head, shards
    return _wrap(worker.model, spec.hyperparameters.compile), worker.model, _source(worker, train, val)


def _source(worker: Worker, train: Labelled, val: Labelled) -> Source:
    """The images of a stage that trains on images: streamed by Ray Data when the dataset was listed for it."""
    spec = worker.spec
    if isinstance(train, StreamedImages) and isinstance(val, StreamedImages):
        per_worker = max(1, batch_size(spec) // worker.world)
        seed = spec.hyperparameters.seed
        on_device = spec.dataset.jpeg_decode == "gpu"
        if on_device and worker.device.type != "cuda":
            raise TrainerError(f"dataset.jpegDecode: 'gpu' but this worker has no GPU ({worker.device}); use jpegDecode: cpu")
        return StreamSource(
            train,
            val,
            seed=seed,
            rank=worker.rank,
            world=worker.world,
            per_worker=per_worker,
            passes=worker.passes,
            decode_device=worker.device if on_device else None,
            device=worker.device,
        )
    return build_loaders(spec, train, val, passes=worker.passes)


FinalStream = Callable[[int, Unreadable], Iterator[tuple[Tensor, Tensor]]]


def _final_stream(worker: Worker, train: Labelled, val: Labelled) -> FinalStream | None:
    """Rank 0's final evaluation streamed by Ray Data, as every epoch's was, when the dataset was listed for it."""
    if not (isinstance(train, StreamedImages) and isinstance(val, StreamedImages)):
        return None
    source = _source(worker, train, val)
    assert isinstance(source, StreamSource)
    return source.evaluation_batches


def _wrap(module: nn.Module, compiled: bool) -> nn.Module:
    """DDP around ``module`` (a no-op with one worker), compiled when the job asks; rebuilt per stage because
    DDP hooks only the parameters that require grad when it is constructed. Checkpoints save ``module``."""
    return compile_model(ray.train.torch.prepare_model(module), compiled)


def _run_stage(
    worker: Worker, stage: Stage, train: Labelled, val: Labelled, state: TrainState, carried: dict[str, Any] | None
) -> None:
    spec, hp = worker.spec, worker.spec.hyperparameters
    groups = apply_strategy(worker.model, stage.method, spec.strategy.unfreeze_blocks, spec.strategy.freeze_batch_norm)
    trained, evaluated, shards = _stage_model(worker, stage, train, val)
    optimizer = build_optimizer(spec, stage, groups)
    scheduler = build_scheduler(spec, stage, optimizer, len(shards.train))
    if carried is not None:
        restore_training(carried, optimizer, scheduler, worker.precision.scaler)
    for epoch in range(max(stage.first, state.epoch + 1), stage.last + 1):
        shards.set_epoch(epoch)
        started = time.perf_counter()
        first_step = scheduler.last_epoch
        meter = step_meter(worker, epoch, stage, len(shards.train), optimizer)
        loss_sum, seen = train_one_epoch(
            trained,
            shards.train,
            worker.criterion,
            optimizer,
            scheduler,
            worker.precision,
            hp.grad_clip_norm,
            spec.strategy.freeze_batch_norm,
            on_step=meter,
        )
        train_seconds = time.perf_counter() - started
        loss_sum, seen_all = all_reduce([loss_sum, float(seen)], worker.device)
        if spec.strategy.precise_batch_norm:
            first = shards.first_batches(precise_bn_share(worker.world), PRECISE_BN_BATCHES)
            recompute_batch_norm(evaluated, first, worker.device, spec.strategy.freeze_batch_norm)
        stats = evaluate(evaluated, shards.val, worker.criterion, worker.precision, len(worker.class_names))
        _warn_once(worker, shards.end_epoch(worker.device))
        warning = batch_norm_collapse(loss_sum / max(seen_all, 1), stats.accuracy, len(worker.class_names), evaluated)
        if warning is not None and worker.rank == 0 and not worker.warned_batch_norm:
            worker.warned_batch_norm = True  # once per run: the cause and the remedy do not change by epoch
            log.warning("%s: %s", worker.cfg.job_name, warning)
            worker.warnings.append(warning)
            if worker.sinks is not None:  # status.warnings, and the operator's TrainerWarning condition
                worker.sinks.warn(warning)
        state.observe(epoch, stats.accuracy, hp.early_stopping.min_delta if hp.early_stopping else 0.0)
        record = EpochRecord(
            epoch=epoch,
            stage=stage.name,
            train_loss=loss_sum / max(seen_all, 1),
            val_loss=stats.loss,
            val_accuracy=stats.accuracy,
            val_top5=stats.top5,
            images_per_second=seen_all / max(train_seconds, 1e-9),
            epoch_seconds=time.perf_counter() - started,
            lr=epoch_lr(scheduler, first_step),
        )
        if hp.early_stopping is not None and state.bad_epochs >= hp.early_stopping.patience:
            state.stopped_early = True
        # Facts about this attempt for Ray's result (tests and logs), not for metrics.jsonl.
        attempt = {
            "world_size": worker.world,
            "val_images": stats.count,
            "resumed_from": worker.resumed_from,
            "cached_features": uses_feature_cache(spec, stage),
        }
        if worker.tracker is not None and meter is not None:  # before the checkpoint: a resume purges from its step
            lrs = [float(g["lr"]) for g in optimizer.param_groups]
            worker.tracker.epoch(record, meter.global_step, state.best_val_accuracy, lrs, meter.epoch_accuracy())
        report_epoch(worker, record, state, optimizer, scheduler, attempt, frozen_backbone=stage.name == "probe")
        if worker.tracker is not None:  # the checkpoint is stored: MLflow, which cannot purge, gets the epoch now
            worker.tracker.committed(epoch)
        if worker.fail_after == epoch:
            raise RuntimeError(f"injected failure after epoch {epoch} (test hook {FAIL_AFTER_EPOCH_KEY})")
        if state.stopped_early:
            log.info("early stopping after epoch %d: no improvement for %d epochs", epoch, state.bad_epochs)
            return


def _warn_once(worker: Worker, warning: str | None) -> None:
    """A data warning (``Source.end_epoch``) on rank 0: the log, the model card and the job's status."""
    if warning is None or worker.rank != 0:
        return
    log.warning("%s: %s", worker.cfg.job_name, warning)
    worker.warnings.append(warning)
    if worker.sinks is not None:
        worker.sinks.warn(warning)
