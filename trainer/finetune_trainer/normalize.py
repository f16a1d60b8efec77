"""The end of a ``data`` preset (``ToDtype(float32, scale=True)`` then ``Normalize``) as one fused operation on a
whole uint8 batch, where the streaming path applies it: on the training worker's device (``streaming.split_finish``).

``x * (1 / (255 * std)) + (-mean / std)`` over one float copy, equal to the torchvision steps within float32 rounding
(a few ulps). On a GPU: one ``addcmul`` instead of four kernels. On the CPU the batch (38 MB of float32 at 64 x 224 px)
is converted by NumPy: its large arrays get transparent huge pages, where a fresh torch buffer of that size is faulted
in 4 KiB page by page on every batch (0.42 -> 0.17 ms of CPU per image, measured single-threaded on this project's
2-core machine: the consumer's cost on the streaming path, bench/ingest_bench.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["BatchNormalize"]


class BatchNormalize:
    """``(x.float() / 255 - mean) / std`` of a uint8 ``(N, C, H, W)`` batch, fused; the constants kept per device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._constants:
            mean = torch.tensor(self.mean, dtype=torch.float64).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float64).view(1, -1, 1, 1)
            # Computed in float64, then rounded once: the fused form's constants carry no extra error.
            scale, shift = (1.0 / (255.0 * std)).float(), (-mean / std).float()
            self._constants[device] = (scale.to(device), shift.to(device))
        return self._constants[device]

    def __call__(self, batch: Tensor) -> Tensor:
        if batch.dtype != torch.uint8:
            raise TypeError(f"BatchNormalize takes uint8 images, not {batch.dtype}")
        scale, shift = self._on(batch.device)
        if batch.device.type == "cpu":
            array = batch.numpy().astype(np.float32)
            np.multiply(array, scale.numpy(), out=array)
            np.add(array, shift.numpy(), out=array)
            return torch.from_numpy(array)
        out = batch.to(torch.float32)
        return torch.addcmul(shift, out, scale, out=out)

    def __repr__(self) -> str:
        return f"BatchNormalize(mean={self.mean}, std={self.std})"
