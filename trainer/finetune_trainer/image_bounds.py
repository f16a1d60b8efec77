"""The one rule on how large an image the readers hand to a transform: ``check_resize`` refuses an image whose
short-side resize would give more pixels than PIL agrees to decode (``Image.MAX_IMAGE_PIXELS``, ~89 Mpx), judged
from its header (``Image.open`` reads the size without decoding), before anything is decoded or resized;
``short_side_resize`` finds the size a transform resizes the short side to.

Why: the presets resize the SHORT side (``Resize(232)``), so a thin image grows with it. A 1×100,000 PNG, a few KB
and far under PIL's limit, became 232×23,200,000 (5.4 Gpx, 16 GB) and exhausted memory, in ``finetune predict`` and
in training alike. Bounding what the resize makes by PIL's own limit keeps the largest image a transform holds as
large as the largest one PIL decodes, whatever the shape: a 100:1 panorama passes at 232 (5.4 Mpx), a 1×100,000
strip does not; the limit follows ``Image.MAX_IMAGE_PIXELS`` when it is changed (None: no limit, as in PIL).
Used by ``image_folder`` (the map-style scan and reads, the streaming decode), ``gpu_decode`` and ``predict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image
from torchvision import transforms as T1
from torchvision.transforms import v2 as T

__all__ = ["OversizedImage", "check_resize", "resized_size", "short_side_resize"]


class OversizedImage(ValueError):
    """An image ``check_resize`` refuses: a ValueError, so one of ``image_folder.READ_ERRORS`` (an unreadable image,
    skipped and counted)."""


def short_side_resize(transform: Any) -> int | None:
    """The size the first ``Resize`` of ``transform`` (a Compose, nested ones searched) gives the short side; None when
    it has none or resizes to a fixed ``(h, w)``, whose output cannot grow with the image's shape. A ``max_size``, which
    no preset sets, only shrinks the result: ignored, so the rule errs on refusing."""
    if isinstance(transform, (T.Resize, T1.Resize)):
        size = transform.size
        if isinstance(size, int):
            return size
        return int(size[0]) if isinstance(size, Sequence) and len(size) == 1 else None
    for step in getattr(transform, "transforms", None) or ():
        found = short_side_resize(step)
        if found is not None:
            return found
    return None


def resized_size(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """``(width, height)`` of a ``width×height`` image once its short side is resized to ``resize``, as torchvision
    computes it (the long side scaled and truncated)."""
    width, height = size
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def check_resize(size: tuple[int, int], resize: int | None) -> None:
    """Raise ``OversizedImage`` (one line: the size, what the resize would make, what is accepted) when resizing the
    short side of a ``width×height`` image to ``resize`` would give more than ``Image.MAX_IMAGE_PIXELS`` pixels.
    ``resize`` None (the transform does no short-side resize) or an empty image: nothing to check."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if resize is None or limit is None or min(width, height) < 1:
        return
    new_width, new_height = resized_size(size, resize)
    if new_width * new_height > limit:
        ratio = limit / resize**2
        raise OversizedImage(
            f"{width}x{height} image: resizing its short side to {resize} makes it {new_width}x{new_height} "
            f"({new_width * new_height:,} pixels); accepted: at most {limit:,} pixels after that resize (PIL's "
            f"MAX_IMAGE_PIXELS), a long side at most {ratio:,.0f} times the short one"
        )
