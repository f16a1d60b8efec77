"""The plan of a job: lp-ft's default probe epochs, the stages of each method, and when a stage trains
on cached features. Pure: no torch, no Ray."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_trainer.stages import Stage, plan_stages, uses_feature_cache


def make_spec(method: str, epochs: int, **strategy: Any) -> FineTuneJobSpec:
    if method == "partial":
        strategy.setdefault("unfreezeBlocks", 2)
    return FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "fake", "imageSize": 32, "augmentation": strategy.pop("augmentation", "none")},
            "output": {"uri": "/tmp/out"},
            "strategy": {"method": method, **strategy},
            "hyperparameters": {"epochs": epochs},
        }
    )


@pytest.mark.parametrize(
    ("method", "epochs", "probe", "expected"),
    [
        ("lp-ft", 2, None, 1),  # a third of 2 rounds to 0: at least one probe epoch
        ("lp-ft", 3, None, 1),
        ("lp-ft", 5, None, 1),
        ("lp-ft", 6, None, 2),
        ("lp-ft", 10, None, 3),
        ("lp-ft", 30, None, 10),
        ("lp-ft", 10, 1, 1),
        ("lp-ft", 10, 9, 9),  # explicit: up to all but the last epoch
        ("linear-probe", 7, None, 7),  # every epoch probes
        ("full", 7, None, 0),
        ("partial", 7, None, 0),
    ],
)
def test_probe_epochs(method: str, epochs: int, probe: int | None, expected: int) -> None:
    extra = {} if probe is None else {"probeEpochs": probe}
    assert make_spec(method, epochs, **extra).probe_epochs() == expected


@pytest.mark.parametrize(
    ("method", "epochs", "probe", "expected"),
    [
        ("linear-probe", 5, None, [Stage("probe", "linear-probe", 1, 5)]),
        ("full", 4, None, [Stage("fine-tune", "full", 1, 4)]),
        ("partial", 3, None, [Stage("fine-tune", "partial", 1, 3)]),
        ("lp-ft", 10, None, [Stage("probe", "lp-ft-probe", 1, 3), Stage("fine-tune", "lp-ft-finetune", 4, 10)]),
        ("lp-ft", 10, 1, [Stage("probe", "lp-ft-probe", 1, 1), Stage("fine-tune", "lp-ft-finetune", 2, 10)]),
        ("lp-ft", 2, None, [Stage("probe", "lp-ft-probe", 1, 1), Stage("fine-tune", "lp-ft-finetune", 2, 2)]),
    ],
)
def test_plan_stages(method: str, epochs: int, probe: int | None, expected: list[Stage]) -> None:
    stages = plan_stages(make_spec(method, epochs, **({} if probe is None else {"probeEpochs": probe})))
    assert stages == expected
    # The stages cover the epochs once each, in order.
    assert [e for s in stages for e in range(s.first, s.last + 1)] == list(range(1, epochs + 1))
    assert sum(s.epochs for s in stages) == epochs


@pytest.mark.parametrize(
    ("method", "cache", "augmentation", "expected"),
    [
        ("linear-probe", True, "none", [True]),
        ("linear-probe", False, "none", [False]),  # turned off
        ("linear-probe", True, "light", [False]),  # random augmentation: every epoch sees other images
        ("lp-ft", True, "none", [True, False]),  # only the probe stage has a frozen backbone
        ("full", True, "none", [False]),
        ("partial", True, "none", [False]),
        # BatchNorm statistics that move in the probe (as the uncached path lets them): other features every epoch
        ("linear-probe", "moving BN", "none", [False]),
        ("lp-ft", "moving BN", "none", [False, False]),
    ],
)
def test_uses_feature_cache(method: str, cache: bool | str, augmentation: str, expected: list[bool]) -> None:
    moving = {"freezeBatchNorm": False} if cache == "moving BN" else {}
    spec = make_spec(method, 6, cacheFeatures=bool(cache), augmentation=augmentation, **moving)
    assert [uses_feature_cache(spec, stage) for stage in plan_stages(spec)] == expected
