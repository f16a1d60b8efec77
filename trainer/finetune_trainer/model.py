"""Building a torchvision classifier for a job: ``build_model`` with its starting weights (a torchvision
weights name, or the state_dict file of an earlier job at ``weights_uri``) and a new head.

``starting_weights`` fingerprints what the model started from (the sha256 of its backbone tensors),
computed once per attempt: a frozen-backbone checkpoint stores only what trains and names these
(``checkpoint``). Everything here works for every classification model of ``torchvision.models`` through one generic rule
(the head is the last ``nn.Linear``), with per-family code only where a family breaks it:
GoogLeNet/Inception's auxiliary heads and SqueezeNet's convolutional classifier. What trains under each
strategy, and the feature-cache split, live in ``strategy``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models import WeightsEnum

from finetune_operator.api.fields import quote
from finetune_trainer import storage
from finetune_trainer.errors import ArtifactError, WeightsError, exception_line
from finetune_trainer.verify import read_verified_file

__all__ = [
    "StartingWeights",
    "build_model",
    "head_module_names",
    "load_state_dict_file",
    "load_weights",
    "replace_head",
    "resolve_weights",
    "starting_weights",
    "state_mismatch",
]

log = logging.getLogger(__name__)

# GoogLeNet's and Inception v3's auxiliary classifiers: training-time extra losses, dropped here.
_AUX_HEADS: Final = ("aux1", "aux2", "AuxLogits")

_CHECKPOINT_KEYS: Final = ("model", "state_dict", "model_state_dict")
# DistributedDataParallel and torch.compile wrap the model and prefix every key of its state_dict.
_WRAPPER_PREFIXES: Final = ("module.", "_orig_mod.")


# ------------------------------------------------------------------------------------------ building
def resolve_weights(name: str, weights: str | None) -> WeightsEnum | None:
    """``DEFAULT``, ``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2`` → that member of the model's
    weights enum (nothing is downloaded); None → None (random initialisation)."""
    if weights is None:
        return None
    enum_cls = models.get_model_weights(name)
    cls_name, dot, member = weights.rpartition(".")
    accepted = ", ".join(["DEFAULT", *(w.name for w in enum_cls), *(f"{enum_cls.__name__}.{w.name}" for w in enum_cls)])
    if dot and cls_name != enum_cls.__name__:
        raise WeightsError(f"{weights!r} is not a weight of {name} (its weights are {enum_cls.__name__}); accepted: {accepted}")
    try:
        return cast(WeightsEnum, enum_cls[member])
    except KeyError:
        raise WeightsError(f"{weights!r} is not a weight of {name}; accepted: {accepted}") from None


def _builder_kwargs(name: str, init: bool) -> dict[str, Any]:
    """Builder arguments for GoogLeNet and Inception v3 without torchvision weights."""
    if name not in ("googlenet", "inception_v3"):
        return {}
    return {
        # Their aux heads only serve a multi-term loss; without them a train-mode forward is a tensor.
        "aux_logits": False,
        # All their torchvision weights, hence the files of jobs chained from them, expect the input
        # re-normalisation that the builder turns on with weights; a random start learns either way.
        "transform_input": True,
        # Passing it silences their FutureWarning; skipping init only when every weight gets loaded.
        "init_weights": init,
    }


def build_model(
    name: str, weights: str | None, num_classes: int, weights_uri: str | None = None, *, keep_head: bool = False
) -> nn.Module:
    """torchvision model ``name`` with its starting weights (torchvision ``weights`` or a file at
    ``weights_uri``, not both; neither: random) and a new, randomly initialised ``num_classes`` head.

    ``keep_head``: also load the file's head when its shape fits, for a caller that knows the file was
    trained on the very same classes (continued training). Otherwise a head of the same shape but other
    classes (digits 0-4 → digits 5-9) would start from a meaningless class mapping."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, not {num_classes}")
    if weights is not None and weights_uri is not None:
        raise ValueError("set either weights (torchvision) or weights_uri (a file), not both")
    if weights_uri is None:
        resolved = resolve_weights(name, weights)
        # The head is swapped after loading: torchvision refuses num_classes together with weights.
        # With weights, the GoogLeNet/Inception builders insist on building the aux heads they load;
        # replace_head drops them.
        kwargs = _builder_kwargs(name, init=True) if resolved is None else {}
        model = cast(nn.Module, models.get_model(name, weights=resolved, **kwargs))
        return replace_head(model, num_classes)
    state = load_state_dict_file(weights_uri)
    model = cast(nn.Module, models.get_model(name, weights=None, **_builder_kwargs(name, init=False)))
    replace_head(model, num_classes)
    load_weights(model, state, source=weights_uri, arch=name, load_head=keep_head)
    return model


