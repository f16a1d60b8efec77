"""Datasets and transforms of a run: ``build_datasets(cfg) -> (train, val, class_names, input_spec)``.

Three formats, as ``spec.dataset.format`` names them: ``imagefolder`` (a local folder, or an s3:// /
gs:// prefix downloaded once per node and object version into the cache dir: ``download_cache``),
``digits`` (scikit-learn's bundled 8×8 handwritten digits, upsampled: real data that needs no network)
and ``fake`` (torchvision FakeData).
Training transforms come from the ``augmentation`` preset, evaluation transforms from the named
weights' preset (resize, crop, mean, std, interpolation from the catalogue) as torchvision's
``weights.transforms()`` would build them. Bad input fails with a ``TrainerError`` naming the path or
field. Class folders, dot files and unreadable images of ``imagefolder`` are ``image_folder``'s.

Called by every Ray Train worker (``loop``) and, for the cheap layout checks, by ``finetune run`` before
it starts Ray. The linear-probe feature cache is ``feature_cache``'s.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import datasets, tv_tensors
from torchvision.transforms import v2 as T

from finetune_operator.api import catalog
from finetune_operator.api.contract import TrainerConfig, resolve_uri
from finetune_operator.api.fields import uri_scheme
from finetune_operator.api.v1alpha1 import DatasetSpec, FakeDataSpec
from finetune_trainer.digits import load_digits
from finetune_trainer.download_cache import fetch_to_cache
from finetune_trainer.errors import TrainerError
from finetune_trainer.image_folder import ImageFiles, StreamedImages, class_folders, same_classes, scan_images
from finetune_trainer.inputs import InputSpec
from finetune_trainer.listing import Ingest, Lister, choose_ingest, list_image_folder
from finetune_trainer.listing_record import Agree, agree_with_rank_zero, check_listing
from finetune_trainer.split import stratified_split

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DigitsDataset",
    "build_datasets",
    "build_input_spec",
    "check_dataset",
    "eval_transform",
    "fetch_to_cache",
    "train_transform",
]

# torchvision's ImageNet statistics: the normalisation of every catalogue weight, and the default
# when no weights are named, so that a model trained here from scratch chains into a later job.
IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)
DEFAULT_VALIDATION_SPLIT: Final = 0.2
_OBJECT_STORES: Final = ("s3", "gs", "gcs", "az", "abfs", "abfss")

LabelledDataset = Dataset[tuple[Tensor, int]]


# ------------------------------------------------------------------------------------------ transforms
def build_input_spec(cfg: TrainerConfig) -> InputSpec:
    """What the model sees: the named weights' preset scaled to ``imageSize``, else a plain resize with
    ImageNet statistics. Recorded in the model card so that ``finetune predict`` prepares images alike."""
    spec = cfg.spec
    size = spec.dataset.image_size
    grey = spec.dataset.format == "digits"
    info = catalog.load_catalog().get(spec.model.name)
    weights = info.resolve_weights(spec.model.weights) if info is not None and spec.model.weights else None
    preset = weights.resize_for(size) if weights is not None else None
    if weights is not None and preset is not None:
        resize, mean, std, mode = preset, tuple(weights.mean), tuple(weights.std), weights.interpolation
    else:
        resize, mean, std, mode = size, IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    return InputSpec(image_size=size, resize_size=resize, mean=mean, std=std, interpolation=mode, grayscale_to_rgb=grey)


def _mode(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name.lower())
    except ValueError:
        return T.InterpolationMode.BILINEAR


def _finish(spec: InputSpec) -> list[Any]:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(list(spec.mean), list(spec.std))]


def _start(spec: InputSpec) -> list[Any]:
    # Grey digits become three identical channels: every torchvision model expects RGB.
    return [T.ToImage(), *([T.Grayscale(num_output_channels=3)] if spec.grayscale_to_rgb else [])]


def _resize(spec: InputSpec) -> list[Any]:
    mode = _mode(spec.interpolation)
    return [T.Resize(spec.resize_size, interpolation=mode, antialias=True), T.CenterCrop(spec.image_size)]


def eval_transform(spec: InputSpec, *, resized: bool = False) -> T.Compose:
    """Resize, centre-crop, normalise: torchvision's ``ImageClassification`` preset. ``resized``: the
    images were resized and cropped ahead (digits, all at once), only the per-image rest remains."""
    return T.Compose([*_start(spec), *([] if resized else _resize(spec)), *_finish(spec)])


def train_transform(spec: InputSpec, augmentation: str, *, resized: bool = False) -> T.Compose:
    """The training preset: ``none`` is the evaluation transform (so frozen features can be cached),
    ``light`` a small affine jitter, ``standard`` random-resized crop + flip, ``trivialaugment`` adds
    TrivialAugmentWide (torchvision's classification reference recipe)."""
    if augmentation == "none":
        return eval_transform(spec, resized=resized)
    mode = _mode(spec.interpolation)
    if augmentation == "light":
        middle: list[Any] = [
            *([] if resized else _resize(spec)),
            T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), interpolation=mode),
        ]
    else:
        middle = [T.RandomResizedCrop(spec.image_size, interpolation=mode, antialias=True), T.RandomHorizontalFlip()]
        if augmentation == "trivialaugment":
            middle.append(T.TrivialAugmentWide(interpolation=mode))
    return T.Compose([*_start(spec), *middle, *_finish(spec)])


