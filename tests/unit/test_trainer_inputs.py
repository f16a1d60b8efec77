"""The trainer's inputs without Ray: datasets and their splits, transforms, and bad input that must fail
with one clear line naming the path or field (missing path, empty class folder, corrupt image,
validation classes, class count, weights of another architecture), plus the local-mode job loading."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader

from finetune_operator.api.catalog import load_catalog
from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.training import MAX_IMAGE_SIZE
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_operator.api.validate import ManifestError, load_job
from finetune_trainer.checkpoint import TrainState, read_checkpoint
from finetune_trainer.data import build_datasets, build_input_spec, check_dataset
from finetune_trainer.errors import TrainerError, WeightsError, exception_line, find_user_error, one_line
from finetune_trainer.inputs import InputSpec
from finetune_trainer.local import local_job
from finetune_trainer.model import build_model
from tests.support.checkpoints import save_checkpoint

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, dataset: dict[str, Any], model: dict[str, Any] | None = None) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(
        {
            "model": model or {"name": "resnet18"},
            "dataset": {"imageSize": 32, "augmentation": "none", "loaderWorkers": 0, **dataset},
            "output": {"uri": str(tmp_path / "runs")},
        }
    )
    return TrainerConfig(job_name="job", spec=spec, output_root=str(tmp_path / "runs"))


def image_folder(root: Path, counts: dict[str, int], size: int = 12) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (40 * i % 255, 100, 200)).save(root / name / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------- digits
def test_digits_subset_is_renumbered_capped_and_stratified(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"format": "digits", "classes": [7, 3], "maxPerClass": 5, "validationSplit": 0.25})
    train, val, names, spec = build_datasets(cfg)

    assert names == ["7", "3"]
    train_labels = [train[i][1] for i in range(len(train))]  # type: ignore[arg-type]
    val_labels = [val[i][1] for i in range(len(val))]  # type: ignore[arg-type]
    assert sorted(train_labels) == [0] * 5 + [1] * 5  # maxPerClass caps training only
    assert 40 <= val_labels.count(0) <= 50 and 40 <= val_labels.count(1) <= 50  # ~25% of ~180 each, uncapped
    image, _ = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert spec.grayscale_to_rgb and spec.image_size == 32


def test_digits_split_depends_on_the_seed_only(tmp_path: Path) -> None:
    def first_images(seed: int) -> torch.Tensor:
        cfg = config(tmp_path, {"format": "digits", "classes": [0, 1], "maxPerClass": 3})
        cfg.spec.hyperparameters.seed = seed
        train, _, _, _ = build_datasets(cfg)
        return torch.stack([train[i][0] for i in range(len(train))])  # type: ignore[arg-type]

    assert torch.equal(first_images(0), first_images(0))
    assert not torch.equal(first_images(0), first_images(1))


def test_fake_dataset_has_the_requested_classes(tmp_path: Path) -> None:
    train, val, names, _ = build_datasets(config(tmp_path, {"format": "fake", "fake": {"samples": 20, "classes": 4}}))
    assert (len(train), len(val), names) == (20, 5, ["class_0", "class_1", "class_2", "class_3"])  # type: ignore[arg-type]


def test_eval_preset_comes_from_the_named_weights(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"format": "fake", "imageSize": 224}, model={"name": "resnet50", "weights": "IMAGENET1K_V2"})
    spec = build_input_spec(cfg)
    assert (spec.image_size, spec.resize_size, spec.interpolation) == (224, 232, "bilinear")
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))


def test_every_preset_at_the_largest_image_size_makes_a_card_predict_reads(tmp_path: Path) -> None:
    """The card's size bounds (InputSpec) are what the trainer can write: none of its own cards is refused."""
    scalable = [(m.name, w.member) for m in load_catalog().values() if not m.fixed_input_size for w in m.weights]
    resizes = set()
    for name, weights in scalable:
        cfg = config(tmp_path, {"format": "fake", "imageSize": MAX_IMAGE_SIZE}, model={"name": name, "weights": weights})
        spec = build_input_spec(cfg)
        assert InputSpec.model_validate_json(spec.model_dump_json(by_alias=True), strict=True) == spec
        resizes.add(spec.resize_size)
    assert max(resizes) == 1171  # inception_v3's 342/299 at 1024: the bound is reached, not loose


