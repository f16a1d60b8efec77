"""The trainer's contract: URIs resolved for the pod, and paths mapped back for people outside it."""

from __future__ import annotations

import pytest

from finetune_operator.api.contract import TrainerConfig, resolve_uri
from finetune_operator.api.v1alpha1 import FineTuneJobSpec


def _cfg(output_uri: str) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(
        {"model": {"name": "resnet18"}, "dataset": {"format": "digits"}, "output": {"uri": output_uri}}
    )
    return TrainerConfig(job_name="j", spec=spec, output_root=resolve_uri(output_uri))


@pytest.mark.parametrize(
    ("uri", "resolved"),
    [
        ("pvc://models/runs", "/mnt/finetune/models/runs"),
        ("pvc://models", "/mnt/finetune/models"),
        ("file:///data/x", "/data/x"),
        ("s3://b/p", "s3://b/p"),
        ("runs", "runs"),
    ],
)
def test_resolve_uri(uri: str, resolved: str) -> None:
    assert resolve_uri(uri) == resolved


@pytest.mark.parametrize(
    ("output_uri", "path", "public"),
    [
        ("pvc://models/runs", "/mnt/finetune/models/runs/j/model.pt", "pvc://models/runs/j/model.pt"),
        ("pvc://models/runs/", "/mnt/finetune/models/runs/j", "pvc://models/runs/j"),
        ("pvc://models/runs", "/mnt/finetune/models/runsX/j", "/mnt/finetune/models/runsX/j"),  # not under the root
        ("file:///data", "/data/j/model.pt", "file:///data/j/model.pt"),
        ("s3://b/p", "s3://b/p/j/model.pt", "s3://b/p/j/model.pt"),
        ("runs", "/abs/runs/j/model.pt", "/abs/runs/j/model.pt"),
        ("pvc://models/runs", None, None),
    ],
)
def test_public_uri(output_uri: str, path: str | None, public: str | None) -> None:
    assert _cfg(output_uri).public_uri(path) == public


def test_run_dir_and_fingerprint() -> None:
    cfg = _cfg("pvc://models/runs")
    assert cfg.run_dir == "/mnt/finetune/models/runs/j"
    other = cfg.model_copy(
        update={"spec": cfg.spec.model_copy(update={"resources": cfg.spec.resources.model_copy(update={"workers": 4})})}
    )
    assert other.spec_fingerprint() == cfg.spec_fingerprint(), "resources do not change what is trained"
    changed = cfg.spec.model_copy(update={"hyperparameters": cfg.spec.hyperparameters.model_copy(update={"epochs": 99})})
    assert cfg.model_copy(update={"spec": changed}).spec_fingerprint() != cfg.spec_fingerprint()


@pytest.mark.parametrize(
    ("section", "changes", "same"),
    [
        ("resources", {"workers": 4}, True),
        ("output", {"exports": ["state_dict", "torchscript"]}, True),
        ("output", {"keep_checkpoints": 5}, True),
        ("dataset", {"loader_workers": 0}, True),
        ("dataset", {"augmentation": "light"}, False),
        ("hyperparameters", {"epochs": 99}, False),
    ],
)
def test_fingerprint_ignores_what_does_not_change_training(section: str, changes: dict[str, object], same: bool) -> None:
    cfg = _cfg("pvc://models/runs")
    part = getattr(cfg.spec, section).model_copy(update=changes)
    other = cfg.model_copy(update={"spec": cfg.spec.model_copy(update={section: part})})
    assert (other.spec_fingerprint() == cfg.spec_fingerprint()) is same
