"""What keeps a GPU busy, decided per job and device: bf16 for ``mixedPrecision: auto``, TF32 matmuls,
the channels_last memory format for conv nets, and the opt-in ``torch.compile``.

Every decision is a no-op on CPU, so the same trainer code runs on a laptop and on a GPU node. The engine
(``engine.build_precision``) and the loop (``loop.py``) call these; nothing here imports Ray.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

__all__ = ["amp_dtype", "compile_model", "enable_tf32", "memory_format", "to_device"]


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``hyperparameters.mixedPrecision`` on ``device``; None is plain fp32.

    Autocast runs on CUDA only (on CPU bf16 autocast is slower than fp32 on most hosts). ``auto`` is bf16
    where the card supports it (Ampere and newer) and fp32 elsewhere: never fp16, whose loss scaling can
    skip steps and which the job did not ask for."""
    if device.type != "cuda" or mode == "no":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if mode == "bf16" else torch.float16


def enable_tf32(device: torch.device) -> bool:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and newer; ignored by older cards). On CPU
    nothing changes: a process-wide switch that a CPU job has no use for. True when it was switched on."""
    if device.type != "cuda":
        return False
    # "high" lets fp32 matmuls use TF32 (10-bit mantissa): the precision torchvision's reference trains with.
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def _has_attention(model: nn.Module) -> bool:
    # torchvision's ViT uses nn.MultiheadAttention; Swin and MaxViT their own *Attention classes.
    return any(isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention") for m in model.modules())


def memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """``torch.channels_last`` for a conv net on CUDA (cuDNN's NHWC kernels, much faster under bf16/TF32
    tensor cores), else ``torch.preserve_format`` (inputs left as they come).

    The rule: the model has a 2-D convolution and no attention layer. Vision transformers (ViT, Swin,
    MaxViT) have a convolution only as patch embedding and spend their time in matmuls, where NHWC
    buys nothing and costs a permute; a head on cached features has no convolution at all."""
    if device.type != "cuda":
        return torch.preserve_format
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return torch.channels_last if has_conv and not _has_attention(model) else torch.preserve_format


def to_device(batch: torch.Tensor, device: torch.device, fmt: torch.memory_format) -> torch.Tensor:
    """``batch`` on ``device`` without waiting for the copy (from pinned memory it overlaps the compute);
    ``fmt`` applies to image batches (4-D) only, never to labels or cached feature vectors."""
    if batch.dim() == 4 and fmt != torch.preserve_format:
        return batch.to(device, non_blocking=True, memory_format=fmt)
    return batch.to(device, non_blocking=True)


def compile_model(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` when ``hyperparameters.compile`` asks for it, else ``model``.

    The compiled wrapper prefixes its state_dict keys with ``_orig_mod.``: checkpoints and artifacts keep
    saving the plain model (the loop's ``worker.model``, ``artifacts.unwrap_model``), never this wrapper."""
    return cast(nn.Module, torch.compile(model)) if enabled else model