# -------------------------------------------------------------------------------------- imagefolder
def test_image_folder_split_keeps_every_class(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "train", {"cat": 10, "dog": 10})
    train, val, names, _ = build_datasets(config(tmp_path, {"trainUri": str(root), "validationSplit": 0.2}))
    assert names == ["cat", "dog"]
    assert (len(train), len(val)) == (16, 4)  # type: ignore[arg-type]
    assert sorted(val[i][1] for i in range(4)) == [0, 0, 1, 1]


@pytest.mark.parametrize(
    ("layout", "dataset", "model", "expected"),
    [
        pytest.param({}, {"trainUri": "{tmp}/nope"}, None, r"dataset\.trainUri: .*/nope: no such directory", id="missing-path"),
        pytest.param(
            {"train/a": 3, "train/b": 0},
            {"trainUri": "{tmp}/train"},
            None,
            r"class folder .*/train/b holds no images",
            id="empty-class",
        ),
        pytest.param(
            {"train/a": 3, "train/b": 3, "val/a": 2, "val/c": 2},
            {"trainUri": "{tmp}/train", "validationUri": "{tmp}/val"},
            None,
            r"dataset\.validationUri: .*missing \['b'\], extra \['c'\]",
            id="validation-classes",
        ),
        pytest.param(
            {"train/a": 3, "train/b": 3},
            {"trainUri": "{tmp}/train"},
            {"name": "resnet18", "numClasses": 5},
            r"model\.numClasses: 5 does not match the 2 classes found in dataset\.trainUri \(a, b\)",
            id="class-count",
        ),
    ],
)
def test_bad_image_folders_fail_with_one_line(
    tmp_path: Path, layout: dict[str, int], dataset: dict[str, str], model: dict[str, Any] | None, expected: str
) -> None:
    for folder, n in layout.items():
        (tmp_path / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / folder / f"{i}.png")
    cfg = config(tmp_path, {k: v.format(tmp=tmp_path) for k, v in dataset.items()}, model)

    for check in (build_datasets, check_dataset):  # in the workers, and before Ray starts
        with pytest.raises(TrainerError, match=expected) as raised:
            check(cfg)
        assert "\n" not in str(raised.value)


def test_image_truncated_after_its_header_names_the_file_even_from_a_loader_process(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "train", {"a": 60, "b": 60})
    # Its header passes the scan; decoding it fails only when a loader reads it.
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))  # incompressible: 12 KB
    noise.save(tmp_path / "whole.png")
    (root / "b" / "broken.png").write_bytes((tmp_path / "whole.png").read_bytes()[:200])
    train, val, _, _ = build_datasets(config(tmp_path, {"trainUri": str(root), "validationSplit": 0.25}))

    with pytest.raises(TrainerError) as raised:  # wherever the split put it
        list(DataLoader(ConcatDataset([train, val]), batch_size=4, num_workers=1))
    # The DataLoader re-raises with the worker's traceback in the message; the CLI shows the one line.
    assert one_line(str(raised.value)).startswith(f"dataset: cannot read image {root / 'b' / 'broken.png'}")


def _labels(ds: Any) -> list[int]:
    return [ds[i][1] for i in range(len(ds))]


def _pixels(ds: Any) -> list[float]:
    return [float(ds[i][0].mean()) for i in range(len(ds))]


