"""How images must be prepared for a trained model: ``InputSpec``.

Built by ``data.build_input_spec`` from the job's weights preset and image size, used by the transforms
in ``data``, recorded as the ``input`` part of the model card, and read back from it by ``predict``
so that inference prepares images exactly as validation did.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from finetune_operator.api.base import WireModel

__all__ = ["InputSpec"]


def _per_channel(values: tuple[float, ...]) -> tuple[float, ...]:
    # Normalize takes one value for every channel or one per RGB channel: 2 or 4 failed on the first image, a traceback.
    if len(values) not in (1, 3):
        raise PydanticCustomError(
            "channels", "{count} values; accepted: 1 (every channel) or 3 (R, G, B)", {"count": len(values)}
        )
    return values


class InputSpec(WireModel):
    """Resize the short side to ``resize_size``, centre-crop ``image_size``, scale to [0, 1], normalise
    with ``mean``/``std``; grayscale data is replicated to RGB. The tensor the model takes is then
    ``channels``×S×S in ``layout``, its values in ``value_range`` before normalisation."""

    # Read back from model cards that a newer trainer may have written with more keys: ignore what this
    # version does not know rather than refuse the card (WireModel forbids unknown keys in manifests).
    model_config = ConfigDict(extra="ignore")

    # Bounded: a card is read back from storage, and a zero std or size failed deep in torchvision with a traceback.
    image_size: Annotated[int, Field(ge=1, le=16384)]
    resize_size: Annotated[int, Field(ge=1, le=16384)]
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
