"""A tiny model's artifact directory, written as a finished run writes it (``write_artifacts``): model.pt,
the card, the evaluation and whatever ``spec.output`` asks (exports, encryption, signature), for the tests
of what reads artifacts back (predict, verify, protection, exports) without training anything."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import Artifacts, FineTuneJobSpec
from finetune_trainer import artifacts as art
from finetune_trainer.evaluation import EvalResult
from finetune_trainer.inputs import InputSpec
from finetune_trainer.model import build_model


@dataclass(frozen=True)
class TinyRun:
    cfg: TrainerConfig
    model: nn.Module
    """The model whose weights model.pt holds, in eval mode."""
    artifacts: Artifacts

    @property
    def run_dir(self) -> Path:
        """The artifact directory, for runs written to a local path."""
        return Path(self.cfg.run_dir)


def write_tiny_artifacts(
    output_uri: str | Path,
    classes: Sequence[str],
    input_spec: InputSpec,
    *,
    job_name: str = "pets",
    output: Mapping[str, Any] | None = None,
    output_root: str | None = None,
    labels: Sequence[int] | None = None,
    best_val_accuracy: float = 1.0,
    shipped_epoch: int | None = None,
) -> TinyRun:
    """resnet18 with random weights (seed 0) for ``classes``, its artifacts written under
    ``<output_root or output_uri>/<job_name>``. ``output``: more of ``spec.output`` (exports, encryption,
    sign); ``output_root``: where the trainer writes when it is not ``output_uri`` (a store the spec refuses,
    such as fsspec's memory://). The evaluation predicts ``labels`` (default: each class once) right; the card's
    ``metrics.shipped`` is the line of ``shipped_epoch`` in a metrics.jsonl written beforehand."""
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "fake", "imageSize": 32, "fake": {"classes": len(classes)}},
            "output": {"uri": str(output_uri), **(output or {})},
        }
    )
    cfg = TrainerConfig(job_name=job_name, spec=spec, output_root=output_root or str(output_uri))
    torch.manual_seed(0)
    model = build_model("resnet18", None, len(classes))
    y = list(labels) if labels is not None else list(range(len(classes)))
    artifacts = art.write_artifacts(
        cfg.run_dir,
        model=model,
        cfg=cfg,
        class_names=list(classes),
        input_spec=input_spec,
        evaluation=EvalResult(y, y, list(classes)),
        best_val_accuracy=best_val_accuracy,
        best_epoch=1,
        checkpoint_uri=None,
        shipped_epoch=shipped_epoch,
    )
    return TinyRun(cfg=cfg, model=model.eval(), artifacts=artifacts)
