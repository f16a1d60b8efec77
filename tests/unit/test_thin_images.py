"""A thin image (a 1×100,000 PNG: a few KB, far under PIL's pixel limit) resized on its short side by a preset became
gigapixels (232×23,200,000) and exhausted memory. One rule (``image_bounds.check_resize``, from the header) refuses it
in ``finetune predict`` (one line naming the file, its size and what is accepted), and training skips and counts it
like a corrupt image: the map-style scan and reads, the streaming decode (CPU and ``jpegDecode: gpu``, on the CPU here).

The rule is checked at the real limit in isolation; through the readers ``Image.MAX_IMAGE_PIXELS`` is lowered to 1 Mpx
and the presets resize to 8, so that a reader without the rule, resizing the strip, makes 6.4 Mpx, not gigapixels."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from finetune_trainer import predict as predict_module
from finetune_trainer.data import build_datasets, eval_transform, train_transform
from finetune_trainer.errors import ArtifactError, TrainerError
from finetune_trainer.gpu_decode import decode_on_device
from finetune_trainer.image_bounds import OversizedImage, check_resize, short_side_resize
from finetune_trainer.image_folder import ImageFiles, StreamedImages, decode_image, scan_images
from finetune_trainer.inputs import InputSpec
from finetune_trainer.predict import image_transform, predict, predict_command
from finetune_trainer.streaming import Decoder, StreamSource
from finetune_trainer.unreadable import Unreadable, readable_batches
from tests.support.tiny_model import write_tiny_artifacts
from tests.unit.test_listing_record import MAP_STYLE, _config, _folder

SPEC = InputSpec(image_size=8, resize_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", grayscale_to_rgb=False)
_UINT8 = T.Compose([T.ToImage(), T.Resize(8), T.CenterCrop(8)])  # the per-image part of an evaluation preset
_LIMIT = 1_000_000  # PIL's MAX_IMAGE_PIXELS for the reader tests: the strips open (1e5 px), their resize (6.4 Mpx) does not


@pytest.fixture
def low_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", _LIMIT)


def _image(path: Path, size: tuple[int, int], shade: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    Image.fromarray(np.random.default_rng(shade).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


def _strip(path: Path, size: tuple[int, int] = (1, 100_000)) -> str:
    """A thin image of one colour: a few hundred bytes as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40, 90, 160)).save(path)
    return str(path)


def _rows(paths: list[str]) -> dict[str, np.ndarray]:
    n = len(paths)
    return {"path": np.asarray(paths, dtype=object), "label": np.zeros(n, dtype=np.int64), "key": np.arange(n)}


# ------------------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize(
    ("size", "resize", "refused"),
    [
        ((1, 100_000), 232, True),  # 232×23,200,000: 5.4 Gpx
        ((100_000, 1), 232, True),  # the same, lying down
        ((3, 60_000), 232, True),  # 232×4,640,000: 1.1 Gpx
        ((1, 1_700), 232, True),  # 232×394,400: 91.5 Mpx, just over 89.5
        ((1, 1_600), 232, False),  # 232×371,200: 86.1 Mpx, just under
        ((100, 10_000), 232, False),  # a 100:1 panorama: 5.4 Mpx
        ((4_000, 3_000), 1171, False),  # a photo at the largest preset resize
        ((224, 224), 232, False),
        ((1, 100_000), None, False),  # no short-side resize: nothing grows
    ],
)
def test_the_rule_at_pils_real_limit(size: tuple[int, int], resize: int | None, refused: bool) -> None:
    if refused:
        with pytest.raises(OversizedImage, match=rf"^{size[0]}x{size[1]} image: resizing its short side to {resize} ") as e:
            check_resize(size, resize)
        assert "accepted: at most 89,478,485 pixels" in str(e.value) and "\n" not in str(e.value)
    else:
        check_resize(size, resize)