# ----------------------------------------------------------------------------------- starting weights
@dataclass(frozen=True)
class StartingWeights:
    """What a model was built from: ``reference`` for people (the weights name or weightsUri), ``sha256`` of
    its backbone tensors (everything but the head), and ``state``, a CPU copy of them where the caller asks
    (rank 0: it ships the best epoch, which a frozen-backbone checkpoint holds only in part)."""

    reference: str
    sha256: str
    state: dict[str, Tensor] | None = None


def starting_weights(model: nn.Module, reference: str, *, keep: bool = False) -> StartingWeights:
    """Fingerprint ``model`` as built (before any training): the sha256 of every backbone tensor's name, dtype,
    shape and bytes, in key order. Of the tensors, not of a file: torchvision weights and a weightsUri file
    alike, and what is compared is the model a resume rebuilds. ``keep``: also keep a CPU copy."""
    heads = tuple(f"{h}." for h in head_module_names(model))
    backbone = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(heads)}
    digest = hashlib.sha256()
    for key in sorted(backbone):
        tensor = backbone[key].cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    # clone(): on the CPU, .cpu() returns the model's own tensors, which training changes in place.
    state = {k: v.cpu().clone() for k, v in backbone.items()} if keep else None
    return StartingWeights(reference, digest.hexdigest(), state)


# ---------------------------------------------------------------------------------------- weights file
def _read_weights(uri: str) -> bytes:
    if uri.startswith("pvc://"):
        raise WeightsError(f"weights_uri {uri}: pvc:// is mounted into the trainer pod; pass the mounted path instead")
    try:
        # Verified through the card beside it (signature, sha256, decryption) when one lists it.
        return read_verified_file(uri)
    except ArtifactError as e:  # tampered, unsigned when required, undecryptable: the message names the file
        raise WeightsError(f"weights_uri {e}") from None
    except FileNotFoundError:
        where = "" if storage.is_remote(uri) else f" ({storage.local_path(uri)})"
        raise WeightsError(f"weights_uri {uri}: no such file{where}") from None
    except storage.StorageError as e:  # an object store that failed; the message starts with the URI
        raise WeightsError(f"weights_uri {e}") from e
    except OSError as e:
        raise WeightsError(f"weights_uri {uri}: cannot read {storage.local_path(uri)}: {e.strerror or e}") from None


def _load_failure(e: BaseException) -> str:
    # torch's weights_only errors are paragraphs of advice about trusting the file; say what it holds.
    text = str(e)
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if pickled:
        return f"it pickles a {pickled.group(1)} (save model.state_dict(), or a dict of tensors, plain values and state_dicts)"
    if text.startswith("Weights only load failed"):
        return "not a torch.save file, or it holds more than tensors and plain values"
    return exception_line(e)[:200]


def load_state_dict_file(uri: str) -> dict[str, Tensor]:
    """The state_dict in a file (a path, file://, or s3:// / gs:// through fsspec) holding either a plain
    state_dict or a trainer checkpoint with it under ``model``; wrapper prefixes (``module.``) removed."""
    source = io.BytesIO(_read_weights(uri))
    try:
        storage.check_torch_archive(source)  # a file from elsewhere may inflate to many GB in torch.load
    except storage.UnsafeArchive as e:
        raise WeightsError(f"weights_uri {uri}: {e}") from None
    try:
        # weights_only: a checkpoint from elsewhere must not be able to run code when unpickled.
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"weights_uri {uri}: not a PyTorch state_dict or checkpoint: {_load_failure(e)}") from None
    if isinstance(obj, Mapping):
        inner = next((obj[k] for k in _CHECKPOINT_KEYS if isinstance(obj.get(k), Mapping)), obj)
        if inner and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in inner.items()):
            return _strip_wrapper_prefixes(dict(inner))
    what = f"a dict with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise WeightsError(
        f"weights_uri {uri}: holds {what}, not a state_dict or a checkpoint with one under {' / '.join(_CHECKPOINT_KEYS)}"
    )


def _strip_wrapper_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                stripped = True
    return state


