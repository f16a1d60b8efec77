"""Optimisation of a stage: the learning-rate schedule, the backbone's rate, and the parameter groups
(no weight decay on biases and normalisation weights). Tiny modules, no Ray."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torchvision import models
from torchvision.models.convnext import CNBlockConfig

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.optim import Schedule, backbone_lr, build_optimizer, build_scheduler, epoch_lr
from finetune_trainer.stages import Stage, plan_stages
from finetune_trainer.strategy import ParamGroups, apply_strategy


def make_spec(method: str = "full", epochs: int = 6, **hp: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "fake", "imageSize": 32},
            "output": {"uri": "/tmp/out"},
            "strategy": {"method": method, **({"unfreezeBlocks": 1} if method == "partial" else {})},
            "hyperparameters": {"epochs": epochs, **hp},
        }
    )


def last_stage(spec: FineTuneJobSpec) -> Stage:
    return plan_stages(spec)[-1]


# ------------------------------------------------------------------------------------------ schedule
COSINE = Schedule("cosine", warmup_steps=10, total_steps=110, step_every=1, gamma=0.1)
STEP = Schedule("step", warmup_steps=0, total_steps=100, step_every=10, gamma=0.1)
FLAT = Schedule("none", warmup_steps=4, total_steps=100, step_every=1, gamma=0.1)


@pytest.mark.parametrize(
    ("schedule", "step", "factor"),
    [
        # linear warm-up from 1% of the rate
        (COSINE, 0, 0.01),
        (COSINE, 5, 0.01 + 0.99 * 0.5),
        (COSINE, 9, 0.01 + 0.99 * 0.9),
        # then a cosine from the full rate down to zero at the end, and zero after it
        (COSINE, 10, 1.0),
        (COSINE, 60, 0.5),
        (COSINE, 35, 0.5 * (1 + math.cos(math.pi / 4))),
        (COSINE, 110, 0.0),
        (COSINE, 500, 0.0),
        # step decay: gamma per step_every steps
        (STEP, 0, 1.0),
        (STEP, 9, 1.0),
        (STEP, 10, 0.1),
        (STEP, 25, 0.01),
        (Schedule("step", 0, 100, step_every=5, gamma=0.5), 15, 0.125),
        (Schedule("step", 3, 100, step_every=5, gamma=0.5), 8, 0.5),  # decays count from the warm-up's end
        # flat after the warm-up
        (FLAT, 0, 0.01),
        (FLAT, 2, 0.01 + 0.99 * 0.5),
        (FLAT, 4, 1.0),
        (FLAT, 1000, 1.0),
    ],
)
def test_schedule(schedule: Schedule, step: int, factor: float) -> None:
    assert schedule(step) == pytest.approx(factor, abs=1e-12)


@pytest.mark.parametrize(
    ("hp", "steps_per_epoch", "expected"),
    [
        # 4 epochs of 5 steps, one epoch of warm-up, cosine over the other 15 steps
        ({"scheduler": "cosine", "warmupEpochs": 1}, 5, Schedule("cosine", 5, 20, 5, 0.1)),
        ({"scheduler": "cosine", "warmupEpochs": 3}, 5, Schedule("cosine", 15, 20, 5, 0.1)),
        # step decay every third of the stage by default, else every stepSize epochs
        ({"scheduler": "step", "warmupEpochs": 0}, 3, Schedule("step", 0, 12, 3, 0.1)),
        ({"scheduler": "step", "stepSize": 2, "gamma": 0.5, "warmupEpochs": 0}, 3, Schedule("step", 0, 12, 6, 0.5)),
        ({"scheduler": "none", "warmupEpochs": 0}, 7, Schedule("none", 0, 28, 7, 0.1)),
        # no warmupEpochs: a stage that trains the backbone warms up over a tenth of its steps (full, partial)
        ({"scheduler": "cosine"}, 5, Schedule("cosine", 2, 20, 5, 0.1)),
        ({"scheduler": "none"}, 7, Schedule("none", 3, 28, 7, 0.1)),
    ],
)
def test_build_scheduler(hp: dict[str, Any], steps_per_epoch: int, expected: Schedule) -> None:
    spec = make_spec("full", 4, **hp)
    param = nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = build_scheduler(spec, last_stage(spec), optimizer, steps_per_epoch)
    assert scheduler.lr_lambdas == [expected]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * expected(0))  # the first step's rate is set at once


@pytest.mark.parametrize(
    ("warmup", "probe_schedule", "finetune_schedule"),
    [
        # by default only the fine-tune stage warms up, over a fifth of its 14 steps
        (None, Schedule("cosine", 0, 6, 2, 0.1), Schedule("cosine", 3, 14, 4, 0.1)),
        # an explicit warm-up applies to each stage, 0 to neither
        (0, Schedule("cosine", 0, 6, 2, 0.1), Schedule("cosine", 0, 14, 4, 0.1)),
        (1, Schedule("cosine", 2, 6, 2, 0.1), Schedule("cosine", 2, 14, 4, 0.1)),
        # 5 warm-up epochs do not fit the 3-epoch probe: capped at all but its last epoch
        (5, Schedule("cosine", 4, 6, 2, 0.1), Schedule("cosine", 10, 14, 4, 0.1)),
    ],
)
def test_lp_ft_schedules_each_stage_on_its_own(warmup: int | None, probe_schedule: Schedule, finetune_schedule: Schedule) -> None:
    spec = make_spec(
        "lp-ft", 10, **({} if warmup is None else {"warmupEpochs": warmup})
    )  # probe 1-3, fine-tune 4-10, 2 steps each
    probe, finetune = plan_stages(spec)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert build_scheduler(spec, probe, optimizer, 2).lr_lambdas == [probe_schedule]
    assert build_scheduler(spec, finetune, optimizer, 2).lr_lambdas == [finetune_schedule]


# ----------------------------------------------------------------------------------- backbone rate
@pytest.mark.parametrize(
    ("method", "hp", "expected"),
    [
        ("full", {"learningRate": 0.01}, 0.01),  # nothing frozen: the same rate everywhere
        ("partial", {"learningRate": 0.01}, 0.001),  # a tenth by default
        ("lp-ft", {"learningRate": 0.01}, 0.001),
        ("full", {"learningRate": 0.01, "backboneLrMultiplier": 0.5}, 0.005),
        ("lp-ft", {"learningRate": 0.01, "backboneLrMultiplier": 0.25}, 0.0025),
        ("partial", {"learningRate": 0.01, "backboneLearningRate": 0.02}, 0.02),  # absolute wins
    ],
)
def test_backbone_lr(method: str, hp: dict[str, Any], expected: float) -> None:
    spec = make_spec(method, 6, **hp)
    assert backbone_lr(spec, last_stage(spec)) == pytest.approx(expected)


# ------------------------------------------------------------------------------------ param groups
class Tiny(nn.Module):
    """A conv + BatchNorm backbone and a linear head: weights, biases and norm weights of both kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


