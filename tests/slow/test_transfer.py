"""Transfer learning with the default recipe: a backbone trained on the digits 0-4 fine-tuned on the unseen
digits 5-9 from five labelled images per class; the cached-feature linear probe learns what the uncached one
learns; the switch from probe to fine-tune keeps what the probe learned."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer import driver
from finetune_trainer.artifacts import read_metrics
from tests.slow.conftest import job_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

# The few-shot target of the demo: digits 5-9, 10 training images per class, 45 validation images per class.
TARGET = {"format": "digits", "classes": [5, 6, 7, 8, 9], "maxPerClass": 10, "validationSplit": 0.25, "augmentation": "none"}


@pytest.fixture(scope="module")
def source_weights(tmp_path_factory: pytest.TempPathFactory, local_ray: None) -> str:
    """resnet18 trained from scratch on the digits 0-4 (as manifests/examples/digits-source.yaml)."""
    out = tmp_path_factory.mktemp("source")
    cfg = job_config(
        "source",
        out,
        dataset={"classes": [0, 1, 2, 3, 4], "maxPerClass": None, "augmentation": "light"},
        hyperparameters={"epochs": 8, "batchSize": 64, "learningRate": 0.003, "labelSmoothing": 0.1},
    )
    result = driver.run(cfg, local=True)
    assert result.val_accuracy is not None and result.val_accuracy > 0.95
    return str(Path(cfg.run_dir) / "model.pt")


def _final_accuracy(name: str, out: Path, **sections: object) -> float:
    result = driver.run(job_config(name, out, **sections), local=True)
    assert result.val_accuracy is not None
    return result.val_accuracy


DEFAULTS = {"epochs": 6, "batchSize": None, "learningRate": None}  # the rest of the recipe is the trainer's


def test_the_default_recipe_transfers_to_few_shot_digits(source_weights: str, tmp_path: Path) -> None:
    """The default recipe (no strategy, optimiser, rate or batch size given) from the source's weights on five
    labelled images per class, the issue's few-shot task on a shorter budget (6 epochs, not 15), clears the
    issue's bar of 0.85. Measured over seeds 0 and 1: 0.92 and 0.97; one seed here, for the slow tier's
    budget (bench/transfer_quality.py runs three at 15 epochs). Training from scratch is no longer the
    baseline to beat here: with precise BatchNorm the same recipe from scratch reached 0.93 and 0.96 on this
    toy task (see bench/README.md), so a transfer-beats-scratch assertion would test the task, not the code."""
    target = {**TARGET, "maxPerClass": 5, "augmentation": "light"}
    accuracy = _final_accuracy(
        "transfer",
        tmp_path,
        model={"name": "resnet18", "weightsUri": source_weights},
        dataset=target,
        strategy=None,
        hyperparameters={**DEFAULTS, "seed": 0},
    )
    assert accuracy >= 0.85, accuracy


def test_cached_features_match_the_uncached_linear_probe(source_weights: str, tmp_path: Path) -> None:
    common = {
        "model": {"name": "resnet18", "weightsUri": source_weights},
        "dataset": {**TARGET, "maxPerClass": 20},
        "hyperparameters": {"epochs": 3, "batchSize": 16, "learningRate": 0.01},
    }
    accuracies = {}
    for cached in (True, False):
        cfg = driver.absolute_output(
            job_config(f"probe-{cached}", tmp_path, **common, strategy={"method": "linear-probe", "cacheFeatures": cached})
        )
        result = driver.build_trainer(cfg, local=True).fit()
        assert result.metrics is not None and result.metrics["cached_features"] is cached
        accuracies[cached] = [r.val_accuracy for r in read_metrics(cfg.run_dir)]

    # Same features (frozen, eval-mode backbone; cached as float16), but since issue 14 item 4 the cached path
    # shuffles each rank's own share by (seed, epoch, rank), not with the images' DistributedSampler: the head
    # sees other batches, so epochs differ on the way (0.54 vs 0.62 after epoch 1 here) and only the end
    # must agree (0.629 vs 0.634 when this was written).
    assert abs(accuracies[True][-1] - accuracies[False][-1]) <= 0.03, accuracies
    assert accuracies[True][-1] > 0.5  # and the probe did learn something on five unseen classes


def test_the_switch_from_probe_to_fine_tune_keeps_what_the_probe_learned(source_weights: str, tmp_path: Path) -> None:
    """LP-FT's fine-tune stage starts from the probed head at the backbone's low rate, warming up: its first
    epoch must not fall below the probe's last (before, the head restarted at the full rate with no warm-up
    and validation accuracy fell from 59% to 37%). Defaults only, as `finetune run` would train it."""
    cfg = job_config(
        "switch",
        tmp_path,
        model={"name": "resnet18", "weightsUri": source_weights},
        dataset={**TARGET, "maxPerClass": 5, "augmentation": "light"},
        strategy={"method": "lp-ft"},
        hyperparameters={"epochs": 6, "seed": 0, "batchSize": None, "learningRate": None},
    )
    driver.run(cfg, local=True)
    rows = read_metrics(cfg.run_dir)
    probe = [r for r in rows if r.stage == "probe"]
    tuned = [r for r in rows if r.stage == "fine-tune"]
    assert probe and tuned, [r.stage for r in rows]
    assert tuned[0].val_accuracy >= probe[-1].val_accuracy - 0.03, (probe[-1], tuned[0])
    assert tuned[0].val_loss is not None and probe[-1].val_loss is not None
    assert tuned[0].val_loss <= probe[-1].val_loss * 1.25, (probe[-1], tuned[0])
