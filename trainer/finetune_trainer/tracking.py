"""Experiment tracking on rank 0 (``spec.tracking``): TensorBoard event files and the optional MLflow run.

``Tracker.open`` starts both; the loop feeds per-step points (``step``, from ``step_progress``), per-epoch
records (``epoch``) and, at the end, the shipped model's confusion matrix and sample predictions
(``finish``). The events go to ``<run dir>/tensorboard/``; with a remote run directory they are written
to a local folder and uploaded there after every epoch and at the end, like the other artifacts (only
the files whose size changed: event files grow, and re-sending them whole would cost quadratic bytes).

Every TensorBoard point has the global optimizer step as its step, epoch points too (at the step their
epoch ended, with ``epoch/epoch`` naming the epoch): one axis is what lets a resume purge. Resume:
``<run dir>/tracking.json`` maps each finished epoch to the global step it ended at, and keeps the MLflow
run id. A relaunch from epoch E (or from none, when event files exist, local or in the object store)
opens the writer with ``purge_step`` = that step + 1, so TensorBoard's readers drop what the crashed
attempt logged after the checkpoint and nothing appears twice. The MLflow run continues under the same id;
MLflow cannot drop points, so an epoch's metrics are logged only once its checkpoint is written
(``committed``): a crash in between loses that epoch's MLflow points rather than logging them twice.
Tracking is never fatal: a failure is one warning (``on_warning``, i.e. status.warnings) and that sink
goes quiet.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from finetune_operator.api.contract import TrainerConfig
from finetune_trainer import storage
from finetune_trainer.errors import TrainerError, exception_line
from finetune_trainer.inputs import InputSpec
from finetune_trainer.metrics_log import EpochRecord
from finetune_trainer.mlflow_sink import MlflowSink
from finetune_trainer.protect import server_side_key

__all__ = ["STATE_FILE", "TB_DIR", "Tracker", "hparams_of"]

log = logging.getLogger(__name__)

TB_DIR: Final = "tensorboard"
STATE_FILE: Final = "tracking.json"
SAMPLES: Final = 16
# The run directory's files MLflow receives at the end (checkpoints stay with Ray Train's retention).
_ARTIFACT_SUFFIXES: Final = (".pt", ".json", ".jsonl", ".png", ".onnx", ".sig")
_REMOTE_ARTIFACTS: Final = (
    "model.pt", "model.json", "model.json.sig", "metrics.jsonl", "evaluation.json", "training_curves.png", "confusion_matrix.png",
    "model.torchscript.pt", "model.onnx", STATE_FILE,
)  # fmt: skip


def hparams_of(cfg: TrainerConfig) -> dict[str, Any]:
    """The spec as flat ``section.field`` parameters (scalars as they are, lists as text, unset ones left out)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, bool | int | float | str):
            flat[prefix] = value
        elif value is not None:
            flat[prefix] = json.dumps(value)

    spec = cfg.spec.model_dump(by_alias=True, mode="json", exclude_none=True, exclude={"runtime", "run_policy", "tracking"})
    walk("", spec)
    return flat