def _groups(model: Tiny, backbone: bool) -> ParamGroups:
    params = dict(model.named_parameters())
    return ParamGroups(
        head=[params["fc.weight"], params["fc.bias"]],
        backbone=[p for name, p in params.items() if not name.startswith("fc.")] if backbone else [],
    )


@pytest.mark.parametrize(
    ("method", "hp", "kind", "expected"),
    [
        (
            "full",
            {"optimizer": "adamw", "learningRate": 1e-3, "weightDecay": 0.05},
            torch.optim.AdamW,
            [
                ("head", 1e-3, 0.05, ["fc.weight"]),
                ("head_no_decay", 1e-3, 0.0, ["fc.bias"]),
                ("backbone", 1e-3, 0.05, ["conv.weight"]),
                ("backbone_no_decay", 1e-3, 0.0, ["conv.bias", "bn.weight", "bn.bias"]),
            ],
        ),
        (
            "partial",
            {"optimizer": "sgd", "learningRate": 0.1, "weightDecay": 1e-4},
            torch.optim.SGD,
            [
                ("head", 0.1, 1e-4, ["fc.weight"]),
                ("head_no_decay", 0.1, 0.0, ["fc.bias"]),
                ("backbone", 0.01, 1e-4, ["conv.weight"]),
                ("backbone_no_decay", 0.01, 0.0, ["conv.bias", "bn.weight", "bn.bias"]),
            ],
        ),
        (
            "lp-ft",
            {"optimizer": "sgd", "learningRate": 0.1, "backboneLearningRate": 0.003, "weightDecay": 0.0},
            torch.optim.SGD,
            [
                # the probed head follows the backbone's rate in the fine-tune stage (the switch must not undo the probe)
                ("head", 0.003, 0.0, ["fc.weight"]),
                ("head_no_decay", 0.003, 0.0, ["fc.bias"]),
                ("backbone", 0.003, 0.0, ["conv.weight"]),
                ("backbone_no_decay", 0.003, 0.0, ["conv.bias", "bn.weight", "bn.bias"]),
            ],
        ),
        (
            "linear-probe",  # a frozen backbone: no backbone groups at all
            {"optimizer": "adamw", "learningRate": 0.02, "weightDecay": 1e-4},
            torch.optim.AdamW,
            [("head", 0.02, 1e-4, ["fc.weight"]), ("head_no_decay", 0.02, 0.0, ["fc.bias"])],
        ),
    ],
)
def test_param_groups(method: str, hp: dict[str, Any], kind: type, expected: list[tuple[str, float, float, list[str]]]) -> None:
    spec = make_spec(method, 6, **hp)
    model = Tiny()
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(spec, last_stage(spec), _groups(model, backbone=method != "linear-probe"))
    assert type(optimizer) is kind
    got = [(g["name"], g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]
    assert got == [(n, pytest.approx(lr), pytest.approx(wd), params) for n, lr, wd, params in expected]


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.9, True), (0.5, True), (0.0, False)])
def test_sgd_is_nesterov_when_it_has_momentum(momentum: float, nesterov: bool) -> None:
    spec = make_spec("full", 6, optimizer="sgd", momentum=momentum)
    optimizer = build_optimizer(spec, last_stage(spec), _groups(Tiny(), backbone=True))
    assert {(g["momentum"], g["nesterov"]) for g in optimizer.param_groups} == {(momentum, nesterov)}


