"""The end of a run on rank 0: which weights ship, their final evaluation, the artifacts (``finish_run``).

The shipped ``model.pt`` holds the best epoch's weights, the ones the status and the model card report
(with early stopping the last epoch is by construction ``patience`` epochs past them): the loop's model
when the last epoch is the best, else the weights of the best checkpoint (``TrainState.best_checkpoint``,
which Ray's retention keeps). ``evaluation.json``, the confusion matrix, the exports and the card's
``metrics.shipped`` all describe those same weights. Should the best checkpoint be unusable, the last
epoch's weights ship instead, with a warning, and everything describes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.timestamps import utc_now
from finetune_operator.api.v1alpha1 import Progress
from finetune_trainer import storage
from finetune_trainer.artifacts import RunFacts, write_artifacts
from finetune_trainer.checkpoint import CorruptCheckpoint, TrainState, checkpoint_dir_name
from finetune_trainer.engine import Precision, evaluate
from finetune_trainer.evaluation import EvalResult
from finetune_trainer.image_folder import StreamedImages
from finetune_trainer.inputs import InputSpec
from finetune_trainer.model import StartingWeights
from finetune_trainer.progress import ProgressSink
from finetune_trainer.protect import keyring_for
from finetune_trainer.resume import read_weights
from finetune_trainer.unreadable import Unreadable, readable_batches

__all__ = ["finish_run"]

log = logging.getLogger(__name__)


def _ship_weights(
    cfg: TrainerConfig,
    fingerprint: str,
    model: nn.Module,
    state: TrainState,
    sinks: ProgressSink | None,
    warnings: list[str],
    start: StartingWeights | None,
) -> tuple[str, int]:
    """Put the shipped weights into ``model``; return (their checkpoint's name, their epoch). ``start``: the
    starting weights, under a frozen-backbone checkpoint's stored part (``checkpoint.full_weights``)."""
    last = (checkpoint_dir_name(state.epoch, state.lineage), state.epoch)
    # A checkpoint written before best_checkpoint existed names its best epoch only (never after a fallback).
    best = state.best_checkpoint or (checkpoint_dir_name(state.best_epoch) if state.best_epoch is not None else None)
    if best is None or state.best_epoch is None or best == last[0]:
        return last  # the loop's model holds them already
    try:
        encrypted = keyring_for(cfg) is not None
        weights = read_weights(cfg.run_dir, best, fingerprint, encrypted=encrypted, start=start)
    except CorruptCheckpoint as e:
        warning = f"{e}; model.pt holds the last epoch's weights (epoch {state.epoch}) instead of the best"
        log.warning("%s", warning)
        warnings.append(warning)
        if sinks is not None:
            sinks.warn(warning)
        return last
    model.load_state_dict(weights)
    return best, state.best_epoch


def finish_run(
    cfg: TrainerConfig,
    *,
    fingerprint: str | None = None,
    model: nn.Module,
    class_names: list[str],
    precision: Precision,
    criterion: nn.Module,
    val: Dataset[Any],
    state: TrainState,
    input_spec: InputSpec,
    sinks: ProgressSink | None,
    facts: RunFacts | None = None,
    start: StartingWeights | None = None,
    streamed: Callable[[int, Unreadable], Iterable[tuple[Tensor, Tensor]]] | None = None,
) -> None:
    """Rank 0: load the shipped weights into ``model``, evaluate them on the whole validation set,
    write the artifacts and close the sinks. ``facts``: what the loop knows for the model card.
    ``streamed``: the validation batches (batch size, tally) streamed by Ray Data, when they were listed for it.
    ``fingerprint``: the checkpoints' (``worker_report.Worker.fingerprint``; default: ``cfg``'s)."""
    spec = cfg.spec
    total = spec.hyperparameters.epochs
    if sinks is not None:
        percent = 100.0 if state.epoch >= total else round(100 * state.epoch / total, 2)
        sinks.update(Progress(epoch=state.epoch, total_epochs=total, percent=percent, stage="evaluate", updated_at=utc_now()))
    facts = facts or RunFacts()
    fingerprint = fingerprint or cfg.spec_fingerprint()
    name, epoch = _ship_weights(cfg, fingerprint, model, state, sinks, facts.warnings, start)
    # Eval mode: any batch size gives the same numbers (a spec not yet planned has none).
    per_batch = max(2, spec.hyperparameters.batch_size or 64)
    tally = Unreadable()
    # Streamed images were listed, never scanned: an unreadable one is skipped and counted, as in the per-epoch
    # evaluation and under the same limit, instead of failing the run at its very end.
    batches: Any
    if streamed is not None:
        batches = streamed(per_batch, tally)
    elif isinstance(val, StreamedImages):  # listed, read here: a caller without Ray Data
        batches = readable_batches(val, per_batch, tally)
    else:
        batches = DataLoader(val, batch_size=per_batch, shuffle=False)
    stats = evaluate(model, batches, criterion, precision, len(class_names), reduce=False)
    warning = tally.check_here()
    if warning is not None:
        warning = f"final evaluation: {warning}"
        log.warning("%s", warning)
        facts.warnings.append(warning)
    if sinks is not None:
        sinks.update(Progress(epoch=state.epoch, total_epochs=total, percent=100.0, stage="export", updated_at=utc_now()))
    artifacts = write_artifacts(
        cfg.run_dir,
        model=model,
        cfg=cfg,
        class_names=class_names,
        input_spec=input_spec,
        evaluation=EvalResult(y_true=stats.y_true, y_pred=stats.y_pred, class_names=class_names),
        best_val_accuracy=state.best_val_accuracy,
        best_epoch=state.best_epoch,
        checkpoint_uri=storage.join(cfg.run_dir, name) if state.epoch > 0 else None,
        shipped_epoch=epoch if state.epoch > 0 else None,
        facts=facts,
    )
    if sinks is not None:
        sinks.finish(artifacts)