class Tracker:
    """Rank 0's TensorBoard writer and MLflow run; see the module docstring."""

    def __init__(self, cfg: TrainerConfig, resumed_epoch: int, on_warning: Callable[[str], None]) -> None:
        self.cfg = cfg
        self._warn = on_warning
        self._state = self._read_state()
        epochs: dict[str, int] = self._state.setdefault("epochs", {})
        # The step the checkpoint's epoch ended at; steps the crashed attempt logged after it are purged.
        self.global_step = int(epochs.get(str(resumed_epoch), 0)) if resumed_epoch > 0 else 0
        for later in [e for e in epochs if int(e) > resumed_epoch]:
            del epochs[later]
        self._remote = storage.is_remote(cfg.run_dir)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._uploaded: dict[str, int] = {}  # event file name -> the size last uploaded
        self._pending: tuple[int, dict[str, float | None]] | None = None  # MLflow metrics awaiting their checkpoint
        self.writer: Any = None
        tb = cfg.spec.tracking.tensorboard
        if tb.enabled:
            self._open_writer(resumed=bool(epochs) or resumed_epoch > 0 or self._has_events())
        mlflow_spec = cfg.spec.tracking.mlflow
        self.mlflow = None if mlflow_spec is None else MlflowSink(mlflow_spec, cfg.job_name, on_warning)
        if self.mlflow is not None:
            run_id = self.mlflow.start(self._state.get("mlflowRunId"), hparams_of(cfg))
            if run_id is not None and run_id != self._state.get("mlflowRunId"):
                self._state["mlflowRunId"] = run_id
                self._save_state()

    # ------------------------------------------------------------------------------- tensorboard
    @property
    def log_dir(self) -> Path:
        """Where the writer writes: the run directory's tensorboard/ when it is local, a temporary folder otherwise."""
        if self._tmp is not None:
            return Path(self._tmp.name)
        return storage.local_path(storage.join(self.cfg.run_dir, TB_DIR))

    def _has_events(self) -> bool:
        """Whether an earlier attempt wrote event files (a relaunch before the first checkpoint must purge them too)."""
        if not self._remote:
            return self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        try:
            return any(n.startswith("events.out.tfevents.") for n in storage.list_sizes(storage.join(self.cfg.run_dir, TB_DIR)))
        except OSError as exc:
            log.warning("could not list the remote event files (%s); assuming an earlier attempt wrote some", exception_line(exc))
            return True  # a purge of nothing costs nothing; a missed one duplicates steps

    def _open_writer(self, resumed: bool) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            if self._remote:
                self._tmp = tempfile.TemporaryDirectory(prefix="finetune-tb-")
            # purge_step: TensorBoard's readers drop the earlier events at or after it; the epoch's own points
            # sit at its last step, which the checkpoint covers.
            self.writer = SummaryWriter(str(self.log_dir), purge_step=self.global_step + 1 if resumed else None)
            if not resumed:
                self._write_hparams()
        except Exception as exc:
            self._tb_failed("open", exc)

    def _write_hparams(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = {"epoch/val_accuracy": 0.0, "epoch/val_loss": 0.0, "epoch/best_val_accuracy": 0.0}
        for summary in hparams(hparams_of(self.cfg), metrics):  # type: ignore[no-untyped-call]
            self.writer.file_writer.add_summary(summary)

    def _tb_failed(self, what: str, exc: BaseException) -> None:
        message = f"TensorBoard events could not be written ({what}: {exception_line(exc)}); training goes on without them"
        log.warning("%s", message)
        self._warn(message)
        writer, self.writer = self.writer, None
        if writer is not None:
            try:  # its event file and flush thread
                writer.close()
            except Exception as close_exc:
                log.warning("TensorBoard writer did not close: %s", exception_line(close_exc))

    def _tb(self, what: str, fn: Callable[[Any], None]) -> None:
        if self.writer is None:
            return
        try:
            fn(self.writer)
        except Exception as exc:
            self._tb_failed(what, exc)

    def step(
        self, global_step: int, loss: float, lrs: Sequence[float], images_per_second: float, accuracy: float | None = None
    ) -> None:
        """One per-step point: training loss and accuracy (means since the last point, the first worker's batches),
        each param group's rate, throughput."""

        def write(w: Any) -> None:
            w.add_scalar("step/train_loss", loss, global_step)
            if accuracy is not None:
                w.add_scalar("step/train_accuracy", accuracy, global_step)
            w.add_scalar("step/images_per_second", images_per_second, global_step)
            for i, lr in enumerate(lrs):
                w.add_scalar(f"step/lr/group{i}", lr, global_step)

        self._tb("step", write)

    def epoch(
        self,
        record: EpochRecord,
        global_step: int,
        best: float | None,
        lrs: Sequence[float],
        train_accuracy: float | None = None,
    ) -> None:
        """The finished epoch's numbers (``train_accuracy``: the first worker's shard); remembers the global step it
        ended at (for a resume)."""
        self.global_step = global_step
        scalars: dict[str, float | None] = {
            "epoch/epoch": record.epoch,
            "epoch/train_loss": record.train_loss,
            "epoch/train_accuracy": train_accuracy,
            "epoch/val_loss": record.val_loss,
            "epoch/val_accuracy": record.val_accuracy,
            "epoch/val_top5": record.val_top5,
            "epoch/best_val_accuracy": best,
            "epoch/images_per_second": record.images_per_second,
            "epoch/epoch_seconds": record.epoch_seconds,
            "epoch/lr": record.lr,
        }
        scalars |= {f"epoch/lr/group{i}": lr for i, lr in enumerate(lrs)}

        def write(w: Any) -> None:
            for tag, value in scalars.items():
                if value is not None:
                    w.add_scalar(tag, value, global_step)
            w.flush()

        self._tb("epoch", write)
        self._state["epochs"][str(record.epoch)] = global_step
        self._save_state()
        self._upload()
        if self.mlflow is not None:
            named = {k.removeprefix("epoch/").replace("/", "_"): v for k, v in scalars.items() if k != "epoch/epoch"}
            self._pending = (record.epoch, named)

    def committed(self, epoch: int) -> None:
        """Epoch ``epoch``'s checkpoint is written: its MLflow metrics may go now (see the module docstring)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == epoch and self.mlflow is not None:
            self.mlflow.log_metrics(pending[1], epoch)

    # ------------------------------------------------------------------------------------ the end
    def finish(self, model: nn.Module, val: Dataset[tuple[Tensor, int]], class_names: list[str], inputs: InputSpec) -> None:
        """The shipped model's confusion matrix and sample predictions as images; the MLflow artifacts; close."""
        step = self.global_step
        self._tb("confusion matrix", lambda w: self._add_png(w, "eval/confusion_matrix", "confusion_matrix.png", step))
        self._tb("training curves", lambda w: self._add_png(w, "eval/training_curves", "training_curves.png", step))

        def samples(w: Any) -> None:
            figure = _samples(model, val, class_names, inputs)
            if figure is not None:  # None: none of the first images could be read
                w.add_figure("eval/sample_predictions", figure, step)

        self._tb("sample predictions", samples)
        self._tb("close", lambda w: w.close())
        self._upload()
        if self.mlflow is not None:
            self._log_artifacts(self.mlflow)
            self.mlflow.end()
        if self._tmp is not None:
            self._tmp.cleanup()

    def _log_artifacts(self, mlflow: MlflowSink) -> None:
        if not self._remote:
            run_dir = storage.local_path(self.cfg.run_dir)
            mlflow.log_artifacts(sorted(p for p in run_dir.iterdir() if p.is_file() and p.suffix in _ARTIFACT_SUFFIXES))
        else:  # the files live in the object store: each known one through a local copy
            with tempfile.TemporaryDirectory(prefix="finetune-mlflow-") as tmp:
                copies: list[Path] = []
                for name in _REMOTE_ARTIFACTS:
                    try:
                        data = storage.read_bytes(storage.join(self.cfg.run_dir, name))
                    except OSError:  # not written by this job (an export it did not ask for), or unreadable
                        continue
                    copies.append(Path(tmp) / name)
                    copies[-1].write_bytes(data)
                mlflow.log_artifacts(copies)
        mlflow.log_artifacts(sorted(self.log_dir.glob("events.out.tfevents.*")), TB_DIR)

    def fail(self) -> None:
        """The run failed: flush what was logged, mark the MLflow run failed."""
        self._tb("close", lambda w: w.close())
        self._upload()
        if self.mlflow is not None:
            self.mlflow.end(failed=True)

    def _add_png(self, writer: Any, tag: str, name: str, step: int) -> None:
        from PIL import Image

        try:
            data = storage.read_bytes(storage.join(self.cfg.run_dir, name))
        except FileNotFoundError:
            return
        import numpy as np

        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        writer.add_image(tag, image, step, dataformats="HWC")

    # ------------------------------------------------------------------------- state and upload
    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(storage.read_text(storage.join(self.cfg.run_dir, STATE_FILE)))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s); tracking starts afresh", STATE_FILE, exception_line(exc))
            return {}
        return state if isinstance(state, dict) else {}

    def _save_state(self) -> None:
        try:
            storage.write_text(storage.join(self.cfg.run_dir, STATE_FILE), json.dumps(self._state, indent=1) + "\n")
        except OSError as exc:
            log.warning("could not write %s: %s", STATE_FILE, exception_line(exc))

    def _upload(self) -> None:
        """Copy the local event files that changed since their last upload to a remote run directory (each whole:
        an object store has no append; the writer starts a new file only when reopened)."""
        if self._tmp is None:
            return
        for path in Path(self._tmp.name).glob("events.out.tfevents.*"):
            size = path.stat().st_size
            if self._uploaded.get(path.name) == size:
                continue
            try:
                storage.upload_file(path, storage.join(self.cfg.run_dir, TB_DIR, path.name), kms_key=server_side_key(self.cfg))
                self._uploaded[path.name] = size
            except OSError as exc:
                log.warning("could not upload %s: %s", path.name, exception_line(exc))


