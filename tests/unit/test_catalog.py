"""The committed model catalogue matches the pinned torchvision, and the resolver accepts its spellings."""

from __future__ import annotations

import pytest

from finetune_operator.api import catalog
from finetune_operator.api.versions import TORCHVISION_VERSION


def test_catalog_has_not_drifted_from_torchvision() -> None:
    export = pytest.importorskip("finetune_trainer.catalog_export")
    committed = export.CATALOG_PATH.read_text()
    assert committed == export.render(), "run `python -m finetune_trainer.catalog_export --write`"


def test_catalog_matches_pinned_torchvision() -> None:
    assert catalog.catalog_torchvision_version() == TORCHVISION_VERSION


def test_catalog_covers_the_classification_families() -> None:
    families = {m.family for m in catalog.load_catalog().values()}
    assert {"resnet", "vision_transformer", "efficientnet", "convnext", "swin_transformer", "mobilenetv3", "densenet"} <= families
    assert len(catalog.model_names()) >= 80


@pytest.mark.parametrize(
    ("model", "spelling", "expected"),
    [
        ("resnet50", "DEFAULT", "ResNet50_Weights.IMAGENET1K_V2"),
        ("resnet50", "IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V1"),
        ("resnet50", "ResNet50_Weights.IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2"),
        ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1"),
        ("resnet50", "ResNet18_Weights.IMAGENET1K_V1", None),
        ("resnet50", "imagenet1k_v1", None),
    ],
)
def test_resolve_weights(model: str, spelling: str, expected: str | None) -> None:
    found = catalog.load_catalog()[model].resolve_weights(spelling)
    assert (found.name if found else None) == expected


def test_weights_metadata_is_there() -> None:
    w = catalog.load_catalog()["resnet50"].resolve_weights("DEFAULT")
    assert w is not None
    assert w.num_params == 25557032
    assert w.acc1 is not None and w.acc1 > 80
    assert w.crop_size == (224,)
    assert w.mean == (0.485, 0.456, 0.406)
