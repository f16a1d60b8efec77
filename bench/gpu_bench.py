"""GPU benchmark: the trainer's loop next to a plain PyTorch loop on one CUDA card.

resnet50 at 224×224 on torchvision ``FakeData`` (augmentation ``none``), bf16 autocast, TF32, SGD with
momentum, batch 128, the same DataLoader (workers, pinned memory) on both sides. The target: trainer ÷
plain (channels_last) ≥ 0.95×. Printed, steady state
(epochs 2..E; epoch 1 holds cuDNN's algorithm search and the allocator's growth), images per second of
the training pass:

- **trainer**: the trainer's own per-worker code for one worker. ``--mode ray`` (the default when Ray
  is importable) runs the real thing: an embedded Ray (``local.start_ray``) and ``driver.run`` with
  ``gpusPerWorker: 1``, throughput read from the run's ``metrics.jsonl``. ``--mode inprocess`` (the
  default without Ray, e.g. on a lent GPU machine whose image has no Ray) runs, in this process, the
  pieces ``train_loop_per_worker`` runs for one worker: ``build_datasets``, ``build_model``,
  ``apply_strategy``, ``build_precision``, ``build_optimizer``, ``build_scheduler`` and
  ``engine.train_one_epoch``, around a DataLoader built as ``loaders.build_loaders`` builds it; what Ray adds
  (its DataLoader wrapper, the worker process, reports and checkpoints between epochs) is left out.
  The job leaves ``mixedPrecision`` at its default (``auto``: bf16 on this card) and the trainer picks
  channels_last for resnet50 on CUDA itself (``gpu.memory_format``), as a real job gets them.
- **plain, channels_last**: a hand-written loop, model and batches in ``torch.channels_last``, the
  loss summed on the GPU (no host sync per step), SGD's fused kernel as the trainer runs it. The headline ratio is trainer ÷ this.
- **plain, NCHW**: the same loop in the default memory format, to tell what channels_last is worth
  from what the trainer's loop costs (the trainer used NCHW before it chose channels_last itself).
- **plain, synthetic**: channels_last on one batch already on the GPU, no DataLoader: the card's
  ceiling, to show whether FakeData decoding (on the CPU) bounds the others.

Each side runs in its own process, trainer and plain loops interleaved ``--reps`` times. It needs CUDA:
without it it says so and exits 0, having measured nothing. About 3 minutes on an H100 with the defaults.
``--smoke`` runs every part on the CPU with a tiny workload (resnet18 at 32 px in fp32, 8 images, 2 epochs)
to check the script end to end; its numbers mean nothing (the slow tier runs it: tests/slow/test_gpu_bench.py).

Run from the repository root: ``python3 bench/gpu_bench.py`` (needs torch, torchvision and pydantic;
Ray only for ``--mode ray``). ``bench/README.md`` gives the command for a lent GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MARK = "BENCH "
PLAIN_VARIANTS = ("channels_last", "nchw", "synthetic")
SMOKE_ENV = "GPU_BENCH_SMOKE_CPU"
"""Set by ``--smoke``: every part runs on the CPU with a tiny workload, to check the script, not to measure."""
TARGET = 0.95
"""Trainer ÷ plain (bf16 + channels_last) the trainer's loop should reach (issue 14)."""


def _device() -> Any:
    import torch

    return torch.device("cpu" if os.environ.get(SMOKE_ENV) else "cuda")


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and not os.environ.get(SMOKE_ENV):
        torch.cuda.synchronize()


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if _device().type == "cuda" else 0.0


@dataclass(frozen=True)
class Workload:
    model: str = "resnet50"
    samples: int = 6144
    classes: int = 100
    image_size: int = 224
    batch_size: int = 128
    epochs: int = 3
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    loader_workers: int = 10
    seed: int = 0

    @property
    def val_samples(self) -> int:
        return max(self.classes, self.samples // 4)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _use_repo_sources() -> None:
    # Self-contained: the trainer and API packages straight from the checkout, no install needed.
    for sub in ("trainer", "operator"):
        path = str(REPO / sub)
        if path not in sys.path:
            sys.path.insert(0, path)


def job_document(w: Workload, out: str) -> dict[str, Any]:
    cpus = max(1, len(os.sched_getaffinity(0)))
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "gpu-bench"},
        "spec": {
            "model": {"name": w.model},
            "dataset": {
                "format": "fake",
                "imageSize": w.image_size,
                "augmentation": "none",
                "loaderWorkers": w.loader_workers,
                "fake": {"samples": w.samples, "classes": w.classes},
            },
            "strategy": {"method": "full"},
            "hyperparameters": {
                "epochs": w.epochs,
                "batchSize": w.batch_size,
                "optimizer": "sgd",
                "learningRate": w.lr,
                "momentum": w.momentum,
                "weightDecay": w.weight_decay,
                "scheduler": "cosine",
                "seed": w.seed,
            },
            "resources": {"workers": 1, "gpusPerWorker": 0 if os.environ.get(SMOKE_ENV) else 1, "cpusPerWorker": cpus},
            "output": {"uri": out},
        },
    }


