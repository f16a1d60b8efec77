"""Head replacement, freezing strategies, blocks and feature-cache splitting on every torchvision
classification model (random weights, tiny inputs), plus the strategy knobs on one model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torchvision import models

from finetune_trainer.model import head_module_names, replace_head
from finetune_trainer.strategy import (
    METHODS,
    ParamGroups,
    apply_strategy,
    backbone_block_names,
    backbone_blocks,
    set_train_mode,
    split_for_feature_cache,
)

NUM_CLASSES = 7
ALL_MODELS = models.list_models(module=models)

# Smallest input each model accepts. ViTs are built for a 2x2-patch image: only the length of the
# position embedding changes (build_model's 224-pixel vit_b_32 is covered in test_model_weights).
INPUT_SIZE: dict[str, int] = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224}
BUILD_KWARGS: dict[str, dict[str, Any]] = {
    "vit_b_16": {"image_size": 32},
    "vit_b_32": {"image_size": 64},
    "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 64},
    "vit_h_14": {"image_size": 28},
    # Keep their default aux heads, which replace_head must drop; skip the slow init.
    "googlenet": {"init_weights": False},
    "inception_v3": {"init_weights": False},
}
# Over 300M parameters: several seconds and GBs to build each; deselected by -m "not slow".
HEAVY = {"regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32"}
# A full backward pass is run on one model of each family.
FULL_BACKWARD = {
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3", "maxvit_t",
    "mnasnet0_5", "mobilenet_v3_small", "regnet_y_400mf", "resnet18", "shufflenet_v2_x0_5", "squeezenet1_1",
    "swin_v2_t", "vgg11_bn", "vit_b_16",
}  # fmt: skip


def _case(name: str) -> Any:
    return pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name


def _input_size(name: str) -> int:
    return int(BUILD_KWARGS.get(name, {}).get("image_size", INPUT_SIZE.get(name, 32)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=[_case(n) for n in ALL_MODELS])
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, torch.Tensor]:
    """(name, model with a NUM_CLASSES head, input batch of 2); built once per model for all tests."""
    name: str = request.param
    torch.manual_seed(0)
    model = models.get_model(name, weights=None, **BUILD_KWARGS.get(name, {}))
    replace_head(model, NUM_CLASSES)
    size = _input_size(name)
    return name, model, torch.randn(2, 3, size, size)


def _ids(params: Any) -> set[int]:
    return {id(p) for p in params}


def _head_ids(model: nn.Module) -> set[int]:
    return {id(p) for n in head_module_names(model) for p in model.get_submodule(n).parameters()}


def _trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------ every model
def test_list_covers_the_torchvision_catalogue() -> None:
    assert len(ALL_MODELS) >= 80, torchvision.__version__


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_output_is_a_plain_tensor_with_the_new_classes(case: tuple[str, nn.Module, torch.Tensor], mode: str) -> None:
    name, model, x = case
    model.train(mode == "train")
    with torch.no_grad():
        out = model(x)
    assert type(out) is torch.Tensor, f"{name} {mode}: {type(out).__name__}"
    assert out.shape == (2, NUM_CLASSES)


def test_head_is_the_replaced_classifier(case: tuple[str, nn.Module, torch.Tensor]) -> None:
    name, model, _ = case
    heads = head_module_names(model)
    assert len(heads) == 1
    head = model.get_submodule(heads[0])
    out_features = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    assert out_features == NUM_CLASSES, name
    assert not any("aux" in n.lower() for n, _ in model.named_modules()), f"{name} kept an auxiliary head"


def test_blocks_partition_the_backbone_input_to_output(case: tuple[str, nn.Module, torch.Tensor]) -> None:
    name, model, _ = case
    blocks, names = backbone_blocks(model), backbone_block_names(model)
    assert len(blocks) == len(names) >= 2, names
    per_block = [_ids(b.parameters()) for b in blocks]
    for i, ids in enumerate(per_block):
        assert ids, f"{name}: block {names[i]} has no parameters"
        for other in per_block[i + 1 :]:
            assert not ids & other, f"{name}: block {names[i]} overlaps a later one"
    assert set().union(*per_block) == _ids(model.parameters()) - _head_ids(model), f"{name}: blocks miss backbone parameters"
    # The last block is the one feeding the head: its parameters come last in registration order.
    order = {id(p): i for i, p in enumerate(model.parameters())}
    last = max(order[i] for i in per_block[-1])
    assert all(order[i] < last for ids in per_block[:-1] for i in ids), f"{name}: {names[-1]} is not the last block"


def _after(model: nn.Module, head: str) -> set[str]:
    """Modules registered after the head (SqueezeNet's ReLU and pooling behind its conv head)."""
    names = [n for n, _ in model.named_modules()]
    return set(names[names.index(head) + 1 :])


def test_linear_probe_trains_exactly_the_head(case: tuple[str, nn.Module, torch.Tensor]) -> None:
    name, model, x = case
    groups = apply_strategy(model, "linear-probe")
    assert _trainable_ids(model) == _head_ids(model) == _ids(groups.parameters())
    assert groups.backbone == []
    optimizer = torch.optim.SGD(groups.optimizer_groups(lr=0.1))
    visible = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert visible == _head_ids(model)
    set_train_mode(model, frozen_bn=True)
    # Every frozen module (dropout and stochastic depth included) is in eval mode: only the head, the
    # modules holding it and what comes after it in the forward pass train.
    (head,) = head_module_names(model)
    training = {n for n, m in model.named_modules() if m.training}
    ancestors = {""} | {head.rsplit(".", i)[0] for i in range(1, head.count(".") + 1)}
    assert {n for n in training if not n.startswith(head)} <= ancestors | _after(model, head), name
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == _head_ids(model), name


def test_partial_trains_the_head_and_the_last_block(case: tuple[str, nn.Module, torch.Tensor]) -> None:
    name, model, _ = case
    groups = apply_strategy(model, "partial", unfreeze_blocks=1)
    expected = _head_ids(model) | _ids(backbone_blocks(model)[-1].parameters())
    assert _trainable_ids(model) == expected == _ids(groups.parameters())
    assert _ids(groups.head) == _head_ids(model)
    assert len(groups.backbone) > 0, f"{name}: partial trains no more than a linear probe"
    # Only one block is unfrozen: the first never is.
    assert not _ids(backbone_blocks(model)[0].parameters()) & _trainable_ids(model)


@pytest.mark.parametrize("method", ["full", "lp-ft-finetune"])
def test_full_trains_everything(case: tuple[str, nn.Module, torch.Tensor], method: str) -> None:
    name, model, x = case
    groups = apply_strategy(model, method)
    assert all(p.requires_grad for p in model.parameters())
    assert _ids(groups.parameters()) == _ids(model.parameters())
    assert _ids(groups.head) == _head_ids(model)
    if name in FULL_BACKWARD and method == "full":
        set_train_mode(model)
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{name}: no gradient for {missing[:3]}"
        model.zero_grad(set_to_none=True)


def test_feature_cache_split_reproduces_the_model(case: tuple[str, nn.Module, torch.Tensor]) -> None:
    name, model, x = case
    apply_strategy(model, "linear-probe")
    features, head = split_for_feature_cache(model)
    assert _ids(head.parameters()) == _trainable_ids(model), f"{name}: the head must hold every probe parameter"
    model.eval()
    features.eval()
    with torch.no_grad():
        expected = model(x)
        cached = features(x)
        actual = head(cached)
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-4), f"{name}: max diff {(actual - expected).abs().max()}"
    # The split shares the model: it still has its head, and both see the same parameters.
    assert head_module_names(model) and model.get_submodule(head_module_names(model)[0]) is not None
    assert _ids(features.parameters()) | _ids(head.parameters()) == _ids(model.parameters())


