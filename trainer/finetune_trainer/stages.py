"""The plan of a job: which stages it trains, over which epochs, with which method (``plan_stages``).

One stage for ``linear-probe``, ``partial`` and ``full``; two for ``lp-ft``: the head alone for
``FineTuneJobSpec.probe_epochs()`` epochs, then everything (a fresh optimizer and schedule, the
backbone at a lower rate). A frozen-backbone stage without random augmentation may train on backbone
features computed once (``uses_feature_cache``). Pure: no torch, no Ray; read by the loop and ``optim``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from finetune_operator.api.v1alpha1 import FineTuneJobSpec

__all__ = ["Stage", "plan_stages", "uses_feature_cache"]


@dataclass(frozen=True)
class Stage:
    """Epochs ``first``..``last`` (1-based, inclusive) trained with ``method`` (``strategy.METHODS``)."""

    name: Literal["probe", "fine-tune"]
    method: str
    first: int
    last: int

    @property
    def epochs(self) -> int:
        return self.last - self.first + 1


def plan_stages(spec: FineTuneJobSpec) -> list[Stage]:
    epochs, method = spec.hyperparameters.epochs, spec.strategy.method
    if method == "linear-probe":
        return [Stage("probe", "linear-probe", 1, epochs)]
    if method == "lp-ft":
        probe = spec.probe_epochs()
        return [Stage("probe", "lp-ft-probe", 1, probe), Stage("fine-tune", "lp-ft-finetune", probe + 1, epochs)]
    return [Stage("fine-tune", method, 1, epochs)]


def uses_feature_cache(spec: FineTuneJobSpec, stage: Stage) -> bool:
    """A frozen backbone sees the same images every epoch only without random augmentation, and gives the same
    features only with its BatchNorm frozen too (``freezeBatchNorm: false`` lets the statistics move in the probe, as
    the uncached path does, so every epoch's features differ)."""
    return (
        stage.name == "probe"
        and spec.strategy.cache_features
        and spec.dataset.augmentation == "none"
        and spec.strategy.freeze_batch_norm
    )
