"""The GPU path on the CPU (no Ray, no CUDA): no host sync per step, channels_last for conv nets only,
``mixedPrecision: auto``, TF32 only on CUDA, the opt-in torch.compile's unwrapped weights, and one Ray
Train worker per GPU. CUDA is simulated by monkeypatching ``torch.cuda``; nothing here launches a kernel
on a GPU (the real thing: ``bench/gpu_bench.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.vision_transformer import VisionTransformer

from finetune_operator.api.v1alpha1 import FineTuneJobSpec, ResourcesSpec
from finetune_operator.api.validate import validate_document
from finetune_trainer import driver
from finetune_trainer.artifacts import unwrap_model
from finetune_trainer.engine import Precision, build_precision, train_one_epoch
from finetune_trainer.gpu import amp_dtype, compile_model, enable_tf32, memory_format, to_device
from finetune_trainer.step_progress import StepMeter

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# Every way a tensor's value reaches the host: each one waits for the GPU's queued kernels.
SYNCS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")


@contextlib.contextmanager
def counting_syncs() -> Iterator[list[str]]:
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counted(name: str, method: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return method(self, *args, **kwargs)

        return wrapper

    for name, method in saved.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


class Recording(nn.Module):
    """A tiny conv net that remembers the memory format of the batches it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.channels_last: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.channels_last.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        out: torch.Tensor = self.net(x)
        return out


def spec(**hyperparameters: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "fake"},
            "output": {"uri": "/tmp/out"},
            "hyperparameters": hyperparameters,
        }
    )


def epoch(steps: int, fmt: torch.memory_format = torch.preserve_format, on_step: Any = None) -> tuple[Recording, float, int]:
    torch.manual_seed(0)
    model = Recording()
    data = TensorDataset(torch.randn(2 * steps, 3, 8, 8), torch.randint(0, 3, (2 * steps,)))
    # SGD: its CPU step reads nothing back (AdamW's CPU step counter calls .item(), a CPU-only read).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    precision = Precision(CPU, None, torch.amp.GradScaler("cpu", enabled=False))
    precision.memory_format = fmt
    loss_sum, seen = train_one_epoch(
        model, DataLoader(data, batch_size=2), nn.CrossEntropyLoss(), optimizer, scheduler, precision, 1.0, False, on_step
    )
    return model, loss_sum, seen


# ------------------------------------------------------------------------------------ host syncs
def test_train_one_epoch_syncs_once_per_epoch_not_per_step() -> None:
    counts = {}
    for steps in (3, 12):
        with counting_syncs() as calls:
            _, loss_sum, seen = epoch(steps)
        counts[steps] = len(calls)
        assert seen == 2 * steps and loss_sum > 0  # the loss still adds up, read once at the end
    assert counts[12] == counts[3] <= 2, counts


def test_step_meter_reads_the_loss_at_log_intervals_only() -> None:
    """The engine and step_progress's hook together: 12 steps, a point every 4 → 3 reads plus the epoch's one."""
    model_for_lr = nn.Linear(1, 1)
    meter = StepMeter(
        sinks=None,
        tracker=None,
        optimizer=torch.optim.SGD(model_for_lr.parameters(), lr=0.1),
        epoch=1,
        total_epochs=1,
        stage="training",
        steps_per_epoch=12,
        world=1,
        global_step=0,
        log_every=4,
        report_seconds=1e9,
    )
    with counting_syncs() as calls:
        epoch(12, on_step=meter)
    with counting_syncs() as bare:
        epoch(12)
    assert len(calls) - len(bare) == 3
    assert meter.loss is not None and meter.step == 12


# ------------------------------------------------------------------------------------ channels_last
@pytest.mark.parametrize(
    ("model", "device", "expected"),
    [
        (torchvision.models.resnet18(num_classes=3), CUDA, torch.channels_last),
        (torchvision.models.mobilenet_v3_small(num_classes=3), CUDA, torch.channels_last),
        (torchvision.models.resnet18(num_classes=3), CPU, torch.preserve_format),  # CPU: left as it is
        # ViT: a single conv (patch embedding) before matmuls: NCHW
        (
            VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8),
            CUDA,
            torch.preserve_format,
        ),
        (torchvision.models.swin_t(num_classes=3), CUDA, torch.preserve_format),
        (nn.Linear(512, 3), CUDA, torch.preserve_format),  # a head on cached features
    ],
    ids=["resnet18", "mobilenet_v3", "resnet18-cpu", "vit", "swin", "head-only"],
)
def test_channels_last_rule(model: nn.Module, device: torch.device, expected: torch.memory_format) -> None:
    assert memory_format(model, device) == expected
    assert build_precision(spec(), device, model).memory_format == expected


def test_batches_reach_the_model_in_the_precisions_memory_format() -> None:
    model, _, _ = epoch(3, torch.channels_last)
    assert model.channels_last == [True] * 3
    model, _, _ = epoch(3)
    assert model.channels_last == [False] * 3


def test_to_device_formats_image_batches_only() -> None:
    images, features, labels = torch.randn(2, 3, 4, 4), torch.randn(2, 5), torch.tensor([0, 1])
    assert to_device(images, CPU, torch.channels_last).is_contiguous(memory_format=torch.channels_last)
    assert to_device(features, CPU, torch.channels_last).shape == (2, 5)  # a 2-D tensor has no channels_last
    assert torch.equal(to_device(labels, CPU, torch.channels_last), labels)


