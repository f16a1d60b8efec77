"""Exports of a trained model beside its state_dict: TorchScript, ONNX and safetensors, each verified.

``check_exports`` fails fast, before any training, when a requested format cannot be produced here;
``export_model`` writes the requested exports of a model and checks that each reproduces the model's
outputs on a fixed example batch; ``export_safetensors`` writes the state_dict itself as safetensors (no
pickle: loading it cannot run code) and ``read_safetensors`` reads it back for ``predict``. Called by
``artifacts`` (and the driver, for the early check). Torch is imported by the functions that use it: a
local run's driver calls ``check_exports`` and otherwise needs no torch (seconds of its start).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from finetune_trainer.errors import ArtifactError
from finetune_trainer.model_card import MODEL_FILE

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["EXPORT_FILES", "SAFETENSORS_FILE", "check_exports", "export_model", "export_safetensors", "read_safetensors"]

SAFETENSORS_FILE: Final = "model.safetensors"
EXPORT_FILES: Final = {
    "state_dict": MODEL_FILE,
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
    "safetensors": SAFETENSORS_FILE,
}
"""Export format (``spec.output.exports``) → its file in the artifact directory."""


def check_exports(formats: list[str]) -> None:
    """Fail fast — call it before training — when an export format cannot be produced here."""
    unknown = [f for f in formats if f not in EXPORT_FILES]
    if unknown:
        raise ArtifactError(f"unknown export format(s) {unknown}; accepted: {', '.join(EXPORT_FILES)}")
    if "onnx" in formats and importlib.util.find_spec("onnx") is None:
        raise ArtifactError(
            "spec.output.exports lists 'onnx' but the onnx package is not installed in this trainer image; "
            "install it (pip install onnx onnxscript) or remove 'onnx' from spec.output.exports"
        )


def export_model(model: nn.Module, image_size: int, num_classes: int, formats: Sequence[str], out: Path) -> None:
    """Write the exports among ``formats`` (the state_dict is the caller's) into the folder ``out``,
    after checking that ``model`` gives ``num_classes`` logits per ``image_size`` image."""
    import torch

    # Exports and checks run on a CPU copy in eval mode: the caller's model is left as it was.
    cpu_model = copy.deepcopy(model).cpu().eval()
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = cpu_model(example)
    if expected.ndim != 2 or expected.shape[1] != num_classes:
        raise ArtifactError(f"the model outputs {list(expected.shape)} for a batch of 2 but there are {num_classes} class names")
    if "torchscript" in formats:
        _export_torchscript(cpu_model, example, expected, out / EXPORT_FILES["torchscript"])
    if "onnx" in formats:
        _export_onnx(cpu_model, example, expected, out / EXPORT_FILES["onnx"])


def _verify(name: str, expected: torch.Tensor, got: torch.Tensor) -> None:
    import torch

    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else f"shape {list(got.shape)}"
        raise ArtifactError(f"{name} export does not reproduce the model's outputs (max difference {diff})")


def _export_torchscript(model: nn.Module, example: torch.Tensor, expected: torch.Tensor, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        # torch.jit is deprecated upstream, yet TorchScript is still what many serving stacks load.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            module: Any = torch.jit.script(model)  # keeps control flow, so any batch size works
        except Exception:
            module = torch.jit.trace(model, example, check_trace=False)  # type: ignore[no-untyped-call]
        module.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    with torch.no_grad():
        _verify("torchscript", expected, loaded(example))


def _export_onnx(model: nn.Module, example: torch.Tensor, expected: torch.Tensor, path: Path) -> None:
    import onnx
    import torch

    # torch's default (dynamo) exporter needs onnxscript; without it the TorchScript-based one still works.
    dynamo = importlib.util.find_spec("onnxscript") is not None
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=dynamo,
        external_data=False,
    )
    onnx.checker.check_model(str(path))
    if importlib.util.find_spec("onnxruntime") is not None:
        onnxruntime = importlib.import_module("onnxruntime")  # optional, untyped
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"image": example.numpy()})
        _verify("onnx", expected, torch.from_numpy(logits))


def export_safetensors(state: dict[str, torch.Tensor], path: Path, *, architecture: str, class_names: Sequence[str]) -> None:
    """Write ``state`` (model.pt's tensors) to ``path`` as safetensors, the metadata naming the architecture
    and the classes in output order, and check that it reads back equal."""
    import torch
    from safetensors.torch import save_file

    metadata = {"format": "pt", "architecture": architecture, "classNames": json.dumps(list(class_names))}
    try:
        save_file(state, str(path), metadata=metadata)
    except (RuntimeError, ValueError) as e:  # tensors sharing memory, non-contiguous views
        raise ArtifactError(f"safetensors export failed: {e}") from None
    loaded, _ = read_safetensors(path.read_bytes(), str(path))
    if loaded.keys() != state.keys() or not all(torch.equal(loaded[k], state[k]) for k in state):
        raise ArtifactError("safetensors export does not read back equal to the state_dict")


def read_safetensors(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file's bytes; ``ArtifactError`` naming ``source`` if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        # The metadata sits in the JSON header (8-byte little-endian length, then the JSON), read here from bytes.
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{source}: not a safetensors file ({e})") from None
    metadata = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in metadata.items()}