@pytest.mark.parametrize(
    ("transform", "resize"),
    [
        (eval_transform(SPEC.model_copy(update={"resize_size": 232, "image_size": 224})), 232),
        (image_transform(SPEC), 8),  # predict's: the RGB conversion, then the evaluation preset
        (train_transform(SPEC, "light"), 8),
        (train_transform(SPEC, "standard"), None),  # RandomResizedCrop: a crop of the image, never larger than it
        (T.Compose([T.ToImage(), T.Resize((8, 8))]), None),  # a fixed output size
        (lambda image: image, None),
    ],
)
def test_the_resize_a_transform_makes_is_found(transform: object, resize: int | None) -> None:
    assert short_side_resize(transform) == resize


def test_the_header_is_judged_before_anything_is_decoded() -> None:
    """At PIL's real limit and the usual resize: refused from the header, never decoded or resized."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 100_000)).save(buffer, "PNG")
    with pytest.raises(OversizedImage, match=r"^1x100000 image: .* makes it 232x23200000 \(5,382,400,000 pixels\)"):
        decode_image(buffer.getvalue(), 232)


# ------------------------------------------------------------------------------------------------ finetune predict
@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1), (3, 60_000)])
@pytest.mark.usefixtures("low_limit")
def test_predicts_loader_refuses_a_thin_image_in_one_line(tmp_path: Path, size: tuple[int, int]) -> None:
    transform = image_transform(SPEC)
    path = _strip(tmp_path / "strip.png", size)
    with pytest.raises(ArtifactError) as e:
        predict_module._read_input(path, transform)
    message = str(e.value)
    assert message.startswith(f"{path}: {size[0]}x{size[1]} image: resizing its short side to 8 ")
    assert f"accepted: at most {_LIMIT:,} pixels" in message and "\n" not in message
    control = _image(tmp_path / "photo.png", (50, 40))
    assert predict_module._read_input(control, transform).shape == (3, 8, 8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_artifacts(tmp_path_factory.mktemp("out"), ["cat", "dog"], SPEC).run_dir


@pytest.mark.usefixtures("low_limit")
def test_finetune_predict_names_the_thin_image_and_predicts_the_rest(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strip, photo = _strip(tmp_path / "strip.png"), _image(tmp_path / "photo.png", (50, 40))
    assert predict_command(argparse.Namespace(model=str(model_dir), images=[strip, photo], top_k=1)) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith(f"error: {strip}: 1x100000 image: resizing its short side to 8 makes it 8x800000 ")
    assert captured.out.splitlines()[0] == photo


@pytest.mark.usefixtures("low_limit")
def test_predict_refuses_a_thin_image_before_transforming_any() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(OversizedImage, match=r"^1x100000 image"):
        predict(model, image_transform(SPEC), [Image.new("RGB", (8, 8)), Image.new("RGB", (1, 100_000))], 1)


# ------------------------------------------------------------------------------------------------ map-style training
@pytest.mark.usefixtures("low_limit")
def test_the_map_style_scan_skips_and_counts_a_thin_image(tmp_path: Path) -> None:
    good = [_image(tmp_path / "cat" / f"{i:03d}.png", (4, 4), i) for i in range(200)]
    strip = _strip(tmp_path / "cat" / "strip.png")
    assert [path for path, _ in scan_images("trainUri", str(tmp_path), str(tmp_path), ["cat"], 8)] == good
    # Past the limit (1 of 4, not 1 %): the job fails naming it, as for a corrupt file.
    few = tmp_path / "few"
    for i in range(3):
        _image(few / "cat" / f"{i}.png", (4, 4), i)
    _strip(few / "cat" / "strip.png")
    with pytest.raises(TrainerError, match=r"^dataset\.trainUri: 1 of 4 image files under .* cannot be read \(e\.g\. .*strip"):
        scan_images("trainUri", str(few), str(few), ["cat"], 8)
    assert strip not in good


@pytest.mark.usefixtures("low_limit")
def test_the_map_style_path_of_a_job_leaves_a_thin_image_out(tmp_path: Path) -> None:
    """``data`` scans with the job's resize size: the strip is in neither the training nor the validation images."""
    root = _folder(tmp_path / "data", per_class=60)
    strip = _strip(root / "cat" / "strip.png")
    train, val, _, spec = build_datasets(_config(tmp_path, {"trainUri": str(root)}), MAP_STYLE)
    assert spec.resize_size < 100  # the strip's resize is under a few tens of Mpx, refused or not
    listed = {path for path, _ in train.dataset.samples}  # type: ignore[attr-defined]
    assert len(listed) == 120 and strip not in listed
    assert len(train) + len(val) == 120  # type: ignore[arg-type]