def _loss(model: Tiny, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images, targets = torch.randn(4, 3, 6, 6, generator=generator), torch.randint(0, 2, (4,), generator=generator)
    return nn.functional.cross_entropy(model.fc(model.bn(model.conv(images)).mean(dim=(2, 3))), targets)


def _steps(model: Tiny, optimizer: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        optimizer.zero_grad(set_to_none=True)
        _loss(model, seed).backward()
        optimizer.step()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_the_optimizer_is_fused_and_resumes_a_checkpoint_of_the_unfused_one(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One fused kernel per step where torch has one (CPU and CUDA; the unfused AdamW was a quarter of a resnet18 step
    on a CPU thread). The update is the one torch's default (foreach) makes, and a checkpoint written before (unfused)
    resumes fused."""
    from finetune_trainer import optim
    from finetune_trainer.checkpoint import restore_training

    spec = make_spec("full", 6, optimizer=kind, learningRate=0.01, weightDecay=0.01, momentum=0.9)

    def build(model: Tiny) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = build_optimizer(spec, last_stage(spec), _groups(model, backbone=True))
        return optimizer, build_scheduler(spec, last_stage(spec), optimizer, 6)

    torch.manual_seed(0)
    model = Tiny()
    with monkeypatch.context() as before:  # the optimizer as built before fused kernels: torch's default
        before.setattr(optim, "_fusable", lambda params: None)
        default, schedule = build(model)
    assert {g["fused"] for g in default.param_groups} == {None}
    _steps(model, default, range(3))
    saved = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(default.state_dict()),  # its tensors are the live state, which the next steps change
        "scheduler": schedule.state_dict(),
        "scaler": {},
    }
    _steps(model, default, range(3, 6))  # the run that never stopped, unfused

    resumed = Tiny()
    resumed.load_state_dict(saved["model"])
    optimizer, scheduler = build(resumed)
    assert optimizer.defaults["fused"] is True
    restore_training(saved, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))
    assert {g["fused"] for g in optimizer.param_groups} == {True}  # not the checkpoint's None
    _steps(resumed, optimizer, range(3, 6))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_first_step_the_amp_scaler_skips_leaves_no_garbage_in_the_fused_state(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16's GradScaler starts at 65536 and often skips the first step (inf gradients). Fused SGD makes its momentum
    buffers with torch.empty_like before the kernel, which then returns early on found_inf (CPU and CUDA alike): the
    next step read uninitialised memory as momentum. Simulated here: empty_like's memory is NaN. The run must go on as
    the unfused one does (GradScaler skips its step outright)."""
    from finetune_trainer import optim

    spec = make_spec("full", 6, optimizer=kind, learningRate=0.01, weightDecay=0.01, momentum=0.9)
    runs = []
    for fusable in (lambda params: None, optim._fusable):
        torch.manual_seed(0)
        model = Tiny()
        with monkeypatch.context() as patch:
            patch.setattr(optim, "_fusable", fusable)
            optimizer = build_optimizer(spec, last_stage(spec), _groups(model, backbone=True))
        with monkeypatch.context() as garbage:
            garbage.setattr(torch, "empty_like", lambda t, **kw: torch.full_like(t, math.nan, **kw))
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
            for seed, scale in ((0, math.inf), (1, 1.0), (2, 1.0)):
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(_loss(model, seed) * scale).backward()
                scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
        runs.append(model.state_dict())
    assert {g["fused"] for g in optimizer.param_groups} == {True}
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_parameters_without_a_fused_kernel_keep_torchs_default() -> None:
    from finetune_trainer.optim import _fusable

    assert _fusable([nn.Parameter(torch.zeros(2))]) is True
    assert _fusable([nn.Parameter(torch.zeros(2, device="meta"))]) is None
    assert _fusable([]) is None


def _vit() -> nn.Module:
    return models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8)


def _swin() -> nn.Module:
    return models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2], num_heads=[1], window_size=[2, 2])