# ---------------------------------------------------------------------------------------------- splits
def _split(labels: Sequence[int], fraction: float, seed: int, what: str) -> tuple[list[int], list[int]]:
    """Stratified (train, validation) indices: every class keeps its share in both (scikit-learn's split, see ``split``)."""
    try:
        return stratified_split(labels, fraction, seed)
    except ValueError as e:
        raise TrainerError(
            f"dataset.validationSplit: cannot hold out {fraction:g} of {what} per class ({e}); add images or give validationUri"
        ) from None


def _cap_per_class(indices: Sequence[int], labels: Sequence[int], cap: int | None, seed: int) -> list[int]:
    """At most ``cap`` training indices per class, a seeded random choice (few-shot transfer)."""
    if cap is None:
        return list(indices)
    order = np.random.default_rng(seed).permutation(len(indices))
    kept: dict[int, int] = {}
    chosen: list[int] = []
    for i in order:
        index = indices[int(i)]
        label = labels[index]
        if kept.get(label, 0) < cap:
            kept[label] = kept.get(label, 0) + 1
            chosen.append(index)
    return sorted(chosen)


def _check_num_classes(ds: DatasetSpec, num_classes: int | None, names: Sequence[str], where: str) -> None:
    if num_classes is not None and num_classes != len(names):
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        raise TrainerError(
            f"model.numClasses: {num_classes} does not match the {len(names)} classes found in {where} ({shown}); "
            f"remove it or set {len(names)}"
        )


# ---------------------------------------------------------------------------------------------- digits
class DigitsDataset(Dataset[tuple[Tensor, int]]):
    """scikit-learn's digits as uint8 1×S×S images (0–16 scaled to 0–255, upsampled once to the input
    size), labels renumbered; ``transform`` does the per-image rest (augmentation, RGB, normalisation)."""

    def __init__(self, images: Tensor, labels: list[int], transform: Callable[[Any], Tensor]) -> None:
        self.images = images
        self.targets = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(tv_tensors.Image(self.images[index])), self.targets[index]