def _sample(keys: Sequence[str], n: int = 3) -> str:
    # The keys come from a file: one of 100,000 characters is shown cut.
    shown = [k if len(k) <= 80 else quote(k) for k in keys[:n]]
    return ", ".join(shown) + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def state_mismatch(
    target: Mapping[str, Tensor], state: Mapping[str, Tensor], ignore: Callable[[str], bool] = lambda _: False
) -> str:
    """How ``state`` does not fit a model whose state_dict is ``target``, in one line ('' when it fits): the tensors it
    lacks, those it holds beyond the model's and those of another shape, a few of each; keys ``ignore`` names may
    be absent or of another shape. Said before loading: torch's own error is many lines."""
    missing = [k for k in target if k not in state and not ignore(k)]
    unexpected = [k for k in state if k not in target]
    reshaped = [
        f"{k} {list(state[k].shape)}≠{list(target[k].shape)}"
        for k in target
        if k in state and not ignore(k) and isinstance(state[k], Tensor) and state[k].shape != target[k].shape
    ]
    problems = [
        f"missing {_sample(missing)}" if missing else "",
        f"unexpected {_sample(unexpected)}" if unexpected else "",
        f"wrong shape {_sample(reshaped, 2)}" if reshaped else "",
    ]
    return "; ".join(p for p in problems if p)


def load_weights(
    model: nn.Module, state: Mapping[str, Tensor], source: str = "state_dict", arch: str | None = None, *, load_head: bool = True
) -> bool:
    """Load ``state`` into ``model``: every backbone tensor must be there with its shape (else
    WeightsError naming ``source``); the head's only if ``load_head`` and its shapes match, as when
    chaining jobs with the same classes. Keys of sub-modules the model dropped (auxiliary heads) are ignored. ``arch`` names
    the model in errors. Returns whether the head was loaded."""
    target = model.state_dict()
    heads = tuple(f"{h}." for h in head_module_names(model))
    dropped = tuple(f"{n}." for n in _AUX_HEADS if getattr(model, n, None) is None)
    state = {k: v for k, v in state.items() if not k.startswith(dropped)}

    def is_head(key: str) -> bool:
        return key.startswith(heads)

    # Checkpoints from before BatchNorm counted its batches lack the counter; BatchNorm fills it in.
    problems = state_mismatch(target, state, lambda k: is_head(k) or k.endswith("num_batches_tracked"))
    if problems:
        raise WeightsError(
            f"weights_uri {source} does not fit {arch or type(model).__name__} (another architecture?): {problems}"
        )
    head_keys = [k for k in target if is_head(k)]
    load_head = load_head and all(k in state and state[k].shape == target[k].shape for k in head_keys)
    chosen = {k: v for k, v in state.items() if load_head or not is_head(k)}
    model.load_state_dict(chosen, strict=False)
    log.info("loaded %d tensors from %s (head %s)", len(chosen), source, "loaded" if load_head else "new: its shape differs")
    return load_head


# -------------------------------------------------------------------------------------------- the head
def _drop_aux_heads(model: nn.Module) -> None:
    # GoogLeNet and Inception v3 return (logits, aux...) in train mode while they have auxiliary heads.
    if isinstance(model, models.GoogLeNet | models.Inception3) and model.aux_logits:
        model.aux_logits = False
        for name in _AUX_HEADS:
            if hasattr(model, name):
                setattr(model, name, None)


def head_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the classification head: the last ``nn.Linear`` (``fc``, ``classifier.1``,
    ``heads.head``); for models without one (SqueezeNet) the last ``nn.Conv2d``."""
    for kind in (nn.Linear, nn.Conv2d):
        names = [n for n, m in model.named_modules() if isinstance(m, kind)]
        if names:
            return [names[-1]]
    raise ValueError(f"{type(model).__name__} has neither an nn.Linear nor an nn.Conv2d to use as its head")


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the head for a new, randomly initialised one with ``num_classes`` outputs, in place (same
    device and dtype); auxiliary heads are dropped. Returns ``model``."""
    _drop_aux_heads(model)
    for name in head_module_names(model):
        old = model.get_submodule(name)
        new: nn.Module
        if isinstance(old, nn.Linear):
            new = nn.Linear(old.in_features, num_classes, old.bias is not None, old.weight.device, old.weight.dtype)
        elif isinstance(old, nn.Conv2d):
            new = nn.Conv2d(
                old.in_channels,
                num_classes,
                cast(tuple[int, int], old.kernel_size),
                cast(tuple[int, int], old.stride),
                cast("str | tuple[int, int]", old.padding),
                bias=old.bias is not None,
                device=old.weight.device,
                dtype=old.weight.dtype,
            )
        else:
            raise TypeError(f"cannot replace head {name} of type {type(old).__name__}")
        model.set_submodule(name, new)
    return model