def test_dot_files_and_folders_are_not_data(tmp_path: Path) -> None:
    """A ``.thumbs/`` folder of images is no class, an empty ``.ipynb_checkpoints/`` no error, and macOS
    ``._x.png`` AppleDouble files (not images) and dot folders inside a class are skipped."""
    root = tmp_path / "train"
    for name, shade in (("cat", 0), ("dog", 255)):  # every cat black, every dog white
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (12, 12), (shade, shade, shade)).save(root / name / f"{i}.png")
            (root / name / f"._{i}.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
        (root / name / ".thumbs").mkdir()
        Image.new("RGB", (12, 12), (255 - shade,) * 3).save(root / name / ".thumbs" / "0.png")
    (root / ".thumbs").mkdir()
    for i in range(3):
        Image.new("RGB", (12, 12), (128, 128, 128)).save(root / ".thumbs" / f"{i}.png")
    (root / ".ipynb_checkpoints").mkdir()
    val_root = tmp_path / "val"
    shutil.copytree(root, val_root)
    cfg = config(tmp_path, {"trainUri": str(root), "validationUri": str(val_root)})

    check_dataset(cfg)
    train, val, names, _ = build_datasets(cfg)

    assert names == ["cat", "dog"]
    for ds in (train, val):
        assert sorted(_labels(ds)) == [0] * 5 + [1] * 5
        # Labels match the folders: black images are cats (0), white ones dogs (1).
        assert all((pixel > 0) == bool(label) for pixel, label in zip(_pixels(ds), _labels(ds), strict=True))


def test_a_few_unreadable_images_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = image_folder(tmp_path / "train", {"a": 100, "b": 100})
    (root / "b" / "broken.png").write_bytes(b"not a png at all")  # 1 of 201 files: under 1 %

    with caplog.at_level("WARNING"):
        train, val, _, _ = build_datasets(config(tmp_path, {"trainUri": str(root), "validationSplit": 0.25}))

    assert len(train) + len(val) == 200  # type: ignore[arg-type]
    assert "skipped 1 of 201 image files that cannot be read (e.g. " in caplog.text
    assert str(root / "b" / "broken.png") in caplog.text


@pytest.mark.parametrize(
    ("counts", "broken", "expected"),
    [
        pytest.param(
            {"a": 4, "b": 4},
            ["b/broken.png"],
            r"dataset\.trainUri: 1 of 9 image files under .*/train cannot be read \(e\.g\. .*/b/broken\.png: .*\); at most 1%",
            id="over-the-threshold",
        ),
        pytest.param(
            {"a": 300, "b": 0},
            ["b/broken.png"],
            r"dataset\.trainUri: class folder .*/train/b holds no readable images",
            id="class-left-empty",
        ),
    ],
)
def test_too_many_unreadable_images_fail_with_one_line(
    tmp_path: Path, counts: dict[str, int], broken: list[str], expected: str
) -> None:
    root = image_folder(tmp_path / "train", counts)
    for name in broken:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not a png at all")

    with pytest.raises(TrainerError, match=expected) as raised:
        build_datasets(config(tmp_path, {"trainUri": str(root)}))
    assert "\n" not in str(raised.value)


# ------------------------------------------------------------------------------------------ weights
def test_weights_of_another_architecture_fail_clearly(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)

    with pytest.raises(
        WeightsError, match=rf"weights_uri {path} does not fit mobilenet_v3_small \(another architecture\?\)"
    ) as raised:
        build_model("mobilenet_v3_small", None, 3, weights_uri=str(path))
    assert str(find_user_error(raised.value)) == str(raised.value)  # reported like a TrainerError


def test_user_errors_are_found_inside_ray_train_failures() -> None:
    from ray.train import WorkerGroupError

    inner = TrainerError("dataset.trainUri: /data: no such directory")
    wrapped = WorkerGroupError("rank 0 failed", {1: RuntimeError("collateral"), 0: inner})
    found = find_user_error(wrapped)
    assert found is not None and str(found) == "dataset.trainUri: /data: no such directory"
    assert find_user_error(WorkerGroupError("rank 0 failed", {0: RuntimeError("a bug")})) is None


def _raised(make: Callable[[], None]) -> BaseException:
    try:
        make()
    except BaseException as e:
        return e
    raise AssertionError("nothing raised")


def _bug_in_an_error_path() -> None:
    try:
        raise TrainerError("dataset.trainUri: x: no such folder")
    except TrainerError:
        {}["status"]


def _wrapped_on_purpose() -> None:
    try:
        raise TrainerError("dataset.trainUri: x: no such folder")
    except TrainerError as e:
        raise RuntimeError("the worker failed") from e


def _other_failure_from_none() -> None:
    try:
        raise TrainerError("dataset.trainUri: x: no such folder")
    except TrainerError:
        raise RuntimeError("an internal failure") from None


@pytest.mark.parametrize(
    ("make", "found"),
    [
        # a bug raised while a user error was handled is a bug: its traceback is what is needed
        (_bug_in_an_error_path, None),
        (_other_failure_from_none, None),
        # a user error wrapped on purpose (raise ... from it) is still the user's
        (_wrapped_on_purpose, "dataset.trainUri: x: no such folder"),
    ],
)
def test_only_explicit_causes_make_a_failure_the_users(make: Callable[[], None], found: str | None) -> None:
    error = find_user_error(_raised(make))
    assert (None if error is None else str(error)) == found


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (ValueError("bad value\n  advice that goes on\n  and on"), "ValueError: bad value"),
        (OSError("  padded  "), "OSError: padded"),
        (RuntimeError(), "RuntimeError"),
        (KeyError("model"), "KeyError: 'model'"),
    ],
)
def test_exception_line(error: BaseException, line: str) -> None:
    assert exception_line(error) == line


