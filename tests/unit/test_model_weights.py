"""Starting weights: torchvision weight names, and state_dict / checkpoint files from earlier jobs
(``weights_uri``). Nothing is downloaded: torchvision's download is replaced by a local state_dict."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models import WeightsEnum

from finetune_trainer.errors import WeightsError
from finetune_trainer.model import (
    build_model,
    head_module_names,
    load_state_dict_file,
    replace_head,
    resolve_weights,
)

BACKBONE_KEY = "layer1.0.conv1.weight"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ weight names
@pytest.mark.parametrize(
    ("name", "spec", "expected"),
    [
        ("resnet18", "DEFAULT", models.ResNet18_Weights.IMAGENET1K_V1),
        ("resnet18", "IMAGENET1K_V1", models.ResNet18_Weights.IMAGENET1K_V1),
        ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", models.ResNet18_Weights.IMAGENET1K_V1),
        ("resnet18", "ResNet18_Weights.DEFAULT", models.ResNet18_Weights.IMAGENET1K_V1),
        ("resnet50", "DEFAULT", models.ResNet50_Weights.IMAGENET1K_V2),
        ("resnet50", "IMAGENET1K_V1", models.ResNet50_Weights.IMAGENET1K_V1),
        ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1),
        ("resnet18", None, None),
    ],
)
def test_weight_names_resolve_without_downloading(name: str, spec: str | None, expected: WeightsEnum | None) -> None:
    assert resolve_weights(name, spec) is expected


@pytest.mark.parametrize(
    ("name", "spec", "message"),
    [
        ("resnet18", "IMAGENET1K_V2", "'IMAGENET1K_V2' is not a weight of resnet18; accepted: DEFAULT, IMAGENET1K_V1"),
        ("resnet18", "ResNet50_Weights.IMAGENET1K_V1", "its weights are ResNet18_Weights"),
        ("resnet18", "imagenet", "accepted: DEFAULT"),
    ],
)
def test_unknown_weight_names_list_the_accepted_ones(name: str, spec: str, message: str) -> None:
    with pytest.raises(WeightsError, match=message):
        resolve_weights(name, spec)


@pytest.fixture
def offline_torchvision(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], dict[str, Tensor]]:
    """Make torchvision "download" a random 1000-class state_dict of the model; returns how to get it."""
    made: dict[str, dict[str, Tensor]] = {}

    def reference(name: str) -> dict[str, Tensor]:
        if name not in made:
            kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
            made[name] = models.get_model(name, weights=None, **kwargs).state_dict()
        return made[name]

    builders = {models.get_model_weights(n): n for n in ("resnet18", "googlenet", "inception_v3", "squeezenet1_1", "vit_b_32")}

    def get_state_dict(self: WeightsEnum, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        return reference(builders[type(self)])

    monkeypatch.setattr(WeightsEnum, "get_state_dict", get_state_dict)
    return reference


@pytest.mark.parametrize(
    ("name", "size"), [("resnet18", 32), ("googlenet", 32), ("inception_v3", 75), ("squeezenet1_1", 32), ("vit_b_32", 224)]
)
def test_torchvision_weights_are_loaded_then_the_head_replaced(
    offline_torchvision: Callable[[str], dict[str, Tensor]], name: str, size: int
) -> None:
    model = build_model(name, "DEFAULT", 4)
    reference = offline_torchvision(name)
    (head,) = head_module_names(model)
    backbone = [k for k in model.state_dict() if not k.startswith(f"{head}.")]
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in backbone)
    model.train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert type(out) is torch.Tensor
    assert out.shape == (2, 4)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_googlenet_and_inception_always_renormalise_their_input(
    offline_torchvision: Callable[[str], dict[str, Tensor]], tmp_path: Path, name: str
) -> None:
    torch.save(offline_torchvision(name), tmp_path / "model.pt")
    built = [build_model(name, "DEFAULT", 3), build_model(name, None, 3), build_model(name, None, 3, str(tmp_path / "model.pt"))]
    assert [m.transform_input for m in built] == [True, True, True]
    assert [m.aux_logits for m in built] == [False, False, False]


def test_weights_and_weights_uri_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        build_model("resnet18", "DEFAULT", 3, weights_uri=str(tmp_path / "model.pt"))


# ------------------------------------------------------------------------------------- weights files
def _trained(name: str, num_classes: int) -> nn.Module:
    torch.manual_seed(1)
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return replace_head(models.get_model(name, weights=None, **kwargs), num_classes)


def _plain(sd: dict[str, Tensor]) -> Any:
    return sd


def _checkpoint(sd: dict[str, Tensor]) -> Any:
    return {"model": sd, "epoch": 7, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "classes": ["a", "b"]}


def _ddp(sd: dict[str, Tensor]) -> Any:
    return {f"module.{k}": v for k, v in sd.items()}


def _ddp_checkpoint(sd: dict[str, Tensor]) -> Any:
    return {"model": _ddp(sd), "epoch": 1}


def _compiled(sd: dict[str, Tensor]) -> Any:
    return {f"_orig_mod.{k}": v for k, v in sd.items()}


def _half(sd: dict[str, Tensor]) -> Any:
    return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("wrap", [_plain, _checkpoint, _ddp, _ddp_checkpoint, _compiled, _half])
@pytest.mark.parametrize(
    ("source_classes", "keep_head", "head_loaded"), [(5, False, False), (3, False, False), (5, True, False), (3, True, True)]
)
def test_resnet18_file_loads_into_a_new_head(
    tmp_path: Path, wrap: Callable[[dict[str, Tensor]], Any], source_classes: int, keep_head: bool, head_loaded: bool
) -> None:
    source = _trained("resnet18", source_classes).state_dict()
    path = tmp_path / "model.pt"
    torch.save(wrap(source), path)
    model = build_model("resnet18", None, 3, weights_uri=str(path), keep_head=keep_head)
    assert torch.allclose(model.state_dict()[BACKBONE_KEY], source[BACKBONE_KEY].float(), atol=1e-3)
    assert torch.equal(model.state_dict()["bn1.running_mean"].half(), source["bn1.running_mean"].half())
    fc = model.get_submodule("fc")
    assert isinstance(fc, nn.Linear)
    assert fc.out_features == 3
    same_head = fc.weight.shape == source["fc.weight"].shape and torch.allclose(fc.weight, source["fc.weight"].float(), atol=1e-3)
    assert same_head == head_loaded


@pytest.mark.parametrize("uri", ["file://{path}", "{path}", "memory://weights/{name}"])
def test_uri_schemes(tmp_path: Path, uri: str) -> None:
    source = _trained("resnet18", 5).state_dict()
    path = tmp_path / "model.pt"
    torch.save(source, path)
    name = f"{tmp_path.name}.pt"
    with fsspec.open(f"memory://weights/{name}", "wb") as f:  # fsspec stands in for s3:// and gs://
        f.write(path.read_bytes())
    model = build_model("resnet18", None, 2, weights_uri=uri.format(path=path, name=name))
    assert torch.equal(model.state_dict()[BACKBONE_KEY], source[BACKBONE_KEY])


@pytest.mark.parametrize(("name", "source_aux"), [("inception_v3", True), ("inception_v3", False), ("googlenet", True)])
def test_aux_heads_in_the_file_are_ignored(tmp_path: Path, name: str, source_aux: bool) -> None:
    torch.manual_seed(2)
    kwargs = {"init_weights": False, "aux_logits": source_aux}
    source = models.get_model(name, weights=None, **kwargs).state_dict()
    assert any("aux" in k.lower() for k in source) == source_aux
    torch.save(source, tmp_path / "model.pt")
    model = build_model(name, None, 4, weights_uri=str(tmp_path / "model.pt"))
    conv = next(k for k in source if k.endswith("conv.weight"))
    assert torch.equal(model.state_dict()[conv], source[conv])
    assert not any("aux" in k.lower() for k in model.state_dict())


def _save_other_architecture(path: Path) -> None:
    torch.save(_trained("mobilenet_v3_small", 5).state_dict(), path)


def _save_wider_resnet(path: Path) -> None:
    torch.save(_trained("resnet34", 3).state_dict(), path)


def _save_long_key(path: Path) -> None:
    torch.save({**_trained("resnet18", 3).state_dict(), "x" * 100_000: torch.zeros(1)}, path)


def _save_module(path: Path) -> None:
    torch.save(_trained("resnet18", 3), path)


def _save_garbage(path: Path) -> None:
    path.write_text("not a checkpoint\n" * 100)


def _save_list(path: Path) -> None:
    torch.save([torch.zeros(1)], path)


def _save_dict_without_tensors(path: Path) -> None:
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, path)


def _save_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"model": "resnet18"}))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    ("save", "message"),
    [
        (
            _save_other_architecture,
            r"does not fit resnet18 \(another architecture\?\): missing conv1\.weight, bn1\.weight, bn1\.bias, …",
        ),
        (_save_wider_resnet, r"does not fit resnet18 .*unexpected layer1\.2\.conv1\.weight"),
        (_save_long_key, r"does not fit resnet18 .*unexpected 'x{70,}\.\.\.$"),  # the 100,000-character key was whole
        (
            _save_module,
            r"not a PyTorch state_dict or checkpoint: it pickles a torchvision\.models\.resnet\.ResNet "
            r"\(save model\.state_dict\(\)",
        ),
        (_save_garbage, "not a PyTorch state_dict or checkpoint"),
        (_save_list, "holds a list, not a state_dict"),
        (_save_dict_without_tensors, r"holds a dict with keys \['config', 'epoch'\]"),
        (_save_pickle, "not a PyTorch state_dict or checkpoint"),
    ],
)
def test_unusable_files_give_one_line_naming_the_file(tmp_path: Path, save: Callable[[Path], None], message: str) -> None:
    path = tmp_path / "weights.pt"
    save(path)
    with pytest.raises(WeightsError, match=message) as info:
        build_model("resnet18", None, 3, weights_uri=str(path))
    text = str(info.value)
    assert str(path) in text
    assert "\n" not in text
    assert len(text) < 400


@pytest.mark.parametrize("uri", ["{tmp}/missing.pt", "file://{tmp}/missing.pt", "memory://nowhere/missing.pt"])
def test_missing_file_is_named(tmp_path: Path, uri: str) -> None:
    uri = uri.format(tmp=tmp_path)
    with pytest.raises(WeightsError, match="no such file") as info:
        load_state_dict_file(uri)
    assert uri in str(info.value)


def test_pvc_uri_asks_for_the_mounted_path() -> None:
    with pytest.raises(WeightsError, match="pass the mounted path"):
        load_state_dict_file("pvc://claim/model.pt")


def test_weights_error_is_a_value_error() -> None:
    assert issubclass(WeightsError, ValueError)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("make", "kind"), [(os.mkfifo, "a FIFO"), (lambda p: p.symlink_to("/dev/zero"), "a character device")])
def test_a_weights_file_that_is_no_plain_file_is_refused_unread(
    tmp_path: Path, make: Callable[[Path], object], kind: str
) -> None:
    """A weightsUri on a shared volume that someone swapped for a FIFO (the job waited for a writer for ever) or a
    link to /dev/zero (read until memory ran out: no card beside it bounds the size)."""
    path = tmp_path / "weights.pt"
    make(path)
    with pytest.raises(WeightsError, match=re.escape(f"weights_uri {path}: cannot read {path}: {kind}, not a plain file")):
        load_state_dict_file(str(path))