def _convnext() -> nn.Module:
    return models.ConvNeXt([CNBlockConfig(8, None, 2)])


@pytest.mark.parametrize(
    ("build", "exempt"),
    [
        # tokens, embeddings and scales: torchvision's reference scripts train them without weight decay
        (_vit, {"class_token", "encoder.pos_embedding"}),
        (_swin, {f"features.1.{i}.attn.relative_position_bias_table" for i in (0, 1)}),
        (_convnext, {f"features.1.{i}.layer_scale" for i in (0, 1)}),
        (Tiny, set()),
    ],
)
def test_no_weight_decay_on_tokens_embeddings_and_layer_scale(build: Callable[[], nn.Module], exempt: set[str]) -> None:
    model = build()
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(make_spec("full", weightDecay=0.05), last_stage(make_spec()), apply_strategy(model, "full"))
    undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"] if p.ndim > 1}
    assert undecayed == exempt
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed and all(p.ndim > 1 for p in decayed)


@pytest.mark.parametrize(
    ("steps_per_epoch", "epoch", "expected"),
    [
        # one step per epoch, 4 epochs of cosine: the step's own rate, not the next one's (0 at the end)
        (1, 1, 1.0),
        (1, 4, 0.5 * (1 + math.cos(math.pi * 3 / 4))),
        # two steps per epoch: the mean of the epoch's two rates
        (2, 4, (0.5 * (1 + math.cos(math.pi * 6 / 8)) + 0.5 * (1 + math.cos(math.pi * 7 / 8))) / 2),
    ],
)
def test_epoch_lr_is_the_rate_the_epoch_trained_with(steps_per_epoch: int, epoch: int, expected: float) -> None:
    spec = make_spec("full", 4, learningRate=0.1, warmupEpochs=0)
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = build_scheduler(spec, last_stage(spec), optimizer, steps_per_epoch)
    for _ in range(epoch - 1):
        for _ in range(steps_per_epoch):
            optimizer.step()
            scheduler.step()
    first = scheduler.last_epoch
    for _ in range(steps_per_epoch):
        optimizer.step()
        scheduler.step()
    assert epoch_lr(scheduler, first) == pytest.approx(0.1 * expected)
    # what metrics.jsonl used to show: the optimizer's rate after the epoch, already the next step's
    assert optimizer.param_groups[0]["lr"] != pytest.approx(0.1 * expected)