def _config(w: Workload, out: str) -> Any:
    _use_repo_sources()
    from finetune_operator.api.contract import TrainerConfig
    from finetune_operator.api.v1alpha1 import FineTuneJob

    return TrainerConfig.from_job(FineTuneJob.parse(job_document(w, out)), sinks=["console"])


def emit(**fields: Any) -> None:
    print(MARK + json.dumps(fields), flush=True)


# ------------------------------------------------------------------------------------ the trainer
def trainer_ray(w: Workload) -> None:
    """``finetune run``'s path: embedded Ray, ``driver.run``, one GPU worker; rates from metrics.jsonl."""
    _use_repo_sources()
    import ray

    from finetune_trainer import driver
    from finetune_trainer.local import start_ray

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as out:
        cfg = _config(w, out)
        start_ray(cfg)
        try:
            result = driver.run(cfg, local=True)
        finally:
            ray.shutdown()
        emit(
            images_per_second=[e.images_per_second for e in result.epochs], epoch_seconds=[e.epoch_seconds for e in result.epochs]
        )


def trainer_inprocess(w: Workload) -> None:
    """The per-worker pieces of ``train_loop_per_worker`` for one worker, without Ray."""
    _use_repo_sources()
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler

    # The per-worker pieces import no Ray (engine, optim and stages are torch-only or pure).
    from finetune_trainer import engine, optim
    from finetune_trainer.data import build_datasets
    from finetune_trainer.gpu import enable_tf32
    from finetune_trainer.model import build_model
    from finetune_trainer.stages import plan_stages
    from finetune_trainer.strategy import apply_strategy

    # Nothing is written in-process (no checkpoints, no artifacts): the output root is never used.
    cfg = _config(w, tempfile.gettempdir())
    spec, hp = cfg.spec, cfg.spec.hyperparameters
    engine.seed_everything(hp.seed)
    train, _val, names, _ = build_datasets(cfg)
    device = _device()
    enable_tf32(device)
    # As train_loop_per_worker does: the precision (with the memory format) first, then the model in it.
    model = build_model(spec.model.name, spec.model.weights, len(names))
    precision = engine.build_precision(spec, device, model)
    model = model.to(device, memory_format=precision.memory_format)
    (stage,) = plan_stages(spec)
    groups = apply_strategy(model, stage.method, spec.strategy.unfreeze_blocks, spec.strategy.freeze_batch_norm)
    # As loaders.build_loaders builds it for world size 1 (its Ray wrapper only moves batches to the device,
    # which train_one_epoch does as well).
    sampler: DistributedSampler[Any] = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=hp.seed)
    workers = spec.dataset.loader_workers
    loader: DataLoader[Any] = DataLoader(
        train,
        batch_size=hp.batch_size,
        sampler=sampler,
        drop_last=len(sampler) % hp.batch_size == 1,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    optimizer = optim.build_optimizer(spec, stage, groups)
    scheduler = optim.build_scheduler(spec, stage, optimizer, len(loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    rates, seconds = [], []
    for epoch in range(1, hp.epochs + 1):
        sampler.set_epoch(epoch)
        _sync()
        started = time.perf_counter()
        _, seen = engine.train_one_epoch(
            model, loader, criterion, optimizer, scheduler, precision, hp.grad_clip_norm, spec.strategy.freeze_batch_norm
        )
        _sync()
        elapsed = time.perf_counter() - started
        rates.append(seen / elapsed)
        seconds.append(elapsed)
    emit(
        images_per_second=rates,
        epoch_seconds=seconds,
        memory_gib=_peak_gib(),
        dtype=str(precision.dtype or "fp32"),
        memory_format=str(precision.memory_format),
    )


# -------------------------------------------------------------------------------------- plain loop
def plain(w: Workload, variant: str) -> None:
    """A hand-written bf16 loop; ``variant`` is one of PLAIN_VARIANTS."""
    import torch
    import torchvision
    from torch import nn
    from torchvision import datasets
    from torchvision.transforms import v2 as T

    torch.manual_seed(w.seed)
    device = _device()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as the trainer sets it (gpu.enable_tf32)
    fmt = torch.contiguous_format if variant == "nchw" else torch.channels_last
    model = torchvision.models.get_model(w.model, num_classes=w.classes).to(device, memory_format=fmt)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(
        [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": w.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=w.lr,
        momentum=w.momentum,
        nesterov=True,
        fused=True,  # the trainer's kernel (optim._fusable): the ratio is the loop's cost, not the optimizer's
    )
    criterion = nn.CrossEntropyLoss()
    steps = w.samples // w.batch_size
    if variant == "synthetic":
        fixed = (
            torch.randn(w.batch_size, 3, w.image_size, w.image_size, device=device).contiguous(memory_format=fmt),
            torch.randint(0, w.classes, (w.batch_size,), device=device),
        )
        batches: Any = lambda: (fixed for _ in range(steps))  # noqa: E731
    else:
        # The trainer's evaluation preset without weights (data.eval_transform), on the same FakeData.
        tf = T.Compose(
            [
                T.ToImage(),
                T.Resize(w.image_size, antialias=True),
                T.CenterCrop(w.image_size),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
        ds = datasets.FakeData(w.samples, (3, w.image_size, w.image_size), w.classes, tf, random_offset=w.seed)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=w.batch_size,
            shuffle=True,
            num_workers=w.loader_workers,
            persistent_workers=w.loader_workers > 0,
            pin_memory=device.type == "cuda",
        )
        batches = lambda: iter(loader)  # noqa: E731
    rates, seconds = [], []
    for _ in range(w.epochs):
        model.train()
        _sync()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for images, targets in batches():
            images = images.to(device, non_blocking=True, memory_format=fmt)
            targets = targets.to(device, non_blocking=True)
            # bf16 on the card; the CPU smoke test stays fp32 (CPU bf16 autocast is slow on most hosts, as the trainer knows).
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(targets)  # stays on the GPU: no sync per step
            seen += len(targets)
        _sync()
        elapsed = time.perf_counter() - started
        rates.append(seen / elapsed)
        seconds.append(elapsed)
    emit(images_per_second=rates, epoch_seconds=seconds, memory_gib=_peak_gib())


# -------------------------------------------------------------------------------------------- main
def run_part(part: str, w: Workload, variant: str | None = None) -> dict[str, Any]:
    """One part in its own process; in the smoke test in this one (the same ``--part`` command line), since
    five torch imports would cost more than the tiny workload itself."""
    args = ["--part", part, "--workload", json.dumps(asdict(w)), *(["--variant", variant] if variant else [])]
    started = time.perf_counter()
    if os.environ.get(SMOKE_ENV):
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            returncode = main(args)
        stdout, stderr = captured.getvalue(), ""
    else:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True, check=False)
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    lines = [line for line in stdout.splitlines() if line.startswith(MARK)]
    if returncode != 0 or not lines:
        raise RuntimeError(f"{part} {variant or ''} exited {returncode}:\n{(stdout + stderr)[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(MARK) :])
    result["wall_seconds"] = time.perf_counter() - started
    return result


def steady(result: dict[str, Any]) -> float:
    """Images/s over epochs 2..E (harmonic mean: every epoch has the same images)."""
    rates = [float(r) for r in result["images_per_second"][1:]]
    return len(rates) / sum(1.0 / r for r in rates)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--mode", choices=("auto", "ray", "inprocess"), default="auto", help="how the trainer side runs (see above)"
    )
    parser.add_argument("--reps", type=int, default=2, help="repetitions (default 2)")
    parser.add_argument("--samples", type=int, default=Workload.samples, help="FakeData images per epoch")
    parser.add_argument("--epochs", type=int, default=Workload.epochs, help="epochs per run, the first is warm-up")
    parser.add_argument("--batch-size", type=int, default=Workload.batch_size)
    parser.add_argument(
        "--loader-workers", type=int, default=min(Workload.loader_workers, max(1, len(os.sched_getaffinity(0)) - 2))
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--smoke",
        "--smoke-cpu",
        dest="smoke",
        action="store_true",
        help="check the script on the CPU with a tiny workload (no numbers)",
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.part:
        w = Workload(**json.loads(args.workload))
        {
            "trainer-ray": lambda: trainer_ray(w),
            "trainer-inprocess": lambda: trainer_inprocess(w),
            "plain": lambda: plain(w, args.variant),
        }[args.part]()
        return 0

    try:
        import torch
    except ImportError:
        print("gpu_bench: torch is not installed; nothing measured.")
        return 0
    if args.smoke:
        os.environ[SMOKE_ENV] = "1"  # inherited by the parts
        args.samples, args.epochs, args.batch_size, args.loader_workers, args.reps = 8, 2, 4, 0, 1
    elif not torch.cuda.is_available():
        print(f"gpu_bench: no CUDA device here (torch {torch.__version__}); this benchmark needs one. Nothing measured.")
        return 0
    if not _importable("pydantic"):
        print(
            "gpu_bench: pydantic is missing (the trainer's config needs it); carry its wheels, see bench/README.md.",
            file=sys.stderr,
        )
        return 2
    mode = args.mode if args.mode != "auto" else ("ray" if _importable("ray") else "inprocess")
    if mode == "ray" and not _importable("ray"):
        print("gpu_bench: --mode ray needs Ray installed.", file=sys.stderr)
        return 2
    w = Workload(samples=args.samples, epochs=args.epochs, batch_size=args.batch_size, loader_workers=args.loader_workers)
    if args.smoke:
        w = Workload(model="resnet18", samples=8, classes=4, image_size=32, batch_size=4, epochs=2, loader_workers=0)
    if w.epochs < 2:
        parser.error("--epochs needs at least 2 (the first is warm-up)")
    import torchvision

    device = "CPU (smoke test, not a measurement)" if args.smoke else torch.cuda.get_device_name(0)
    print(
        f"# gpu_bench on {device}: torch {torch.__version__}, torchvision {torchvision.__version__}, trainer mode {mode}; "
        f"{w.model} {w.image_size}px bf16, batch {w.batch_size}, SGD, FakeData {w.samples} images, "
        f"{w.loader_workers} loader workers, {w.epochs} epochs (first excluded), {args.reps} reps",
        flush=True,
    )
    started = time.time()
    runs: dict[str, list[dict[str, Any]]] = {"trainer": [], **{v: [] for v in PLAIN_VARIANTS}}
    for rep in range(args.reps):
        order: list[tuple[str, str, str | None]] = [
            ("trainer", f"trainer-{mode}", None),
            *(("plain", "plain", v) for v in PLAIN_VARIANTS),
        ]
        if rep % 2:
            order.reverse()  # alternate who runs first (thermal state, page cache)
        for _, part, variant in order:
            r = run_part(part, w, variant)
            runs[variant or "trainer"].append(r)
            print(f"  rep {rep + 1}: {variant or 'trainer'}: {steady(r):.0f} img/s ({r['wall_seconds']:.0f} s)", flush=True)

    med = {k: statistics.median(steady(r) for r in v) for k, v in runs.items()}
    rows = [
        ("trainer loop (its defaults: bf16 auto, channels_last)", med["trainer"], None),
        ("plain, channels_last", med["channels_last"], med["trainer"] / med["channels_last"]),
        ("plain, NCHW", med["nchw"], med["trainer"] / med["nchw"]),
        ("plain, channels_last, synthetic batch (card ceiling)", med["synthetic"], med["trainer"] / med["synthetic"]),
    ]
    print()
    print("| side | images/s (median) | trainer ÷ this |")
    print("|---|---|---|")
    for name, rate, ratio in rows:
        print(f"| {name} | {rate:.0f} | {'-' if ratio is None else f'{ratio:.2f}×'} |")
    print()
    headline = med["trainer"] / med["channels_last"]
    trainer_side = runs["trainer"][-1]
    if "dtype" in trainer_side:
        print(f"trainer side trained in {trainer_side['dtype']}, batches {trainer_side['memory_format']}")
    verdict = "met" if headline >= TARGET else "NOT met"
    print(
        f"trainer ÷ plain (bf16 + channels_last): {headline:.2f}× on {device} (target ≥ {TARGET}×: {verdict}); "
        f"took {time.time() - started:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"device": device, "mode": mode, "workload": asdict(w), "runs": runs, "median": med, "ratio": headline}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
