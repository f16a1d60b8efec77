"""Unreadable images of the streaming path, which lists files and never scans them: ``fill_unreadable`` replaces
(training) or marks for dropping (evaluation) the images of a batch that cannot be decoded, ``blank_images`` gives
a block none of whose images can be read the shape of the others (Ray Data concatenates blocks into batches),
``Unreadable`` counts them against ``MAX_UNREADABLE_FRACTION`` (a warning below, a one-line TrainerError naming
some files above), and ``readable_batches`` reads the validation images map-style for rank 0's final evaluation
with the same skipping and the same limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from finetune_trainer.errors import TrainerError, printable
from finetune_trainer.image_bounds import short_side_resize
from finetune_trainer.image_folder import MAX_UNREADABLE_FRACTION, READ_ERRORS, StreamedImages, decode_image, fetch

__all__ = ["BLANK_SIDE", "EARLY_CHECK", "Unreadable", "blank_images", "clearly_over", "fill_unreadable", "readable_batches"]

EARLY_CHECK: Final = 1000
"""A worker that has read this many images checks the unreadable limit on its own, without waiting for the epoch's end
(``clearly_over``)."""
_EARLY_SIGMAS: Final = 5.0
_EXAMPLES: Final = 3

BLANK_SIDE: Final = 8
"""The side of the black image ``blank_images`` transforms to learn the shape of a block's images when none can be read."""


def blank_images(transform: Callable[[Any], Tensor], n: int, blank: Any) -> Tensor:
    """``n`` zero images of the dtype and shape ``transform`` gives every image (the evaluation preset ends in a
    fixed-size crop): the placeholders of a block none of whose images can be read. A block of another dtype or
    shape would break Ray Data's concatenation of blocks into batches; the consumer drops these rows by ``bad``."""
    like = transform(blank)
    return torch.zeros((n, *like.shape), dtype=like.dtype, device=like.device)


def fill_unreadable(
    images: list[Tensor | None], labels: np.ndarray, paths: Sequence[str], train: bool
) -> tuple[list[Tensor] | None, np.ndarray, np.ndarray]:
    """(images, labels, bad) of a batch where ``None`` marks an image that could not be decoded. Training: each such
    image and its label replaced by the next readable one of the batch (the batch keeps its size, every rank its
    steps). Evaluation: a zero image the consumer drops. ``bad`` names each unreadable file ('' for the others).
    Images None: nothing in the batch could be read (evaluation; in training that is a TrainerError)."""
    labels = np.asarray(labels, dtype=np.int64).copy()
    bad = np.asarray(["" if image is not None else path for path, image in zip(paths, images, strict=True)], dtype=object)
    good = [i for i, image in enumerate(images) if image is not None]
    if not good:
        if train:
            raise TrainerError(f"dataset: none of the {len(paths)} images of a batch can be decoded (e.g. {printable(paths[0])})")
        return None, labels, bad
    first = cast(Tensor, images[good[0]])
    filled: list[Tensor] = []
    for i, image in enumerate(images):
        if image is None and train:
            j = next((g for g in good if g > i), good[0])
            image, labels[i] = images[j], labels[j]
        filled.append(image if image is not None else torch.zeros_like(first))
    return filled, labels, bad


def clearly_over(bad: int, seen: int) -> bool:
    """Whether ``bad`` of the ``seen`` images one worker has read so far show, before the epoch's end, a dataset over
    ``MAX_UNREADABLE_FRACTION``. The exact decision is the epoch's, over every worker's count (``Unreadable.check``):
    a worker's running count after a few thousand shuffled images scatters around the true fraction, and judged at
    every block against the limit itself it failed datasets under it (0.9 % unreadable: 14 one-epoch runs of 20). So
    only clear evidence counts here: more than twice the limit, and more than the limit's count by five standard
    deviations (a 2-5 % dataset fails at the epoch's end; a badly broken one within its first thousand images)."""
    if seen < EARLY_CHECK:
        return False
    expected = MAX_UNREADABLE_FRACTION * seen
    return bad > 2 * expected and bad - expected > _EARLY_SIGMAS * math.sqrt(expected)


@dataclass
class Unreadable:
    """Unreadable files this worker met, with a few of their paths; ``check`` applies the limit."""

    seen: int = 0
    bad: int = 0
    examples: list[str] = field(default_factory=list)
    warned: bool = False

    def add(self, bad: np.ndarray) -> None:
        self.seen += len(bad)
        names = [str(b) for b in bad if b]
        self.bad += len(names)
        self.examples.extend(n for n in names if n not in self.examples and len(self.examples) < _EXAMPLES)
        if clearly_over(self.bad, self.seen):
            raise self._error(self.bad, self.seen, self.examples)

    @staticmethod
    def _error(bad: int, seen: int, examples: list[str]) -> TrainerError:
        return TrainerError(
            f"dataset: {bad} of {seen} images read cannot be decoded (e.g. {printable(', '.join(examples[:_EXAMPLES]))}); "
            f"at most {MAX_UNREADABLE_FRACTION:.0%} may be, and they are skipped: fix or remove them"
        )

    def check(self, device: torch.device) -> str | None:
        """Every worker's counts summed (a collective: all must call it): a TrainerError above the limit, else the
        warning to give once (None when there is nothing new to say)."""
        bad, seen, examples = self.bad, self.seen, list(self.examples)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = torch.tensor([bad, seen], dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            bad, seen = (int(v) for v in counts.tolist())
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, examples)
            examples = list(dict.fromkeys(e for part in gathered for e in part))
        return self._judge(bad, seen, examples)

    def check_here(self) -> str | None:
        """``check`` of this process's counts alone (no collective): rank 0's final evaluation."""
        return self._judge(self.bad, self.seen, list(self.examples))

    def _judge(self, bad: int, seen: int, examples: list[str]) -> str | None:
        if bad > MAX_UNREADABLE_FRACTION * max(seen, 1):
            raise self._error(bad, seen, examples)
        if bad and not self.warned:
            self.warned = True
            shown = printable(", ".join(examples[:_EXAMPLES]))
            return f"dataset: skipped {bad} of {seen} images that cannot be decoded (e.g. {shown})"
        return None


class _ReadOrNone(Dataset[tuple[Tensor | None, int, str]]):
    """``(image, label, '')`` of each listed image, ``(None, label, path)`` for one that cannot be read or decoded."""

    def __init__(self, images: StreamedImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images.samples)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, str]:
        path, label = self.images.samples[index]
        data = fetch(path)  # a storage error: retried, then a TrainerError naming the file
        if data is None:
            return None, label, path
        try:
            image = decode_image(data, short_side_resize(self.images.transform))  # too large once resized: skipped
        except READ_ERRORS:
            return None, label, path
        return self.images.transform(image), label, ""


def readable_batches(
    images: StreamedImages, per_batch: int, tally: Unreadable, workers: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """Every listed image in order, read map-style in this process (rank 0's final evaluation, a feature cache; no
    Ray Data), in ``(images, labels)`` batches: an unreadable one dropped and counted in ``tally``, as the streamed
    evaluation does; ``tally.check_here()`` after the pass applies the same limit."""
    loader: DataLoader[Any] = DataLoader(
        _ReadOrNone(images), batch_size=per_batch, shuffle=False, collate_fn=list, num_workers=workers
    )
    for items in loader:
        tally.add(np.asarray([path for _, _, path in items], dtype=object))
        good = [(image, label) for image, label, _ in items if image is not None]
        if good:
            yield torch.stack([image for image, _ in good]), torch.as_tensor([label for _, label in good])