# ---------------------------------------------------------------------------------------- checkpoint
def test_checkpoint_of_another_spec_is_refused(tmp_path: Path) -> None:
    state = TrainState(epoch=3, stage="probe", best_val_accuracy=0.5, best_epoch=2)
    save_checkpoint(tmp_path, torch.nn.Linear(2, 2), state, "aaaa")

    assert read_checkpoint(tmp_path, "aaaa", "runs/x")["train_state"] == state
    different = r"runs/x holds checkpoints of a different spec \(fingerprint 'aaaa', this job 'bbbb'\)"
    with pytest.raises(TrainerError, match=different):
        read_checkpoint(tmp_path, "bbbb", "runs/x")


def test_best_metric_and_patience() -> None:
    state = TrainState()
    for epoch, acc in enumerate([0.5, 0.6, 0.6, 0.605, 0.4], start=1):
        state.observe(epoch, acc, min_delta=0.01)
    assert (state.best_val_accuracy, state.best_epoch) == (0.605, 4)
    assert state.bad_epochs == 3  # 0.6, 0.605 (< min_delta better), 0.4


# --------------------------------------------------------------------------------------- local mode
JOB = """
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: local}
spec:
  model: {name: resnet18, weightsUri: runs/src/model.pt}
  dataset: {format: digits}
  hyperparameters: {batchSize: 6}
  output: {uri: OUT}
"""


def test_local_job_applies_overrides_and_absolute_paths(tmp_path: Path) -> None:
    job = local_job(JOB.replace("OUT", "runs"), "job.yaml", workers=3, cwd=tmp_path)
    assert job.spec.resources.workers == 3
    assert job.spec.output.uri == str(tmp_path / "runs")
    assert job.spec.model.weights_uri == str(tmp_path / "runs/src/model.pt")


@pytest.mark.parametrize("written", ["~/runs", "file://~/runs"])
def test_local_job_expands_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: str) -> None:
    """'~' was joined to the working directory first, and the run went to a folder named '~' there."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    job = local_job(JOB.replace("OUT", written), "job.yaml", cwd=tmp_path / "work")
    assert job.spec.output.uri == str(tmp_path / "home" / "runs")
    assert job.spec.model.weights_uri == str(tmp_path / "work" / "runs/src/model.pt")  # relative: to the working folder


@pytest.mark.parametrize("written", ["~no-such-user-here/runs", "file://~no-such-user-here/runs"])
def test_a_home_folder_of_no_user_is_one_line(tmp_path: Path, written: str) -> None:
    """pathlib's expanduser raised RuntimeError('Could not determine home directory.'): a traceback."""
    with pytest.raises(
        TrainerError, match=rf"^spec\.output\.uri: '{written}': '~no-such-user-here' names no user of this machine"
    ):
        local_job(JOB.replace("OUT", written), "job.yaml", cwd=tmp_path)