# ------------------------------------------------------------------------------- strategy details
@pytest.fixture
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return replace_head(models.resnet18(), NUM_CLASSES)


def _bn_training(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize(
    ("method", "blocks", "freeze_bn", "training_bn_prefixes"),
    [
        ("linear-probe", None, True, ()),
        ("lp-ft-probe", None, True, ()),
        ("partial", 1, True, ("layer4.",)),
        ("partial", 2, True, ("layer3.", "layer4.")),
        ("full", None, True, ("",)),
        ("linear-probe", None, False, ("",)),
    ],
)
def test_frozen_batch_norm_stays_in_eval_mode(
    resnet18: nn.Module, method: str, blocks: int | None, freeze_bn: bool, training_bn_prefixes: tuple[str, ...]
) -> None:
    resnet18.train()
    apply_strategy(resnet18, method, unfreeze_blocks=blocks, freeze_batch_norm=freeze_bn)
    for mode in (_bn_training(resnet18), _bn_training(set_train_mode(resnet18, frozen_bn=freeze_bn))):
        assert mode == {n: n.startswith(training_bn_prefixes) for n in mode}
    before = resnet18.state_dict()["bn1.running_mean"].clone()
    with torch.no_grad():
        resnet18(torch.randn(2, 3, 32, 32))
    assert torch.equal(resnet18.state_dict()["bn1.running_mean"], before) == (not "bn1".startswith(training_bn_prefixes))


def test_apply_strategy_in_eval_mode_leaves_the_mode_alone(resnet18: nn.Module) -> None:
    resnet18.eval()
    apply_strategy(resnet18, "linear-probe")
    assert not any(m.training for m in resnet18.modules())


@pytest.mark.parametrize(("blocks", "trained"), [(1, ["layer4"]), (3, ["layer2", "layer3", "layer4"]), (5, None), (1000, None)])
def test_partial_counts_blocks_from_the_head(resnet18: nn.Module, blocks: int, trained: list[str] | None) -> None:
    assert backbone_block_names(resnet18) == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"]
    apply_strategy(resnet18, "partial", unfreeze_blocks=blocks)
    trainable = {n.split(".")[0] for n, p in resnet18.named_parameters() if p.requires_grad}
    everything = {n.split(".")[0] for n, _ in resnet18.named_parameters()}
    assert trainable == (everything if trained is None else {*trained, "fc"})


@pytest.mark.parametrize(
    ("method", "blocks", "message"),
    [
        ("lp-ft", None, "lp-ft-probe"),
        ("finetune", None, "unknown method"),
        ("partial", None, "unfreeze_blocks is required"),
        ("full", 2, "only for it"),
        ("partial", 0, "at least 1"),
    ],
)
def test_apply_strategy_rejects_bad_arguments(resnet18: nn.Module, method: str, blocks: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_strategy(resnet18, method, unfreeze_blocks=blocks)


def test_methods_are_the_stages_of_the_api_methods() -> None:
    assert set(METHODS) == {"linear-probe", "partial", "full", "lp-ft-probe", "lp-ft-finetune"}


def test_optimizer_groups_give_the_backbone_its_own_rate(resnet18: nn.Module) -> None:
    groups = apply_strategy(resnet18, "full")
    assert isinstance(groups, ParamGroups)
    head, backbone = groups.optimizer_groups(lr=0.1, backbone_lr=0.01)
    assert (head["name"], head["lr"], backbone["name"], backbone["lr"]) == ("head", 0.1, "backbone", 0.01)
    assert len(head["params"]) + len(backbone["params"]) == len(list(resnet18.parameters()))
    assert [g["name"] for g in apply_strategy(resnet18, "linear-probe").optimizer_groups(lr=0.1)] == ["head"]


def test_replace_head_keeps_device_and_dtype() -> None:
    model = models.squeezenet1_1().to(torch.float64)
    replace_head(model, 3)
    head = model.get_submodule(head_module_names(model)[0])
    assert isinstance(head, nn.Conv2d)
    assert (head.out_channels, head.weight.dtype, head.kernel_size) == (3, torch.float64, (1, 1))


def test_split_leaves_the_model_whole(resnet18: nn.Module) -> None:
    features, head = split_for_feature_cache(resnet18)
    assert isinstance(features.get_submodule("fc"), nn.Identity)
    assert resnet18.fc is head
    assert features.get_submodule("layer4") is resnet18.layer4
    resnet18.eval()
    with torch.no_grad():
        assert features(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def _first_trainable(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False)))


@pytest.mark.parametrize(
    ("name", "method", "blocks", "same_output"),
    [
        # Stochastic depth in every ConvNeXt / EfficientNet / Swin block, dropout before the head.
        ("convnext_tiny", "linear-probe", None, True),
        ("efficientnet_b0", "linear-probe", None, True),
        ("swin_t", "lp-ft-probe", None, True),
        # Dropout inside the classifier, between frozen fc layers and the head.
        ("mobilenet_v3_small", "linear-probe", None, True),
        # What trains keeps its dropout and stochastic depth: the outputs differ pass to pass.
        ("convnext_tiny", "partial", 1, False),
        ("mobilenet_v3_small", "partial", 1, False),
        ("efficientnet_b0", "full", None, False),
    ],
)
def test_frozen_modules_give_the_same_features_on_every_pass(
    name: str, method: str, blocks: int | None, same_output: bool
) -> None:
    torch.manual_seed(0)
    model = replace_head(models.get_model(name, weights=None), NUM_CLASSES)
    apply_strategy(model, method, unfreeze_blocks=blocks)
    set_train_mode(model)
    # The input of the first trainable layer is the output of the frozen part (the image under "full").
    seen: list[torch.Tensor] = []
    _first_trainable(model).register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = [model(x), model(x)]
    assert torch.equal(seen[0], seen[1]), f"{name} {method}: the frozen part differs pass to pass"
    assert torch.equal(outputs[0], outputs[1]) == same_output
