"""Optimisation of one stage: ``build_optimizer`` (parameter groups) and ``build_scheduler`` (``Schedule``).

The head trains at ``learningRate``, the unfrozen backbone at its own rate (``backbone_lr``); biases and
normalisation weights (one-dimensional parameters) get no weight decay, as in torchvision's
classification reference, nor do ViT's class token and position embedding, Swin's relative position bias
and ConvNeXt's layer scale (``strategy.NO_DECAY_NAMES``). The learning rate warms up linearly from 1%
(``warmupEpochs``, else ``DEFAULT_WARMUP``), then follows a cosine to zero, a step decay or stays flat;
it is stepped per optimizer step. Each stage of ``lp-ft`` gets a fresh optimizer and schedule; in its
fine-tune stage the head trains at the backbone's rate and the rate warms up over the first fifth of the
steps, so that the switch does not undo the probe. Torch only; called by the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import nn

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.stages import Stage
from finetune_trainer.strategy import ParamGroups

__all__ = ["DEFAULT_WARMUP", "Schedule", "backbone_lr", "build_optimizer", "build_scheduler", "epoch_lr"]


DEFAULT_WARMUP: Final = {"full": 0.1, "partial": 0.1, "lp-ft-finetune": 0.2}
"""Share of a stage's steps spent warming up, by method, unless ``warmupEpochs`` says otherwise: the new head's
gradients are large and random at first, and would otherwise shake the loaded backbone hardest. LP-FT's
fine-tune stage gets more: there the head is already fitted and the point is not to disturb it."""


def backbone_lr(spec: FineTuneJobSpec, stage: Stage) -> float:
    """The backbone's rate: ``backboneLearningRate``, else ``learningRate`` × ``backboneLrMultiplier``
    (default 1 for ``full``, 0.1 otherwise)."""
    hp = spec.hyperparameters
    if hp.backbone_learning_rate is not None:
        return hp.backbone_learning_rate
    default = 1.0 if stage.method == "full" else 0.1
    return hp.learning_rate * (hp.backbone_lr_multiplier if hp.backbone_lr_multiplier is not None else default)


def _exempt(param: nn.Parameter, groups: ParamGroups) -> bool:
    return param.ndim <= 1 or id(param) in groups.no_decay


def build_optimizer(spec: FineTuneJobSpec, stage: Stage, groups: ParamGroups) -> torch.optim.Optimizer:
    """Head and backbone at their own rates; no weight decay on biases, normalisation weights and the
    tokens, embeddings and scales of ``ParamGroups.no_decay``."""
    hp = spec.hyperparameters
    param_groups: list[dict[str, Any]] = []
    # After LP-FT's probe the head is already fitted: at the full rate, against a backbone that starts to move,
    # it would unlearn it (validation accuracy fell from 59% to 37% at the switch). It follows the backbone's rate.
    head_lr = backbone_lr(spec, stage) if stage.method == "lp-ft-finetune" else hp.learning_rate
    for name, params, lr in (("head", groups.head, head_lr), ("backbone", groups.backbone, backbone_lr(spec, stage))):
        for suffix, chosen, decay in (
            ("", [p for p in params if not _exempt(p, groups)], hp.weight_decay),
            ("_no_decay", [p for p in params if _exempt(p, groups)], 0.0),
        ):
            if chosen:
                param_groups.append({"params": chosen, "lr": lr, "weight_decay": decay, "name": name + suffix})
    fused = _fusable([p for group in param_groups for p in group["params"]])
    if hp.optimizer == "sgd":
        sgd = torch.optim.SGD(param_groups, lr=hp.learning_rate, momentum=hp.momentum, nesterov=hp.momentum > 0, fused=fused)
        if fused and hp.momentum > 0:
            # Fused SGD's first step makes its momentum buffers with torch.empty_like and the kernel returns early
            # when fp16's GradScaler found inf gradients (its first steps often do): the next step would read that
            # uninitialised memory as momentum. Zeros are the same first step (momentum × 0 + gradient).
            for param in (p for group in param_groups for p in group["params"]):
                sgd.state[param]["momentum_buffer"] = torch.zeros_like(param)
        return sgd
    return torch.optim.AdamW(param_groups, lr=hp.learning_rate, fused=fused)


FUSED_DEVICES: Final = frozenset({"cpu", "cuda"})
"""Where torch's fused AdamW and SGD kernels run (of the devices a job trains on)."""


def _fusable(params: list[nn.Parameter]) -> bool | None:
    """True (one fused kernel per step) when every parameter is a float tensor on a device that has the kernel; None,
    torch's default (its ``foreach`` implementation), otherwise. The update is the same; fused is faster everywhere
    torch ships it: a resnet18 step on one CPU thread took 110 ms of AdamW with ``foreach`` and 19 ms fused (SGD with
    momentum 38 → 13 ms), a quarter of the whole step (bench/README.md, "Fused optimizer"); on CUDA it launches one
    kernel where ``foreach`` launches several. Checkpoints load either way: the state is the same."""
    ok = bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    return True if ok else None


@dataclass
class Schedule:
    """Learning-rate factor per optimizer step: linear warm-up from 1%, then cosine, step or flat.
    A callable object rather than a closure so that LambdaLR's state_dict keeps its numbers."""

    kind: str
    warmup_steps: int
    total_steps: int
    step_every: int
    gamma: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.01 + 0.99 * step / self.warmup_steps
        after = step - self.warmup_steps
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, after / max(1, self.total_steps - self.warmup_steps))))
        if self.kind == "step":
            return float(self.gamma ** (after // self.step_every))
        return 1.0


def build_scheduler(
    spec: FineTuneJobSpec, stage: Stage, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The stage's ``Schedule`` in steps: warm-up of ``warmupEpochs`` (at most all but the stage's last
    epoch; by default the share of the stage's steps in ``DEFAULT_WARMUP``), step decay every
    ``stepSize`` epochs (default a third of the stage)."""
    hp = spec.hyperparameters
    step_epochs = hp.step_size or max(1, stage.epochs // 3)
    if hp.warmup_epochs is not None:
        warmup = min(hp.warmup_epochs, stage.epochs - 1) * steps_per_epoch
    else:
        warmup = round(DEFAULT_WARMUP.get(stage.method, 0.0) * stage.epochs * steps_per_epoch)
    schedule = Schedule(
        kind=hp.scheduler,
        warmup_steps=warmup,
        total_steps=stage.epochs * steps_per_epoch,
        step_every=step_epochs * steps_per_epoch,
        gamma=hp.gamma,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def epoch_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, first_step: int) -> float:
    """The head's learning rate averaged over the optimizer steps of the epoch that began at ``first_step``
    (the scheduler's ``last_epoch`` before it) and has just ended: what the epoch trained with. The rate
    the optimizer holds now is already the next step's (0 after the last step of a cosine)."""
    steps = range(first_step, scheduler.last_epoch)
    lam = scheduler.lr_lambdas[0]
    base = float(scheduler.base_lrs[0])
    if not steps:
        return base * float(lam(first_step))
    return base * sum(float(lam(s)) for s in steps) / len(steps)
