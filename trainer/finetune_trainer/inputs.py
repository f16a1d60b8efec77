"""How images must be prepared for a trained model: ``InputSpec``.

Built by ``data.build_input_spec`` from the job's weights preset and image size, used by the transforms
in ``data``, recorded as the ``input`` part of the model card, and read back from it by ``predict``
so that inference prepares images exactly as validation did.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from finetune_operator.api import catalog
from finetune_operator.api.base import WireModel
from finetune_operator.api.training import MAX_IMAGE_SIZE

__all__ = ["InputSpec"]


def _per_channel(values: tuple[float, ...]) -> tuple[float, ...]:
    # Normalize takes one value for every channel or one per RGB channel: 2 or 4 failed on the first image, a traceback.
    if len(values) not in (1, 3):
        raise PydanticCustomError(
            "channels", "{count} values; accepted: 1 (every channel) or 3 (R, G, B)", {"count": len(values)}
        )
    return values


# Sizes are bounded by what the trainer can write: imageSize is the job's dataset.imageSize, resizeSize that scaled by a
# weights preset's resize/crop ratio (1 to 342/299). A hand-edited imageSize of 16384 made predict allocate ~3 GB per
# image and die in torch with a traceback. The least stays 1: a tiny image costs nothing (tests write 8×8 cards).
def _image_size(value: int) -> int:
    if not 1 <= value <= MAX_IMAGE_SIZE:
        raise PydanticCustomError(
            "size", "{value}; accepted: 1 to {most} (the most dataset.imageSize allows)", {"value": value, "most": MAX_IMAGE_SIZE}
        )
    return value


def _resize_size(value: int) -> int:
    most = catalog.largest_resize(MAX_IMAGE_SIZE)
    if not 1 <= value <= most:
        raise PydanticCustomError(
            "size",
            "{value}; accepted: 1 to {most} (dataset.imageSize {image} scaled by the largest resize/crop ratio of the "
            "weights presets)",
            {"value": value, "most": most, "image": MAX_IMAGE_SIZE},
        )
    return value


class InputSpec(WireModel):
    """Resize the short side to ``resize_size``, centre-crop ``image_size``, scale to [0, 1], normalise
    with ``mean``/``std``; grayscale data is replicated to RGB. The tensor the model takes is then
    ``channels``×S×S in ``layout``, its values in ``value_range`` before normalisation."""

    # Read back from model cards that a newer trainer may have written with more keys: ignore what this
    # version does not know rather than refuse the card (WireModel forbids unknown keys in manifests).
    model_config = ConfigDict(extra="ignore")

    # Bounded: a card is read back from storage, and a zero std or size failed deep in torchvision with a traceback.
    image_size: Annotated[int, AfterValidator(_image_size)]
    resize_size: Annotated[int, AfterValidator(_resize_size)]
    mean: Annotated[
        tuple[Annotated[float, Field(allow_inf_nan=False)], ...], Field(min_length=1, max_length=4), AfterValidator(_per_channel)
    ]
    std: Annotated[
        tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], ...],
        Field(min_length=1, max_length=4),
        AfterValidator(_per_channel),
    ]
    interpolation: str
    grayscale_to_rgb: bool
    # The same for every torchvision classifier; recorded for consumers other than `finetune predict`.
    channels: int = 3
    layout: str = "NCHW"
    value_range: tuple[int, int] = (0, 1)
