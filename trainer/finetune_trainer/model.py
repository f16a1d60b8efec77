"""The model side of fine-tuning: building a torchvision classifier with its starting weights, swapping
its head for a new one, deciding which parameters train under each strategy, and cutting the model into
a frozen feature extractor and a trainable head for feature caching.

Everything here works for every classification model of ``torchvision.models`` through generic rules
(the head is the last ``nn.Linear``; the blocks are the children of the main feature container), with
per-family code only where a family breaks them: GoogLeNet/Inception's auxiliary heads and SqueezeNet's
convolutional classifier.
"""

from __future__ import annotations

import copy
import io
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models import WeightsEnum

from finetune_trainer import storage
from finetune_trainer.errors import WeightsError, exception_line

__all__ = [
    "METHODS",
    "BlockGroup",
    "Method",
    "ParamGroups",
    "apply_strategy",
    "backbone_block_names",
    "backbone_blocks",
    "build_model",
    "head_module_names",
    "load_state_dict_file",
    "load_weights",
    "replace_head",
    "resolve_weights",
    "set_train_mode",
    "split_for_feature_cache",
]

log = logging.getLogger(__name__)

Method = Literal["linear-probe", "partial", "full", "lp-ft-probe", "lp-ft-finetune"]
"""A training stage: the API's ``lp-ft`` runs as ``lp-ft-probe`` then ``lp-ft-finetune``."""
METHODS: Final[tuple[str, ...]] = get_args(Method)

# Sub-modules that hold the backbone's sequence of blocks, tried in order; models without one
# (ResNet, GoogLeNet, Inception, ShuffleNet) keep their blocks directly on the model.
_BLOCK_CONTAINERS: Final = ("features", "layers", "trunk_output", "encoder.layers", "blocks")

# A normalisation layer standing alone in a container finishes the layer before it (``conv1, bn1``),
# so it joins that layer's block instead of being a block nobody would unfreeze on its own.
_NORM_TYPES: Final = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)

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