def _first_readable(val: Dataset[tuple[Tensor, int]], count: int) -> list[tuple[Tensor, int]]:
    """The first ``count`` validation images that can be read. A streamed dataset is listed, never scanned: an
    unreadable image (skipped and counted in the evaluation) is passed over here too, among at most 4 × ``count``
    tried, rather than costing the run its figure and its TensorBoard log."""
    found: list[tuple[Tensor, int]] = []
    for i in range(min(4 * count, len(val))):  # type: ignore[arg-type]
        try:
            found.append(val[i])
        except TrainerError:
            continue
        if len(found) == count:
            break
    return found


def _samples(model: nn.Module, val: Dataset[tuple[Tensor, int]], class_names: list[str], inputs: InputSpec) -> Any:
    """A grid of the first validation images, each titled with its predicted and true label (red when wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown_items = _first_readable(val, SAMPLES)
    count = len(shown_items)
    if not count:
        return None
    images = torch.stack([image for image, _ in shown_items])
    labels = [int(label) for _, label in shown_items]
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        predicted = model(images.to(device)).argmax(dim=1).tolist()
    mean, std = torch.tensor(inputs.mean).view(-1, 1, 1), torch.tensor(inputs.std).view(-1, 1, 1)
    cols = 4
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, guess in zip(axes.flat, images, labels, predicted, strict=False):
        shown = (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        ax.imshow(shown)
        # parse_math off: class names are the tenant's folder names, and '$...$' would be parsed as mathtext.
        title = f"{class_names[guess]} ({class_names[label]})"
        ax.set_title(title, color="black" if guess == label else "red", fontsize=8, parse_math=False)
    fig.tight_layout()
    return fig