@pytest.mark.usefixtures("low_limit")
def test_a_thin_image_read_map_style_is_one_line_naming_it(tmp_path: Path) -> None:
    """A file the scan did not judge (another transform's resize): refused from its header when read, in one line."""
    strip, photo = _strip(tmp_path / "strip.png"), _image(tmp_path / "photo.png", (12, 10))
    images = ImageFiles([(strip, 0), (photo, 1)], _UINT8)
    with pytest.raises(TrainerError, match=r"^dataset: cannot read image .*strip\.png: 1x100000 image: ") as e:
        images[0]
    assert "\n" not in str(e.value)
    assert images[1][0].shape == (3, 8, 8)


# ------------------------------------------------------------------------------------------------ streaming training
@pytest.mark.parametrize("epoch", [1, None], ids=["train", "validation"])
@pytest.mark.usefixtures("low_limit")
def test_the_streaming_decoder_skips_and_counts_a_thin_image(tmp_path: Path, epoch: int | None) -> None:
    paths = [_image(tmp_path / "a.png", (12, 10), 1), _strip(tmp_path / "strip.png"), _image(tmp_path / "b.png", (9, 14), 2)]
    out = Decoder(_UINT8, seed=0, epoch=epoch)(_rows(paths))
    assert list(out["bad"]) == ["", paths[1], ""]
    assert out["image"].shape == (3, 3, 8, 8)


@pytest.mark.usefixtures("low_limit")
def test_the_final_evaluation_read_map_style_drops_and_counts_a_thin_image(tmp_path: Path) -> None:
    strip, photo = _strip(tmp_path / "strip.png"), _image(tmp_path / "photo.png", (12, 10))
    tally = Unreadable()
    batches = list(readable_batches(StreamedImages([(strip, 0), (photo, 1)], _UINT8), 2, tally))
    assert [labels.tolist() for _, labels in batches] == [[1]]
    assert (tally.bad, tally.seen, tally.examples) == (1, 2, [strip])


@pytest.mark.parametrize("kind", ["png", "jpeg"])
@pytest.mark.usefixtures("low_limit")
def test_a_thin_image_decoded_on_the_device_is_dropped(tmp_path: Path, kind: str) -> None:
    """``jpegDecode: gpu`` on the CPU: a thin JPEG (at most 65,535 a side) would be decoded by nvJPEG, then resized."""
    suffix, size = (".png", (1, 100_000)) if kind == "png" else (".jpg", (1, 60_000))
    paths = [_image(tmp_path / "a.jpg", (12, 10), 1), _strip(tmp_path / f"strip{suffix}", size)]
    images = StreamedImages([(p, 0) for p in paths], _UINT8)
    cpu = torch.device("cpu")
    source = StreamSource(images, images, seed=0, rank=0, world=1, per_worker=2, decode_device=cpu)
    shipped = Decoder(_UINT8, seed=0, epoch=None, raw=True)(_rows(paths))
    out = source._decode_here(shipped, _UINT8, None, cpu)
    assert list(out["bad"]) == ["", paths[1]]
    assert out["image"].shape == (2, 3, 8, 8)
    assert [image is None for image in decode_on_device(list(shipped["data"]), cpu, 8)] == [False, True]
