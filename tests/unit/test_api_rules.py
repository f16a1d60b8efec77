"""Cross-field rules of the FineTuneJob spec, judged on valid and invalid specs alike (the invalid-document corpus
only shows refusals; these tables also show what must stay accepted)."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.api import catalog
from finetune_operator.api.validate import validate_spec


def _spec(model: dict[str, Any], image_size: int) -> dict[str, Any]:
    return {"model": model, "dataset": {"format": "digits", "imageSize": image_size}, "output": {"uri": "s3://b/o"}}


@pytest.mark.parametrize(
    ("model", "size", "accepted"),
    [
        ({"name": "vit_b_16", "weights": "IMAGENET1K_SWAG_E2E_V1"}, 384, True),
        ({"name": "vit_b_16", "weights": "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1"}, 224, False),
        ({"name": "vit_b_16", "weights": "IMAGENET1K_SWAG_LINEAR_V1"}, 224, True),
        ({"name": "vit_b_16", "weights": "DEFAULT"}, 224, True),
        ({"name": "vit_b_16"}, 224, True),
        ({"name": "vit_b_16", "weightsUri": "s3://b/m.pt"}, 384, False),
        ({"name": "vit_h_14", "weights": "DEFAULT"}, 518, True),
        ({"name": "vit_h_14", "weights": "IMAGENET1K_SWAG_LINEAR_V1"}, 224, True),
        ({"name": "vit_h_14"}, 224, True),
        ({"name": "maxvit_t"}, 256, False),
        ({"name": "inception_v3", "weights": "DEFAULT"}, 75, True),
        ({"name": "inception_v3"}, 74, False),
        ({"name": "regnet_y_16gf", "weights": "IMAGENET1K_SWAG_E2E_V1"}, 224, True),  # a convnet takes any size
        ({"name": "resnet18"}, 32, True),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(map(str, v.values())),
)
def test_image_size_follows_the_chosen_weights(model: dict[str, Any], size: int, accepted: bool) -> None:
    _spec_or_none, errors = validate_spec(_spec(model, size))
    assert (errors == []) is accepted, errors
    assert all(e.startswith("spec.dataset.imageSize: ") for e in errors)


def _fixed_input_weights() -> list[tuple[str, str, int]]:
    return [(m.name, w.member, w.min_size[0]) for m in catalog.load_catalog().values() if m.fixed_input_size for w in m.weights]


@pytest.mark.parametrize(("name", "weights", "size"), _fixed_input_weights())
def test_every_fixed_input_weights_accepts_its_own_size_only(name: str, weights: str, size: int) -> None:
    assert validate_spec(_spec({"name": name, "weights": weights}, size))[1] == []
    other = 224 if size != 224 else 384
    assert validate_spec(_spec({"name": name, "weights": weights}, other))[1] != []