def test_local_job_revalidates_the_overrides(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as raised:
        local_job(JOB.replace("OUT", "runs"), "job.yaml", workers=4, cwd=tmp_path)
    assert any("batchSize: 6 is not divisible by resources.workers (4)" in line for line in raised.value.lines)


def test_local_job_refuses_pvc(tmp_path: Path) -> None:
    with pytest.raises(TrainerError, match=r"spec\.output\.uri: 'pvc://claim/out': .*--output DIR"):
        local_job(JOB.replace("OUT", "pvc://claim/out"), "job.yaml", cwd=tmp_path)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_finetune_run_reports_a_missing_dataset_in_one_line(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: bad}\n"
        "spec: {model: {name: resnet18}, dataset: {trainUri: data/missing}, output: {uri: runs}}\n"
    )
    out = run_cli("run", str(job), cwd=tmp_path)

    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"error: dataset.trainUri: {tmp_path}/data/missing: no such directory"
    assert "Traceback" not in out.stdout + out.stderr


def test_finetune_run_rejects_an_invalid_manifest_with_exit_1(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("OUT", "runs").replace("resnet18", "resnet5"))
    out = run_cli("run", str(job), cwd=tmp_path)
    assert out.returncode == 1
    assert "spec.model.name" in out.stderr and "resnet5" in out.stderr


def test_trainer_entrypoint_rejects_a_bad_config(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "--config", '{"jobName": "x"}'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: --config: not a valid trainer config:")
    assert "Traceback" not in out.stderr


def test_object_store_prefix_is_downloaded_once_into_the_cache(tmp_path: Path) -> None:
    import fsspec

    from finetune_trainer.data import fetch_to_cache

    fs = fsspec.filesystem("memory")
    fs.pipe({"/bucket/train/cat/0.png": b"a", "/bucket/train/dog/0.png": b"b"})
    uri = "memory://bucket/train"

    first = fetch_to_cache(uri, str(tmp_path))
    assert sorted(p.relative_to(first).as_posix() for p in Path(first).rglob("*.png")) == ["cat/0.png", "dog/0.png"]
    assert fetch_to_cache(uri, str(tmp_path)) == first  # unchanged: the same copy
    # A changed dataset is not served stale: the deleted object is gone, the changed one has its new bytes.
    fs.rm("/bucket/train/dog/0.png")
    fs.pipe({"/bucket/train/cat/0.png": b"changed"})
    second = fetch_to_cache(uri, str(tmp_path))
    assert second != first
    assert sorted(p.relative_to(second).as_posix() for p in Path(second).rglob("*.png")) == ["cat/0.png"]
    assert (Path(second) / "cat" / "0.png").read_bytes() == b"changed"
    with pytest.raises(TrainerError, match="memory://bucket/nothing"):
        fetch_to_cache("memory://bucket/nothing", str(tmp_path))


def test_missing_exporter_fails_before_training(tmp_path: Path) -> None:
    """onnx is not installed here: the run must stop before Ray starts training, naming the field."""
    if importlib.util.find_spec("onnx") is not None:
        pytest.skip("onnx is installed: the export would succeed")
    from finetune_trainer import driver

    job = load_job((REPO / "manifests/examples/digits-source.yaml").read_text(), "digits-source.yaml")
    job.spec.output.exports = ["state_dict", "onnx"]
    cfg = TrainerConfig.from_job(job, output_root=str(tmp_path))
    with pytest.raises(TrainerError, match=r"^output.exports: .*onnx"):
        driver.run(cfg)
    assert not (tmp_path / "digits-source").exists()


def test_a_local_ray_that_does_not_start_is_one_line_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an overloaded machine Ray's raylet can miss its start-up deadline; `finetune run` printed the traceback."""
    import types

    from finetune_trainer.local import start_ray

    def init(**_: Any) -> None:
        raise Exception(
            "The current node timed out during startup. This could happen because some of the raylet failed to "
            "startup or the GCS has become overloaded."
        )

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False, init=init))
    job = load_job((REPO / "manifests/examples/digits-source.yaml").read_text(), "digits-source.yaml")
    with pytest.raises(TrainerError) as caught:
        start_ray(TrainerConfig.from_job(job, output_root=str(tmp_path)))
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("the local Ray did not start: ")
    assert "timed out during startup" in str(caught.value)
