"""What trains under each strategy: the backbone cut into blocks (``backbone_blocks``), the parameters
``apply_strategy`` leaves trainable for a stage's method, frozen modules (dropout, stochastic depth,
BatchNorm) kept in eval mode (``set_train_mode``), and the model cut into a frozen feature extractor and a trainable head for
feature caching (``split_for_feature_cache``).

Generic rules serve every classification model of ``torchvision.models`` (the blocks are the children
of the main feature container; the head is what ``model.head_module_names`` finds), with per-family
code only for SqueezeNet's convolutional classifier.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

from torch import nn
from torchvision import models

from finetune_trainer.model import head_module_names

__all__ = [
    "METHODS",
    "NO_DECAY_NAMES",
    "BlockGroup",
    "Method",
    "ParamGroups",
    "apply_strategy",
    "backbone_block_names",
    "backbone_blocks",
    "set_train_mode",
    "split_for_feature_cache",
]

Method = Literal["linear-probe", "partial", "full", "lp-ft-probe", "lp-ft-finetune"]
"""A training stage: the API's ``lp-ft`` runs as ``lp-ft-probe`` then ``lp-ft-finetune``."""
METHODS: Final[tuple[str, ...]] = get_args(Method)

# Sub-modules that hold the backbone's sequence of blocks, tried in order; models without one
# (ResNet, GoogLeNet, Inception, ShuffleNet) keep their blocks directly on the model.
_BLOCK_CONTAINERS: Final = ("features", "layers", "trunk_output", "encoder.layers", "blocks")

# A normalisation layer standing alone in a container finishes the layer before it (``conv1, bn1``),
# so it joins that layer's block instead of being a block nobody would unfreeze on its own.
_NORM_TYPES: Final = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


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
# Parameters that are not weights of a layer, by their last name: ViT's class token and position
# embedding, Swin's relative position bias, ConvNeXt's layer scale. Decaying them pulls them towards 0 for
# no regularising benefit, so torchvision's reference recipes exempt them as they exempt biases.
NO_DECAY_NAMES: Final = frozenset({"class_token", "pos_embedding", "relative_position_bias_table", "layer_scale"})


@dataclass(frozen=True)
class ParamGroups:
    """The trainable parameters after ``apply_strategy``: the head's, and the backbone's (which may
    train at a lower learning rate). ``no_decay`` holds the ids of multi-dimensional parameters that
    get no weight decay all the same (``NO_DECAY_NAMES``); one-dimensional ones never get it."""

    head: list[nn.Parameter]
    backbone: list[nn.Parameter]
    no_decay: frozenset[int] = frozenset()

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
    parameters. A model in train mode gets its frozen modules put in eval mode at once (BatchNorm only
    with ``freeze_batch_norm``); call ``set_train_mode`` instead of ``model.train()`` afterwards."""
    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; one of {', '.join(METHODS)} (lp-ft runs as lp-ft-probe, then lp-ft-finetune)"
        )
    if (method == "partial") != (unfreeze_blocks is not None):
        raise ValueError(
            f"unfreeze_blocks is required for method 'partial' and only for it "
            f"(method {method!r}, unfreeze_blocks {unfreeze_blocks})"
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
    exempt = frozenset(id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in NO_DECAY_NAMES)
    groups = ParamGroups(
        head=head, backbone=[p for p in model.parameters() if p.requires_grad and id(p) not in head_ids], no_decay=exempt
    )
    if model.training:
        set_train_mode(model, frozen_bn=freeze_batch_norm)
    return groups


def set_train_mode(model: nn.Module, frozen_bn: bool = True) -> nn.Module:
    """``model.train()``, then every frozen module back to eval mode, so that a frozen part computes
    the same features on every pass, as the feature cache (computed in eval mode) does. Returns ``model``.

    Frozen: a module with parameters, none of them trainable (a frozen block, with its dropout and
    stochastic depth inside); or a module without parameters (dropout, stochastic depth, pooling) that
    comes before every trainable parameter in registration order, torchvision's forward order (VGG's and
    MobileNet's classifier dropout under a linear probe). A module after a trainable one, or holding one,
    keeps training. BatchNorm layers without trainable parameters go to eval mode only with
    ``frozen_bn``: without it they keep adapting their running statistics."""
    model.train()
    trainable_seen = False
    for module in model.modules():  # pre-order: a container comes before its children
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad for p in own):
            trainable_seen = True
            continue
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if is_bn and not frozen_bn:
            continue
        params = list(module.parameters())
        frozen = not any(p.requires_grad for p in params) if params else not trainable_seen
        if frozen:
            # Not module.eval(): that would also stop a BatchNorm below that ``frozen_bn`` keeps training.
            module.training = False
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
