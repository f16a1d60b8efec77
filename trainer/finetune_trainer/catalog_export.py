"""Generates the model catalogue (``finetune_operator/api/catalog.json``) from the pinned torchvision.

The operator must not import torch, yet it validates ``spec.model.name`` and ``spec.model.weights``
against torchvision and puts the model names into the CRD as an enum. So the knowledge lives here,
on the side that imports torchvision, and is committed as data; a test regenerates it and fails on
drift when torchvision is upgraded.

Run: ``python -m finetune_trainer.catalog_export [--write]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torchvision
from torchvision import models
from torchvision.models import WeightsEnum

CATALOG_PATH = Path(__file__).resolve().parents[2] / "operator" / "finetune_operator" / "api" / "catalog.json"

# Families whose forward pass asserts one input size (the size their weights were trained at).
_FIXED_INPUT_FAMILIES = frozenset({"vision_transformer", "maxvit"})


def _weights_entry(enum_cls: type[WeightsEnum], weights: WeightsEnum) -> dict[str, Any]:
    meta = weights.meta
    preset = weights.transforms()
    metrics = meta.get("_metrics", {}).get("ImageNet-1K", {})
    return {
        "name": f"{enum_cls.__name__}.{weights.name}",
        "default": enum_cls.DEFAULT is weights,
        "url": weights.url,
        "numParams": meta.get("num_params"),
        "gflops": meta.get("_ops"),
        "fileSizeMb": meta.get("_file_size"),
        "acc1": metrics.get("acc@1"),
        "acc5": metrics.get("acc@5"),
        "numCategories": len(meta.get("categories") or []),
        "minSize": list(meta.get("min_size", (1, 1))),
        "cropSize": list(getattr(preset, "crop_size", [])),
        "resizeSize": list(getattr(preset, "resize_size", [])),
        "mean": list(getattr(preset, "mean", [])),
        "std": list(getattr(preset, "std", [])),
        "interpolation": str(getattr(preset, "interpolation", "")).split(".")[-1].lower(),
    }


def build_catalog() -> dict[str, Any]:
    """Every classification model in ``torchvision.models`` with its weights and their metadata."""
    entries: list[dict[str, Any]] = []
    for name in sorted(models.list_models(module=models)):
        family = models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        enum_cls = models.get_model_weights(name)
        weights = [_weights_entry(enum_cls, w) for w in enum_cls]
        entries.append(
            {
                "name": name,
                "family": family,
                "weightsEnum": enum_cls.__name__,
                "fixedInputSize": family in _FIXED_INPUT_FAMILIES,
                "weights": weights,
            }
        )
    return {"torchvision": torchvision.__version__.split("+")[0], "models": entries}


def render() -> str:
    return json.dumps(build_catalog(), indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {CATALOG_PATH.name} in place")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        CATALOG_PATH.write_text(text)
        print(f"wrote {CATALOG_PATH}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