# ---------------------------------------------------------------------------------------- weights file
def _read_weights(uri: str) -> bytes:
    if uri.startswith("pvc://"):
        raise WeightsError(f"weights_uri {uri}: pvc:// is mounted into the trainer pod; pass the mounted path instead")
    try:
        return storage.read_bytes(uri)
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
    data = _read_weights(uri)
    try:
        # weights_only: a checkpoint from elsewhere must not be able to run code when unpickled.
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
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
    return ", ".join(keys[:n]) + (f", … ({len(keys)} in all)" if len(keys) > n else "")


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
    missing = [k for k in target if k not in state and not is_head(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    reshaped = [
        f"{k} {list(state[k].shape)}≠{list(target[k].shape)}"
        for k in target
        if k in state and not is_head(k) and state[k].shape != target[k].shape
    ]
    if missing or unexpected or reshaped:
        problems = [
            f"missing {_sample(missing)}" if missing else "",
            f"unexpected {_sample(unexpected)}" if unexpected else "",
            f"wrong shape {_sample(reshaped, 2)}" if reshaped else "",
        ]
        raise WeightsError(
            f"weights_uri {source} does not fit {arch or type(model).__name__} (another architecture?): "
            + "; ".join(p for p in problems if p)
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


# ------------------------------------------------------------------------------------------ the blocks
class BlockGroup(nn.Module):
    """Pieces of a model that train together as one block of ``partial`` (a stem, ``conv1 + bn1``, or a
    last stage with the layers between it and the head). It only groups parameters: never called."""

    def __init__(self, names: Sequence[str], pieces: Sequence[nn.Module | nn.Parameter]) -> None:
        super().__init__()
        self.names = list(names)
        self.parts = nn.ModuleList([p for p in pieces if isinstance(p, nn.Module)])
        self.loose = nn.ParameterList([p for p in pieces if isinstance(p, nn.Parameter)])

    def extra_repr(self) -> str:
        return " + ".join(self.names)


_Piece = tuple[str, nn.Module | nn.Parameter]


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _pieces(module: nn.Module, prefix: str, stops: set[str], skips: set[str]) -> Iterator[_Piece]:
    """Everything in ``module`` with parameters, in registration order, as the largest sub-modules that
    neither are nor contain a name in ``stops`` or ``skips``; stops are yielded themselves, skips not."""
    for pname, param in module.named_parameters(recurse=False):
        yield f"{prefix}{pname}", param
    for cname, child in module.named_children():
        qual = f"{prefix}{cname}"
        if qual in skips:
            continue
        if qual in stops:
            yield qual, child
        elif any(s.startswith(f"{qual}.") for s in stops | skips):
            yield from _pieces(child, f"{qual}.", stops, skips)
        elif _has_params(child):
            yield qual, child


def _main_container(model: nn.Module, heads: Sequence[str]) -> str:
    for path in _BLOCK_CONTAINERS:
        try:
            container = model.get_submodule(path)
        except AttributeError:
            continue
        inside_head = any(h == path or h.startswith(f"{path}.") for h in heads)
        if not inside_head and sum(_has_params(c) for c in container.children()) >= 2:
            return path
    return ""


def _block_layout(model: nn.Module) -> list[list[_Piece]]:
    heads = head_module_names(model)
    container = _main_container(model, heads)
    if container:
        around = list(_pieces(model, "", {container}, set(heads)))
        at = next(i for i, (name, _) in enumerate(around) if name == container)
        stem, units, neck = (
            around[:at],
            list(_pieces(model.get_submodule(container), f"{container}.", set(), set())),
            around[at + 1 :],
        )
    else:
        stem, units, neck = [], list(_pieces(model, "", set(), set(heads))), []
    groups: list[list[_Piece]] = [stem] if stem else []
    for unit in units:
        if isinstance(unit[1], _NORM_TYPES) and groups and groups[-1] is not stem:
            groups[-1].append(unit)
        else:
            groups.append([unit])
    if groups:
        groups[-1].extend(neck)
    if len(groups) < 2:
        raise ValueError(f"cannot split {type(model).__name__} into backbone blocks (found {len(groups)})")
    return groups


def backbone_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone as a sequence of blocks, input to output (``layer1``…``layer4`` after a
    ``conv1 + bn1`` stem for ResNet, the encoder layers for ViT, ``features`` children for most others).
    Together they hold every non-head parameter; the last one includes whatever lies between the last
    stage and the head (VGG's fc6/fc7, a final norm). Pieces that are not one module come as a
    ``BlockGroup``."""
    blocks: list[nn.Module] = []
    for group in _block_layout(model):
        if len(group) == 1 and isinstance(group[0][1], nn.Module):
            blocks.append(group[0][1])
        else:
            blocks.append(BlockGroup([n for n, _ in group], [p for _, p in group]))
    return blocks


def backbone_block_names(model: nn.Module) -> list[str]:
    """Names of ``backbone_blocks``, e.g. ``["conv1+bn1", "layer1", …, "layer4"]``, for logs and errors."""
    return ["+".join(n for n, _ in group) for group in _block_layout(model)]


# ------------------------------------------------------------------------------------------ strategies
@dataclass(frozen=True)
class ParamGroups:
    """The trainable parameters after ``apply_strategy``: the head's, and the backbone's (which may
    train at a lower learning rate)."""

    head: list[nn.Parameter]
    backbone: list[nn.Parameter]

    def parameters(self) -> list[nn.Parameter]:
        return [*self.head, *self.backbone]

    def optimizer_groups(self, lr: float, backbone_lr: float | None = None) -> list[dict[str, Any]]:
        """Parameter groups for a torch optimizer; an empty backbone group is left out."""
        groups: list[dict[str, Any]] = [{"params": self.head, "lr": lr, "name": "head"}]
        if self.backbone:
            groups.append({"params": self.backbone, "lr": lr if backbone_lr is None else backbone_lr, "name": "backbone"})
        return groups


def _head_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for name in head_module_names(model) for p in model.get_submodule(name).parameters()]


def apply_strategy(
    model: nn.Module, method: str, unfreeze_blocks: int | None = None, freeze_batch_norm: bool = True
) -> ParamGroups:
    """Set ``requires_grad`` for ``method`` (see ``METHODS``; ``partial`` trains the head and the last
    ``unfreeze_blocks`` backbone blocks, all of them if there are fewer) and return the trainable
    parameters. With ``freeze_batch_norm``, a model in train mode gets its frozen BatchNorm layers put
    back in eval mode at once; call ``set_train_mode`` instead of ``model.train()`` afterwards."""
    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; one of {', '.join(METHODS)} (lp-ft runs as lp-ft-probe, then lp-ft-finetune)"
        )
    if (method == "partial") != (unfreeze_blocks is not None):
        raise ValueError(
            f"unfreeze_blocks is required for method 'partial' and only for it (method {method!r}, unfreeze_blocks {unfreeze_blocks})"
        )
    head = _head_params(model)
    if method in ("full", "lp-ft-finetune"):
        trainable = list(model.parameters())
    elif method == "partial":
        assert unfreeze_blocks is not None
        if unfreeze_blocks < 1:
            raise ValueError(f"unfreeze_blocks must be at least 1, not {unfreeze_blocks}")
        trainable = [*head, *(p for block in backbone_blocks(model)[-unfreeze_blocks:] for p in block.parameters())]
    else:
        trainable = head
    chosen = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    head_ids = {id(p) for p in head}
    groups = ParamGroups(head=head, backbone=[p for p in model.parameters() if p.requires_grad and id(p) not in head_ids])
    if freeze_batch_norm and model.training:
        set_train_mode(model, frozen_bn=True)
    return groups


def set_train_mode(model: nn.Module, frozen_bn: bool = True) -> nn.Module:
    """``model.train()``, then, with ``frozen_bn``, BatchNorm layers without trainable parameters back
    to eval mode, so that a frozen backbone keeps the running statistics it was trained with rather
    than drifting to those of small fine-tuning batches. Returns ``model``."""
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()
    return model


# ------------------------------------------------------------------------------------- feature caching
def _without(model: nn.Module, name: str) -> nn.Module:
    """A copy of ``model`` sharing every sub-module and parameter, in which ``name`` is ``nn.Identity``."""
    root = copy.copy(model)
    parent = root
    *path, last = name.split(".")
    for part in path:
        # Copy the _modules dict of each module on the path, so that the swap leaves ``model`` intact.
        object.__setattr__(parent, "_modules", dict(parent._modules))
        child = copy.copy(parent.get_submodule(part))
        parent._modules[part] = child
        parent = child
    object.__setattr__(parent, "_modules", dict(parent._modules))
    parent._modules[last] = nn.Identity()
    return root


def split_for_feature_cache(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(features, head)`` with ``head(features(x)) == model(x)`` in eval mode, sharing the model's
    parameters; ``head`` holds all that a linear probe trains, so that frozen-backbone features can be
    computed once and only the head trained on them."""
    heads = head_module_names(model)
    if len(heads) != 1:
        raise ValueError(f"{type(model).__name__} has {len(heads)} head modules; feature caching needs one")
    (name,) = heads
    if isinstance(model, models.SqueezeNet):
        # Its head is a 1x1 conv followed by ReLU and pooling, so the cache holds the spatial map.
        classifier = cast(nn.Sequential, model.classifier)
        at = next(i for i, m in enumerate(classifier) if f"classifier.{i}" == name)
        features = nn.Sequential(model.features, *classifier[:at])
        return features, nn.Sequential(*classifier[at:], nn.Flatten(1))
    return _without(model, name), model.get_submodule(name)