# ------------------------------------------------------------------------------------ precision, TF32
@pytest.mark.parametrize(
    ("mode", "device", "cuda", "bf16", "expected"),
    [
        ("auto", CPU, False, False, None),
        ("auto", CPU, True, True, None),  # a CPU worker on a GPU machine still trains in fp32
        ("auto", CUDA, True, True, torch.bfloat16),
        ("auto", CUDA, True, False, None),  # pre-Ampere: fp32, never an fp16 the job did not ask for
        ("bf16", CUDA, True, True, torch.bfloat16),
        ("fp16", CUDA, True, True, torch.float16),
        ("no", CUDA, True, True, None),
        ("bf16", CPU, False, False, None),
    ],
)
def test_mixed_precision(
    monkeypatch: pytest.MonkeyPatch, mode: str, device: torch.device, cuda: bool, bf16: bool, expected: torch.dtype | None
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_a, **_k: bf16)
    assert amp_dtype(mode, device) == expected


def test_auto_is_the_default() -> None:
    assert spec().hyperparameters.mixed_precision == "auto"
    assert build_precision(spec(), CPU).dtype is None


@pytest.fixture
def restore_tf32() -> Iterator[None]:
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def test_tf32_only_on_cuda(restore_tf32: None) -> None:
    torch.set_float32_matmul_precision("highest")
    assert not enable_tf32(CPU)
    assert torch.get_float32_matmul_precision() == "highest"
    assert enable_tf32(CUDA)
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32


# ------------------------------------------------------------------------------------ torch.compile
def test_compile_is_opt_in_and_saved_weights_keep_their_names() -> None:
    assert spec().hyperparameters.compile is False
    model = torchvision.models.resnet18(num_classes=3)
    assert compile_model(model, False) is model
    compiled = compile_model(model, True)  # lazy: nothing compiles until the first forward
    assert compiled is not model and all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert unwrap_model(compiled) is model
    assert list(unwrap_model(compiled).state_dict()) == list(model.state_dict())


# ------------------------------------------------------------------------------------ one worker per GPU
@pytest.mark.parametrize(
    ("resources", "workers", "per_worker"),
    [
        ({"workers": 3, "cpusPerWorker": 2}, 3, {"CPU": 2.0}),
        ({"workers": 1, "gpusPerWorker": 1, "cpusPerWorker": 8}, 1, {"CPU": 8.0, "GPU": 1.0}),
        ({"workers": 2, "gpusPerWorker": 4, "cpusPerWorker": 8}, 8, {"CPU": 2.0, "GPU": 1.0}),
        ({"workers": 1, "gpusPerWorker": 8, "cpusPerWorker": 4}, 8, {"CPU": 0.5, "GPU": 1.0}),
        # Shares rounded down to Ray's 0.0001 so that every worker fits its pod.
        ({"workers": 1, "gpusPerWorker": 3, "cpusPerWorker": 8}, 3, {"CPU": 2.6666, "GPU": 1.0}),
        ({"workers": 1, "gpusPerWorker": 3, "cpusPerWorker": 2}, 3, {"CPU": 0.6666, "GPU": 1.0}),
    ],
)
def test_one_ray_train_worker_per_gpu(resources: dict[str, Any], workers: int, per_worker: dict[str, float]) -> None:
    res = ResourcesSpec.model_validate(resources)
    config = driver.scaling_config(res)
    assert (config.num_workers, config.resources_per_worker, config.use_gpu) == (workers, per_worker, "GPU" in per_worker)
    assert res.train_workers == workers


def test_batch_must_split_over_every_gpu() -> None:
    document = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job"},
        "spec": {
            "model": {"name": "resnet18"},
            "dataset": {"format": "fake"},
            "output": {"uri": "/tmp/out"},
            "hyperparameters": {"batchSize": 12},
            "resources": {"workers": 2, "gpusPerWorker": 4},
        },
    }
    assert validate_document(document).errors == [
        "spec.hyperparameters.batchSize: 12 is not divisible by resources.workers × gpusPerWorker (8); "
        "use a multiple of 8, e.g. 8"
    ]


@pytest.mark.parametrize(
    ("resources", "local_workers", "threads"),
    [
        ({"workers": 1, "gpusPerWorker": 4, "cpusPerWorker": 8}, 4, 2),  # 8 CPUs for 4 GPU workers: 2 threads each
        ({"workers": 1, "gpusPerWorker": 1, "cpusPerWorker": 8}, 1, 8),
        ({"workers": 2, "cpusPerWorker": 8}, 2, 8),  # CPU workers: each its own reservation
        ({"workers": 1, "gpusPerWorker": 8, "cpusPerWorker": 4}, 8, 1),  # never below one thread
    ],
)
def test_threads_per_gpu_worker(
    monkeypatch: pytest.MonkeyPatch, resources: dict[str, Any], local_workers: int, threads: int
) -> None:
    """A GPU worker's threads are its share of the pod's CPUs, not the whole pod's (64-core node, 8-CPU pod)."""
    from finetune_trainer import loop

    class Context:
        def get_local_world_size(self) -> int:
            return local_workers

    # _set_threads reads only cfg.spec.resources.
    cfg: Any = SimpleNamespace(spec=spec().model_copy(update={"resources": ResourcesSpec.model_validate(resources)}))
    monkeypatch.setattr(loop.ray.train, "get_context", Context)
    monkeypatch.setattr(loop.os, "sched_getaffinity", lambda _pid: set(range(64)))
    before = torch.get_num_threads()
    try:
        loop._set_threads(cfg)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