def _digits(cfg: TrainerConfig, spec: InputSpec) -> tuple[LabelledDataset, LabelledDataset, list[str]]:
    ds = cfg.spec.dataset
    pixels, targets = load_digits()
    chosen = list(ds.classes) if ds.classes else list(range(10))
    renumber = {digit: i for i, digit in enumerate(chosen)}
    keep = [i for i, t in enumerate(targets) if int(t) in renumber]
    labels = [renumber[int(targets[i])] for i in keep]
    images = torch.from_numpy((pixels[keep] * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    # Upsample all images in one batched call: per-image resizing cost more than training a small model.
    images = T.Compose(_resize(spec))(images)
    seed = cfg.spec.hyperparameters.seed
    train_idx, val_idx = _split(labels, ds.validation_split or DEFAULT_VALIDATION_SPLIT, seed, "the digits")
    train_idx = _cap_per_class(train_idx, labels, ds.max_per_class, seed)
    names = [str(d) for d in chosen]

    def part(idx: list[int], transform: Callable[[Any], Tensor]) -> DigitsDataset:
        return DigitsDataset(images[idx], [labels[i] for i in idx], transform)

    train = part(train_idx, train_transform(spec, ds.augmentation, resized=True))
    return train, part(val_idx, eval_transform(spec, resized=True)), names


# ------------------------------------------------------------------------------------------------ fake
def _fake(cfg: TrainerConfig, spec: InputSpec) -> tuple[LabelledDataset, LabelledDataset, list[str]]:
    ds = cfg.spec.dataset
    fake = ds.fake or FakeDataSpec()
    size = (3, spec.image_size, spec.image_size)
    seed = cfg.spec.hyperparameters.seed
    # Distinct offsets keep validation images different from training ones.
    train = datasets.FakeData(fake.samples, size, fake.classes, train_transform(spec, ds.augmentation), random_offset=seed)
    val_n = max(fake.classes, fake.samples // 4)
    val = datasets.FakeData(val_n, size, fake.classes, eval_transform(spec), random_offset=seed + fake.samples)
    names = [f"class_{i}" for i in range(fake.classes)]
    return train, val, names


# ----------------------------------------------------------------------------------------- imagefolder
def _local_root(field: str, uri: str, cache_dir: str | None) -> str:
    return fetch_to_cache(uri, cache_dir, field) if uri_scheme(uri) in _OBJECT_STORES else resolve_uri(uri)


def _choose(cfg: TrainerConfig, labels: list[int]) -> tuple[list[int], list[int] | None]:
    """(training indices, held-out validation indices or None with a validationUri): one rule for both ingest paths,
    so that they pick the same images for the same seed."""
    ds, seed = cfg.spec.dataset, cfg.spec.hyperparameters.seed
    if ds.validation_uri is not None:
        return _cap_per_class(range(len(labels)), labels, ds.max_per_class, seed), None
    assert ds.train_uri is not None
    train_idx, val_idx = _split(labels, ds.validation_split or DEFAULT_VALIDATION_SPLIT, seed, ds.train_uri)
    return _cap_per_class(train_idx, labels, ds.max_per_class, seed), val_idx


def _streamed_folders(
    cfg: TrainerConfig, spec: InputSpec, lister: Lister, resuming: bool
) -> tuple[LabelledDataset, LabelledDataset, list[str]]:
    """The streaming path: the listed images (nothing downloaded, nothing opened), split as the map-style path does."""
    ds = cfg.spec.dataset
    assert ds.train_uri is not None
    classes, samples = lister("trainUri", ds.train_uri)
    _check_num_classes(ds, cfg.spec.model.num_classes, classes, "dataset.trainUri")
    # Before the split: an attempt must split what the one whose checkpoint it resumes did.
    check_listing(cfg, samples, ds.train_uri, resuming=resuming)
    train_idx, val_idx = _choose(cfg, [label for _, label in samples])
    if ds.validation_uri is not None:
        val_classes, val_samples = lister("validationUri", ds.validation_uri)
        same_classes(classes, val_classes)
    else:
        assert val_idx is not None
        val_samples = [samples[i] for i in val_idx]
    train = StreamedImages([samples[i] for i in train_idx], train_transform(spec, ds.augmentation))
    return train, StreamedImages(val_samples, eval_transform(spec)), classes


def _image_folders(
    cfg: TrainerConfig, spec: InputSpec, agree: Agree | None, resuming: bool
) -> tuple[LabelledDataset, LabelledDataset, list[str]]:
    ds = cfg.spec.dataset
    assert ds.train_uri is not None  # the API requires trainUri for imagefolder
    root = _local_root("trainUri", ds.train_uri, ds.cache_dir)
    classes = class_folders("trainUri", ds.train_uri, root)
    _check_num_classes(ds, cfg.spec.model.num_classes, classes, "dataset.trainUri")
    # Labels index the classes listed above, not a listing of ImageFolder's own (see image_folder).
    # An image too large once resized to the job's resize size is skipped as an unreadable one (image_bounds).
    scanned = scan_images("trainUri", ds.train_uri, root, classes, spec.resize_size)
    full = ImageFiles(scanned, train_transform(spec, ds.augmentation))
    # Before the split: an attempt must split what the first one did, and each worker what rank 0 does.
    check_listing(cfg, full.samples, root, agree, resuming=resuming)
    labels = list(full.targets)
    train_idx, val_idx = _choose(cfg, labels)
    if val_idx is None:
        assert ds.validation_uri is not None
        val_root = _local_root("validationUri", ds.validation_uri, ds.cache_dir)
        same_classes(classes, class_folders("validationUri", ds.validation_uri, val_root))
        val_samples = scan_images("validationUri", ds.validation_uri, val_root, classes, spec.resize_size)
        # Each worker evaluates every world-th image of its own scan: the scans must be rank 0's, or images are
        # evaluated twice and others never.
        agree_with_rank_zero("validationUri", val_samples, val_root, agree)
        val: LabelledDataset = ImageFiles(val_samples, eval_transform(spec))
    else:
        # One folder scan serves both: the validation view differs only in its transform.
        evaluated = copy.copy(full)
        evaluated.transform = eval_transform(spec)
        val = Subset(evaluated, val_idx)
    return Subset(full, train_idx), val, classes


def check_dataset(cfg: TrainerConfig) -> None:
    """The cheap layout checks (paths exist, class folders hold images, classes agree), for ``finetune
    run`` to fail in a second instead of after Ray has started. Object stores are left to the workers."""
    ds = cfg.spec.dataset
    if ds.format != "imagefolder" or ds.train_uri is None or uri_scheme(ds.train_uri) in _OBJECT_STORES:
        return
    classes = class_folders("trainUri", ds.train_uri, resolve_uri(ds.train_uri))
    _check_num_classes(ds, cfg.spec.model.num_classes, classes, "dataset.trainUri")
    if ds.validation_uri is not None and uri_scheme(ds.validation_uri) not in _OBJECT_STORES:
        same_classes(classes, class_folders("validationUri", ds.validation_uri, resolve_uri(ds.validation_uri)))


# --------------------------------------------------------------------------------------------- the API
def build_datasets(
    cfg: TrainerConfig,
    ingest: Ingest | None = None,
    lister: Lister = list_image_folder,
    agree: Agree | None = None,
    *,
    resuming: bool = True,
) -> tuple[LabelledDataset, LabelledDataset, list[str], InputSpec]:
    """``(train, validation, class_names, input_spec)`` for the job; labels index ``class_names``. On the streaming
    path (``ingest``, else ``listing.choose_ingest``) both are ``StreamedImages``, which the loop streams, of the
    listings ``lister`` gives (the workers of a run: rank 0's, ``rank_zero``). On the map-style path each worker
    scans the folders and ``agree`` gives rank 0's listing digest to compare with (``listing_record``). ``resuming``:
    whether the attempt restores a checkpoint, which must have been trained on this split (``check_listing``)."""
    spec = build_input_spec(cfg)
    fmt = cfg.spec.dataset.format
    if fmt == "digits":
        train, val, names = _digits(cfg, spec)
    elif fmt == "fake":
        train, val, names = _fake(cfg, spec)
    elif (ingest or choose_ingest(cfg.spec.dataset)).kind == "streaming":
        train, val, names = _streamed_folders(cfg, spec, lister, resuming)
    else:
        train, val, names = _image_folders(cfg, spec, agree, resuming)
    if len(train) < 2:  # type: ignore[arg-type]
        raise TrainerError(f"dataset: only {len(train)} training image(s) after the split and maxPerClass; need at least 2")  # type: ignore[arg-type]
    return train, val, names, spec
