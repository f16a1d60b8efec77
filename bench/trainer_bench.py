"""Trainer benchmark: the trainer next to plain PyTorch on the same model, data, threads and machine.

This script owns the numbers of the "Trainer" section of ``bench/README.md``. It is not a test and asserts
nothing about speed: it measures, repeats, and prints ratios against the targets of issues 3 and 14 (item 4).

What runs (resnet18 at 32×32 on torchvision ``FakeData``, augmentation ``none``, AdamW, batch 64,
``loaderWorkers: 0`` everywhere):

1. **Ray Train, 1 worker ÷ plain loop.** The trainer is the real ``finetune run JOB.yaml`` (embedded Ray,
   ``driver.run``, ``loop.train_loop_per_worker``), ``cpusPerWorker: 2`` (the loop sets 2 intra-op
   threads). The plain loop is this file's ``--plain-worker``: one process, ``torch.set_num_threads(2)``,
   the same FakeData images and transforms (checked equal at start-up), resnet18, AdamW with the same
   decay/no-decay groups, cosine schedule, a per-epoch evaluation on the same validation images.
2. **Ray Train, 2 workers ÷ ``torchrun --nproc_per_node=2``.** ``cpusPerWorker: 1`` (the loop sets 1
   thread) against the same plain loop as DDP over gloo with ``torch.set_num_threads(1)`` and
   ``OMP_NUM_THREADS=1`` in both ranks; global batch 64 (32 per process) on both sides. The plain loop
   writes no checkpoint; for the whole epoch (2c) a second torchrun run has rank 0 ``torch.save`` the model,
   the optimizer and the schedule after every epoch's evaluation, one new file per epoch on the same disk
   as the trainer's run directory (issue 14 item 4's targets: ≥ 1.0× for 2 and 2c). Row 2c runs the trainer
   with ``strategy.preciseBatchNorm: false`` so that both sides do the same work (training, evaluation,
   a checkpoint); row 2d is the trainer's default, which before every evaluation recomputes BatchNorm
   statistics with forward passes over 512 training images, all workers together (here 8 of each
   worker's 16 batches; the whole epoch's until 2026-12-01).
3. **Linear probe, cached features ÷ recomputed backbone.** Two ``finetune run`` jobs differing only in
   ``strategy.cacheFeatures``.
4. **Cold start of ``finetune run``**: from ``Popen`` to the start of the first training step. It comes
   with 1 and 2; ``--only 4`` takes it alone (1 worker, trainer runs only, no baseline), the cheap way to
   follow start-up work, and adds the same run joining a Ray already running (``finetune run --address``).
   Beside the wall time it gives the CPU time every process of the run spent by that first step (the run's
   own tree, and for the joined row the running Ray's too, sampled every 0.25 s from ``/proc`` and
   interpolated), and that CPU divided by the machine's cores: the wall time no scheduling can beat.

How each number is taken:

- *Throughput* is steady-state training images per second of training time (the training pass alone, no
  evaluation): epochs 2..E, epoch 1 (allocator, caches, lazy init) excluded. For the trainer it is the
  ``imagesPerSecond`` the loop writes to ``metrics.jsonl`` (timed by the loop around ``train_one_epoch``,
  rank 0, images of all workers); the plain loop times the same span the same way. A second column,
  *whole epoch*, divides the images by the wall time between two consecutive epoch updates of the
  trainer's JSON status file (training + evaluation + checkpoint + ``ray.train.report``), against the
  plain loop's training + evaluation: what the trainer adds around the steps. Row 2c compares like with
  like: the trainer's whole epoch against the wall time between the ends of consecutive epochs of
  torchrun saving a checkpoint each epoch (start barrier, sampler, training, evaluation, ``torch.save``).
- *Linear-probe epoch time* is the trainer's own ``epochSeconds`` (training + validation pass) of epochs
  2..E; the one-off caching pass is the time from the ``caching-features`` status update to the start of
  epoch 1 (see below). The wall time between epoch updates is shown as well.
- *Cold start*: the bench records ``time.time()`` just before it starts ``finetune run`` and watches the
  run directory. The start of the first training step is the modification time of the first version of
  ``metrics.jsonl`` (written right after epoch 1) minus that epoch's ``epochSeconds`` (timed from the
  line before the first batch is fetched). The ``starting`` status update (the Ray worker has entered the
  training loop) splits it into "Ray up" and "data + model ready".
- Every measurement is repeated (``--reps``, default 3) with trainer and baseline interleaved and their
  order alternated, so that load from other users hits both; the table shows the ratio of medians and
  the range of the per-repetition ratios.
- Settings that differ by design are left as each side has them, because they are part of what is
  measured: the trainer's workers get ``OMP_WAIT_POLICY=PASSIVE`` from ``driver.worker_env``, the baselines
  PyTorch's default; row 1c repeats the plain loop with PASSIVE to tell that setting's cost from the rest.
  Niceness is the exception: Ray starts its workers at niceness 15 (``RAY_worker_niceness``), which
  changes nothing on an idle machine but on a shared one decides who gets the cores, so the baselines
  run at the same niceness (``--baseline-nice``, default 15); the table prints the niceness found on the
  Ray training workers.
- Ray Train 2.60 lets a worker's ``report`` return only once the controller has taken the previous one,
  and the controller polls every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s): epochs shorter than that
  are stretched to it (row 3b). ``--ray-train-poll S`` sets it for the trainer runs, to show the effect.

Run from the repository root: ``.venv/bin/python bench/trainer_bench.py`` (about 10 minutes on 2 cores;
``--reps``, ``--samples``, ``--epochs``, ``--only`` make it shorter, ``--json FILE`` keeps the numbers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FINETUNE = str(Path(sys.executable).with_name("finetune"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
MARK = "BENCH "
"""Prefix of the plain worker's result lines on stdout (the rest is warnings and logs)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POLL_SECONDS = 0.01
DEFAULT_RAY_NICENESS = 15


# ------------------------------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Workload:
    """What both sides train: resnet18 on FakeData, the knobs of one measurement."""

    samples: int = 1024
    classes: int = 10
    image_size: int = 32
    batch_size: int = 64
    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    @property
    def val_samples(self) -> int:
        # data._fake: validation gets a quarter of the training images (at least one per class).
        return max(self.classes, self.samples // 4)


def manifest(
    name: str,
    w: Workload,
    out: Path,
    *,
    workers: int,
    cpus: float,
    method: str = "full",
    cache: bool = True,
    precise_bn: bool = True,
) -> str:
    """A FineTuneJob for ``finetune run``: the trainer side of every measurement. ``precise_bn``:
    ``strategy.preciseBatchNorm`` (on by default: forward passes over 512 training images, all workers together,
    before every evaluation, which the plain loops do not do)."""
    doc = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "resnet18"},
            "dataset": {
                "format": "fake",
                "imageSize": w.image_size,
                "augmentation": "none",
                "loaderWorkers": 0,
                "fake": {"samples": w.samples, "classes": w.classes},
            },
            "strategy": {"method": method, "cacheFeatures": cache, "preciseBatchNorm": precise_bn},
            "hyperparameters": {
                "epochs": w.epochs,
                "batchSize": w.batch_size,
                "optimizer": "adamw",
                "learningRate": w.lr,
                "weightDecay": w.weight_decay,
                "scheduler": "cosine",
                "seed": w.seed,
            },
            "resources": {"workers": workers, "cpusPerWorker": cpus},
            "output": {"uri": str(out)},
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


# ------------------------------------------------------------------------------- the plain baseline
def _plain_transform(image_size: int) -> Any:
    """The trainer's evaluation preset without weights (data.eval_transform), written out plainly."""
    import torch
    from torchvision.transforms import v2 as T

    return T.Compose(
        [
            T.ToImage(),
            T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
        ]
    )


def _plain_datasets(w: Workload) -> tuple[Any, Any]:
    from torchvision import datasets

    size = (3, w.image_size, w.image_size)
    tf = _plain_transform(w.image_size)
    # The offsets data._fake uses, so both sides see the very same images.
    train = datasets.FakeData(w.samples, size, w.classes, tf, random_offset=w.seed)
    val = datasets.FakeData(w.val_samples, size, w.classes, tf, random_offset=w.seed + w.samples)
    return train, val


def plain_worker(spec: dict[str, Any]) -> None:
    """A plain PyTorch training loop (one process, or one torchrun rank with DDP over gloo); prints one
    ``BENCH {json}`` line per epoch on rank 0."""
    import math

    import torch
    import torch.distributed as dist
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    w = Workload(**spec["workload"])
    checkpoints = Path(spec["checkpoints"]) if spec.get("checkpoints") else None
    torch.set_num_threads(spec["threads"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(w.seed)
    train, val = _plain_datasets(w)
    per_rank = w.batch_size // world
    sampler: DistributedSampler[Any] = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=w.seed)
    loader = DataLoader(train, batch_size=per_rank, sampler=sampler, num_workers=0)
    val_loader = DataLoader(Subset(val, range(rank, len(val), world)), batch_size=per_rank * 2, num_workers=0)
    model: nn.Module = torchvision.models.resnet18(num_classes=w.classes)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": w.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=w.lr,
        fused=True if spec.get("fused") else None,  # the trainer's kernel (optim._fusable) for rows 2e/2f, else the default
    )
    total = w.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    criterion = nn.CrossEntropyLoss()

    def reduce(values: list[float]) -> list[float]:
        if world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    for epoch in range(1, w.epochs + 1):
        sampler.set_epoch(epoch)
        if world > 1:
            dist.barrier()  # the trainer's epochs also start together, after ray.train.report's barrier
        started_at, started = time.time(), time.perf_counter()
        model.train()
        loss_sum, seen = 0.0, 0
        for images, targets in loader:
            loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(targets)
            seen += len(targets)
        train_seconds = time.perf_counter() - started
        loss_sum, seen_all = reduce([loss_sum, float(seen)])
        model.eval()
        correct, count = 0.0, 0.0
        with torch.no_grad():
            for images, targets in val_loader:
                correct += float((model(images).argmax(1) == targets).sum())
                count += len(targets)
        correct, count = reduce([correct, count])
        if checkpoints is not None and rank == 0:
            # What the trainer's rank 0 stores each epoch (torchvision's reference saves the same, twice):
            # the model, the optimizer and the schedule, one new file per epoch on the run's disk.
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict()}
            torch.save(state | {"epoch": epoch}, checkpoints / f"checkpoint_epoch_{epoch:04d}.pt")
        epoch_seconds = time.perf_counter() - started
        if rank == 0:
            line = {
                "epoch": epoch,
                "images": seen_all,
                "train_seconds": train_seconds,
                "epoch_seconds": epoch_seconds,
                "started_at": started_at,
                "ended_at": time.time(),
                "val_accuracy": correct / max(count, 1),
                "threads": torch.get_num_threads(),
                "nice": os.nice(0),
            }
            print(MARK + json.dumps(line), flush=True)
    if world > 1:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ run watching
@dataclass
class Event:
    """A new version of a watched file: its modification time (s, epoch) and, for status.json, what it said."""

    at: float
    stage: str | None = None
    epoch: int | None = None


@dataclass
class TrainerRun:
    spawned_at: float
    wall_seconds: float
    records: list[dict[str, Any]]
    status: list[Event]
    first_metrics_at: float | None
    worker_nice: list[int]
    cpu_samples: list[tuple[float, float]] = field(default_factory=list)
    cpu_by_kind: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def status_at(self, stage: str, epoch: int | None = None) -> float | None:
        for e in self.status:
            if e.stage == stage and (epoch is None or e.epoch == epoch):
                return e.at
        return None

    @property
    def epoch_updates(self) -> dict[int, float]:
        """Epoch → time of its status update (after checkpoint and report)."""
        out: dict[int, float] = {}
        for e in self.status:
            if e.stage in ("probe", "fine-tune") and e.epoch and e.epoch not in out:
                out[e.epoch] = e.at
            elif e.stage == "evaluate" and e.epoch and e.epoch not in out:
                # The last epoch's update is replaced by the final "evaluate" one a few ms later,
                # often between two polls: the latter dates the former.
                out[e.epoch] = e.at
        return out

    @property
    def first_step_at(self) -> float | None:
        """Start of epoch 1 = the first metrics.jsonl's mtime minus epoch 1's epochSeconds."""
        if self.first_metrics_at is None or not self.records:
            return None
        return self.first_metrics_at - float(self.records[0]["epochSeconds"])


def _ancestors(pid: int) -> set[int]:
    seen: set[int] = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return seen


def ray_train_worker_nice(root: int) -> list[int]:
    """Niceness of the RayTrainWorker processes started under process ``root`` (other users' Ray runs on
    the same machine are left out by walking each candidate's parents)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"RayTrainWorker" not in cmdline:
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if root in _ancestors(int(entry.name)):
            # Field 19 of /proc/PID/stat, counted after the parenthesised command name.
            found.append(int(stat.rsplit(")", 1)[1].split()[16]))
    return found


_TICKS = os.sysconf("SC_CLK_TCK")
CPU_SAMPLE_SECONDS = 0.25


def tree_cpu(roots: Sequence[int]) -> dict[str, float]:
    """User + system CPU of the live processes under (and including) ``roots``, by kind of process (``label``),
    from one pass over ``/proc``."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        pid = int(entry.name)
        # After the parenthesised name: state, ppid (index 1), ..., utime (11), stime (12).
        children.setdefault(int(fields[1]), []).append(pid)
        cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
    out: dict[str, float] = {}
    todo, seen = list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in cpu:
            continue
        seen.add(pid)
        kind = label(pid)
        out[kind] = out.get(kind, 0.0) + cpu[pid]
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(roots: Sequence[int]) -> float:
    return sum(tree_cpu(roots).values())


def label(pid: int) -> str:
    try:
        return kind_of([a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a])
    except OSError:
        return "?"


def kind_of(argv: Sequence[str]) -> str:
    """What a process of a run is, from its command line: Ray's title for its workers (``ray::TrainController``,
    ``ray::IDLE``), else the program, or the script a Python runs (``raylet``, ``gcs_server``, ``agent.py``)."""
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]
    program = Path(argv[0]).name
    if program.startswith("python"):
        for i, arg in enumerate(argv[1:], 1):
            if arg == "-c":
                return f"{program} -c"
            if arg == "-m":
                return argv[i + 1] if i + 1 < len(argv) else program
            if not arg.startswith("-"):
                return Path(arg).name
        return program
    return program


def interpolate(samples: Sequence[tuple[float, float]], at: float) -> float | None:
    """The value of a sampled, increasing series at time ``at`` (None outside the samples)."""
    for (t0, v0), (t1, v1) in itertools.pairwise(samples):
        if t0 <= at <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (at - t0) / (t1 - t0)
    return None


class Watcher(threading.Thread):
    """Polls the status file and metrics.jsonl of a run every 10 ms and records each new version."""

    def __init__(self, status_file: Path, metrics_file: Path, root_pid: int, cpu_roots: Sequence[int] = ()) -> None:
        super().__init__(daemon=True)
        self.status_file, self.metrics_file, self.root_pid = status_file, metrics_file, root_pid
        self.cpu_roots = [root_pid, *cpu_roots]
        # (time, CPU seconds of the run's processes since launch) every CPU_SAMPLE_SECONDS until epoch 1 is seen,
        # and the same by kind of process.
        self.cpu_samples: list[tuple[float, float]] = []
        self.cpu_by_kind: list[tuple[float, dict[str, float]]] = []
        self._cpu_base = tree_cpu(cpu_roots)  # a running Ray's CPU before this run
        self.events: list[Event] = []
        self.first_metrics_at: float | None = None
        self.worker_nice: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last: int | None = None
        self.cpu_samples.append((time.time(), 0.0))
        while not self.stop.wait(POLL_SECONDS):
            now = time.time()
            if self.first_metrics_at is None and now - self.cpu_samples[-1][0] >= CPU_SAMPLE_SECONDS:
                kinds = tree_cpu(self.cpu_roots)
                spent = {k: v - self._cpu_base.get(k, 0.0) for k, v in kinds.items()}
                self.cpu_samples.append((now, sum(spent.values())))
                self.cpu_by_kind.append((now, spent))
            try:
                st = self.status_file.stat()
            except FileNotFoundError:
                st = None
            if st is not None and st.st_mtime_ns != last:
                try:
                    doc = json.loads(self.status_file.read_text())
                except (OSError, ValueError):
                    continue  # replaced between stat and read: the next poll sees the new version
                last = st.st_mtime_ns
                progress = doc.get("progress") or {}
                self.events.append(Event(st.st_mtime_ns / 1e9, progress.get("stage"), progress.get("epoch")))
                if not self.worker_nice:
                    self.worker_nice = ray_train_worker_nice(self.root_pid)
            if self.first_metrics_at is None:
                try:
                    st = self.metrics_file.stat()
                    lines = self.metrics_file.read_text().splitlines()
                except FileNotFoundError:
                    continue
                # Only the version holding epoch 1 alone dates epoch 1; seen later, the time is unknown.
                self.first_metrics_at = st.st_mtime_ns / 1e9 if len(lines) == 1 else float("nan")


def run_trainer(job: str, name: str, workdir: Path, env: dict[str, str], cpu_roots: Sequence[int] = ()) -> TrainerRun:
    """``finetune run`` on ``job`` (a manifest) in a fresh output directory, watched from outside; ``cpu_roots``:
    other processes whose CPU counts as the run's (a running Ray it joins)."""
    path = workdir / f"{name}.yaml"
    path.write_text(job)
    out = workdir / "out"
    run_dir = out / name
    status = workdir / f"{name}.status.json"
    shutil.rmtree(run_dir, ignore_errors=True)
    status.unlink(missing_ok=True)
    log = workdir / f"{name}.log"
    with open(log, "w") as log_file:
        spawned_at = time.time()
        proc = subprocess.Popen(
            [FINETUNE, "run", str(path), "--json-status", str(status)], stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
        watcher = Watcher(status, run_dir / "metrics.jsonl", proc.pid, cpu_roots)
        watcher.start()
        rc = proc.wait()
        wall = time.time() - spawned_at
        watcher.stop.set()
        watcher.join()
    if rc != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"finetune run {name} exited {rc}; log {log}:\n{tail}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = watcher.first_metrics_at
    return TrainerRun(
        spawned_at=spawned_at,
        wall_seconds=wall,
        records=records,
        status=watcher.events,
        first_metrics_at=None if first is None or first != first else first,
        worker_nice=watcher.worker_nice,
        cpu_samples=watcher.cpu_samples,
        cpu_by_kind=watcher.cpu_by_kind,
    )


@dataclass
class PlainRun:
    spawned_at: float
    epochs: list[dict[str, Any]]


def run_plain(
    w: Workload,
    *,
    processes: int,
    threads: int,
    nice: int,
    wait_policy: str | None = None,
    checkpoints: Path | None = None,
    fused: bool = False,
) -> PlainRun:
    """The plain loop, as one process or under ``torchrun --nproc_per_node=processes``, with PyTorch's
    default OpenMP wait policy unless ``wait_policy`` names one; ``checkpoints``: a fresh directory where rank 0
    saves a checkpoint every epoch, after the evaluation (else none is written); ``fused``: AdamW's fused kernel,
    as the trainer runs it, instead of PyTorch's default (foreach)."""
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
        checkpoints.mkdir(parents=True)
    spec = json.dumps(
        {"workload": asdict(w), "threads": threads, "checkpoints": str(checkpoints) if checkpoints else None, "fused": fused}
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"OMP_NUM_THREADS": str(threads)}
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    me = str(Path(__file__).resolve())
    if processes == 1:
        cmd = [PYTHON, me, "--plain-worker", spec]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={processes}", me, "--plain-worker", spec]
    spawned_at = time.time()
    done = subprocess.run(["nice", "-n", str(nice), *cmd], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"plain loop exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
    epochs = [json.loads(line[len(MARK) :]) for line in done.stdout.splitlines() if line.startswith(MARK)]
    return PlainRun(spawned_at, epochs)


# ----------------------------------------------------------------------------------------- numbers
def steady_rate(images: Sequence[float], seconds: Sequence[float]) -> float:
    """Images per second over epochs 2..E (the first is warm-up)."""
    return sum(images[1:]) / sum(seconds[1:])


def trainer_train_rate(run: TrainerRun) -> float:
    # The loop's imagesPerSecond is images of all workers / rank 0's training seconds, and every epoch has
    # the same images: the steady rate is the harmonic mean of epochs 2..E.
    ips = [float(r["imagesPerSecond"]) for r in run.records]
    return steady_rate([1.0] * len(ips), [1.0 / v for v in ips])


def trainer_epoch_walls(run: TrainerRun) -> list[float]:
    """Wall seconds between consecutive epoch updates (epochs 2..E)."""
    at = run.epoch_updates
    return [at[e] - at[e - 1] for e in sorted(at) if e - 1 in at]


def plain_train_rate(run: PlainRun) -> float:
    return steady_rate([e["images"] for e in run.epochs], [e["train_seconds"] for e in run.epochs])


def plain_epoch_rate(run: PlainRun) -> float:
    return steady_rate([e["images"] for e in run.epochs], [e["epoch_seconds"] for e in run.epochs])


def plain_wall_rate(run: PlainRun) -> float:
    """Images per second of wall time between the ends of consecutive epochs (epochs 2..E), as the trainer's
    whole epoch is taken: what lies between two epochs (the start barrier, the sampler) counts too."""
    ends = [e["ended_at"] for e in run.epochs]
    return float(sum(e["images"] for e in run.epochs[1:]) / (ends[-1] - ends[0]))


@dataclass
class Row:
    name: str
    trainer: list[float]
    baseline: list[float]
    unit: str
    target: float | None = None
    higher_is_better: bool = True
    ratios: list[float] = field(default_factory=list)

    def _ratio(self, trainer: float, baseline: float) -> float:
        # Times (lower is better) are turned around so that every ratio reads "higher is better".
        return trainer / baseline if self.higher_is_better else baseline / trainer

    def __post_init__(self) -> None:
        self.ratios = [self._ratio(t, b) for t, b in zip(self.trainer, self.baseline, strict=True)]

    @property
    def ratio(self) -> float | None:
        if not self.trainer or not self.baseline:
            return None
        return self._ratio(statistics.median(self.trainer), statistics.median(self.baseline))

    @property
    def met(self) -> str:
        if self.target is None or self.ratio is None:
            return "-"
        return "yes" if self.ratio >= self.target else "NO"


def spread(values: Sequence[float], fmt: str = ".3g") -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def print_table(rows: list[Row]) -> str:
    header = "| measurement | trainer (3: cached) | baseline (3: recomputed) | ratio of medians | per-rep ratios | target | met |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}×"
        per_rep = "-" if not r.ratios else f"{min(r.ratios):.2f}–{max(r.ratios):.2f}"
        target = "-" if r.target is None else f"≥ {r.target:g}×"
        lines.append(
            f"| {r.name} | {spread(r.trainer)} {r.unit} | {spread(r.baseline)} {r.unit} | "
            f"{ratio} | {per_rep} | {target} | {r.met} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ measurements
def check_same_inputs(w: Workload) -> None:
    """The baseline's images and model are the trainer's: compare with data.build_datasets/build_model."""
    import torch
    import torchvision

    from finetune_operator.api.contract import TrainerConfig
    from finetune_operator.api.v1alpha1 import FineTuneJob
    from finetune_trainer.data import build_datasets
    from finetune_trainer.model import build_model

    job = FineTuneJob.parse(yaml.safe_load(manifest("check", w, Path("/tmp"), workers=1, cpus=2)))
    train, val, _, _ = build_datasets(TrainerConfig.from_job(job))
    mine_train, mine_val = _plain_datasets(w)
    for theirs, mine in ((train, mine_train), (val, mine_val)):
        assert len(theirs) == len(mine), (len(theirs), len(mine))  # type: ignore[arg-type]
        for i in (0, 1, len(mine) - 1):
            (a, la), (b, lb) = theirs[i], mine[i]
            assert la == lb and torch.equal(a, b), f"image {i} differs between the trainer and the baseline"
    ours = build_model("resnet18", None, w.classes)
    plain = torchvision.models.resnet18(num_classes=w.classes)
    shapes = [tuple(p.shape) for p in ours.parameters()]
    assert shapes == [tuple(p.shape) for p in plain.parameters()], "the trainer's resnet18 differs from torchvision's"


def alternate(rep: int, first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """Run both, in swapped order on odd repetitions, so drifting load favours neither; results in (first, second) order."""
    if rep % 2 == 0:
        a = first()
        return a, second()
    b = second()
    return first(), b


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def measure_one_worker(w: Workload, reps: int, workdir: Path, env: dict[str, str], nice: int, res: Results) -> list[TrainerRun]:
    trainer_runs: list[TrainerRun] = []
    plain_runs: list[PlainRun] = []
    passive_runs: list[PlainRun] = []
    for rep in range(reps):
        log(f"1 worker vs plain loop, repetition {rep + 1}/{reps}")
        t, (p, q) = alternate(
            rep,
            lambda: run_trainer(manifest("bench-1w", w, workdir / "out", workers=1, cpus=2), "bench-1w", workdir, env),
            lambda: (
                run_plain(w, processes=1, threads=2, nice=nice),
                run_plain(w, processes=1, threads=2, nice=nice, wait_policy="PASSIVE"),
            ),
        )
        trainer_runs.append(t)
        plain_runs.append(p)
        passive_runs.append(q)
        log(
            f"  trainer {trainer_train_rate(t):.0f} img/s, plain {plain_train_rate(p):.0f} img/s, "
            f"plain PASSIVE {plain_train_rate(q):.0f} img/s"
        )
    walls = [statistics.median(trainer_epoch_walls(t)) for t in trainer_runs]
    res.rows.append(
        Row("1. Ray Train 1 worker ÷ plain loop (training)", [trainer_train_rate(t) for t in trainer_runs],
            [plain_train_rate(p) for p in plain_runs], "img/s", 0.90)
    )  # fmt: skip
    res.rows.append(
        Row("1b. same, whole epoch (train+eval+checkpoint+report)", [w.samples / s for s in walls],
            [plain_epoch_rate(p) for p in plain_runs], "img/s")
    )  # fmt: skip
    res.rows.append(
        Row("1c. training, plain loop given the trainer's OMP_WAIT_POLICY=PASSIVE", [trainer_train_rate(t) for t in trainer_runs],
            [plain_train_rate(q) for q in passive_runs], "img/s")
    )  # fmt: skip
    starts = [p.epochs[0]["started_at"] - p.spawned_at for p in plain_runs]
    res.details["plain_cold_start_s"] = starts
    res.details["plain_threads"] = plain_runs[0].epochs[0]["threads"]
    res.details["plain_nice"] = plain_runs[0].epochs[0]["nice"]
    res.details["one_worker_nice"] = sorted({n for t in trainer_runs for n in t.worker_nice})
    res.details["one_worker_runs"] = [[r["imagesPerSecond"] for r in t.records] for t in trainer_runs]
    res.details["plain_runs"] = [[e["images"] / e["train_seconds"] for e in p.epochs] for p in plain_runs]
    res.details["plain_passive_runs"] = [[e["images"] / e["train_seconds"] for e in q.epochs] for q in passive_runs]
    return trainer_runs


def measure_two_workers(w: Workload, reps: int, workdir: Path, env: dict[str, str], nice: int, res: Results) -> list[TrainerRun]:
    trainer_runs: list[TrainerRun] = []
    plain_bn_runs: list[TrainerRun] = []
    ddp_runs: list[PlainRun] = []
    saving_runs: list[PlainRun] = []
    fused_runs: list[PlainRun] = []
    no_precise_bn = manifest("bench-2w-plain-bn", w, workdir / "out", workers=2, cpus=1, precise_bn=False)
    for rep in range(reps):
        log(f"2 workers vs torchrun (without and with a checkpoint per epoch), repetition {rep + 1}/{reps}")
        (t, b), (p, c, f) = alternate(
            rep,
            lambda: (
                run_trainer(manifest("bench-2w", w, workdir / "out", workers=2, cpus=1), "bench-2w", workdir, env),
                run_trainer(no_precise_bn, "bench-2w-plain-bn", workdir, env),
            ),
            lambda: (
                run_plain(w, processes=2, threads=1, nice=nice),
                run_plain(w, processes=2, threads=1, nice=nice, checkpoints=workdir / "torchrun-checkpoints"),
                run_plain(w, processes=2, threads=1, nice=nice, checkpoints=workdir / "torchrun-checkpoints", fused=True),
            ),
        )
        trainer_runs.append(t)
        plain_bn_runs.append(b)
        ddp_runs.append(p)
        saving_runs.append(c)
        fused_runs.append(f)
        log(
            f"  trainer {trainer_train_rate(t):.0f} img/s, torchrun {plain_train_rate(p):.0f} img/s; whole epoch: "
            f"trainer {w.samples / statistics.median(trainer_epoch_walls(t)):.0f}, without precise BN "
            f"{w.samples / statistics.median(trainer_epoch_walls(b)):.0f}, torchrun + checkpoint {plain_wall_rate(c):.0f} img/s; "
            f"torchrun with fused AdamW: training {plain_train_rate(f):.0f}, + checkpoint {plain_wall_rate(f):.0f} img/s"
        )
    walls = [statistics.median(trainer_epoch_walls(t)) for t in trainer_runs]
    bn_walls = [statistics.median(trainer_epoch_walls(b)) for b in plain_bn_runs]
    res.rows.append(
        Row("2. Ray Train 2 workers ÷ torchrun 2 procs (training)", [trainer_train_rate(t) for t in trainer_runs],
            [plain_train_rate(p) for p in ddp_runs], "img/s", 1.0)
    )  # fmt: skip
    res.rows.append(
        Row("2b. same, whole epoch: trainer (train+eval+checkpoint+report) ÷ torchrun train+eval, no checkpoint",
            [w.samples / s for s in walls], [plain_epoch_rate(p) for p in ddp_runs], "img/s")
    )  # fmt: skip
    res.rows.append(
        Row("2c. whole epoch, like with like: trainer with preciseBatchNorm off ÷ torchrun saving a checkpoint per epoch",
            [w.samples / s for s in bn_walls], [plain_wall_rate(c) for c in saving_runs], "img/s", 1.0)
    )  # fmt: skip
    res.rows.append(
        Row("2d. same, the trainer as configured by default (preciseBatchNorm on: forward passes over 512 images more)",
            [w.samples / s for s in walls], [plain_wall_rate(c) for c in saving_runs], "img/s")
    )  # fmt: skip
    # The trainer runs AdamW's fused kernel (optim._fusable), which torchrun's default script does not: 2e and 2f give
    # torchrun the same kernel, so that what is left between them is Ray Train and the trainer's loop.
    res.rows.append(
        Row("2e. training, like with like: Ray Train 2 workers ÷ torchrun with the trainer's fused AdamW",
            [trainer_train_rate(t) for t in trainer_runs], [plain_train_rate(f) for f in fused_runs], "img/s")
    )  # fmt: skip
    res.rows.append(
        Row("2f. whole epoch, like with like: 2c's trainer ÷ torchrun with fused AdamW, saving a checkpoint per epoch",
            [w.samples / s for s in bn_walls], [plain_wall_rate(f) for f in fused_runs], "img/s")
    )  # fmt: skip
    res.details["torchrun_fused_runs"] = [[e["images"] / e["epoch_seconds"] for e in f.epochs] for f in fused_runs]
    res.details["torchrun_checkpoint_runs"] = [[e["images"] / e["epoch_seconds"] for e in c.epochs] for c in saving_runs]
    res.details["two_worker_nice"] = sorted({n for t in trainer_runs for n in t.worker_nice})
    res.details["two_worker_runs"] = [[r["imagesPerSecond"] for r in t.records] for t in trainer_runs]
    res.details["torchrun_runs"] = [[e["images"] / e["train_seconds"] for e in p.epochs] for p in ddp_runs]
    return trainer_runs


def measure_probe(w: Workload, reps: int, workdir: Path, env: dict[str, str], res: Results) -> None:
    cached: list[TrainerRun] = []
    uncached: list[TrainerRun] = []
    for rep in range(reps):
        log(f"linear probe cached vs uncached, repetition {rep + 1}/{reps}")

        def job(cache: bool) -> TrainerRun:
            name = f"bench-lp-{'cached' if cache else 'uncached'}"
            text = manifest(name, w, workdir / "out", workers=1, cpus=2, method="linear-probe", cache=cache)
            return run_trainer(text, name, workdir, env)

        c, u = alternate(rep, lambda: job(True), lambda: job(False))
        cached.append(c)
        uncached.append(u)

    def epoch_seconds(run: TrainerRun) -> float:
        return statistics.median(float(r["epochSeconds"]) for r in run.records[1:])

    caching = []
    for c in cached:
        began, first = c.status_at("caching-features"), c.first_step_at
        caching.append(first - began if began is not None and first is not None else float("nan"))
    c_secs = [epoch_seconds(c) for c in cached]
    u_secs = [epoch_seconds(u) for u in uncached]
    log(f"  epoch seconds cached {statistics.median(c_secs):.3f}, uncached {statistics.median(u_secs):.3f}")
    # Speed-up: uncached seconds over cached seconds, so that the ratio reads "× faster".
    res.rows.append(
        Row("3. linear probe epoch time (train+val): recomputed ÷ cached", c_secs, u_secs, "s", 10.0, higher_is_better=False)
    )  # fmt: skip
    c_walls = [statistics.median(trainer_epoch_walls(c)) for c in cached]
    u_walls = [statistics.median(trainer_epoch_walls(u)) for u in uncached]
    res.rows.append(
        Row("3b. same, wall time between epoch updates (+checkpoint, report)", c_walls, u_walls, "s", higher_is_better=False)
    )  # fmt: skip
    res.details["probe_caching_pass_s"] = caching
    res.details["probe_cached_epoch_s"] = [[r["epochSeconds"] for r in c.records] for c in cached]
    res.details["probe_uncached_epoch_s"] = [[r["epochSeconds"] for r in u.records] for u in uncached]
    res.details["probe_val_accuracy"] = {
        "cached": [c.records[-1]["valAccuracy"] for c in cached],
        "uncached": [u.records[-1]["valAccuracy"] for u in uncached],
    }


_RUNNING_RAY = """
import sys, time, ray
ray.init(address="local", num_cpus=int(sys.argv[1]), include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
time.sleep(3600)
"""
"""A Ray already running on this machine, for ``finetune run --address``: a driver that keeps its own local
Ray alive (killed by its pid at the end, so that the bench never touches anybody else's Ray)."""


def measure_cold_start(w: Workload, reps: int, workdir: Path, env: dict[str, str]) -> dict[str, list[TrainerRun]]:
    """Row 4 alone: the 1-worker job of row 1, trainer side only (its timings need no baseline), on an
    embedded Ray and joining a running one (``FINETUNE_RAY_ADDRESS``), interleaved."""
    job = manifest("bench-1w", w, workdir / "out", workers=1, cpus=2)
    holder = subprocess.Popen(
        [PYTHON, "-c", _RUNNING_RAY, str(len(os.sched_getaffinity(0)))], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout is not None
        address = holder.stdout.readline().strip()
        if not address:
            raise RuntimeError("the running Ray for the --address row did not start")
        runs: dict[str, list[TrainerRun]] = {"1 worker": [], "1 worker, joining a running Ray": []}
        # Ray 2.60's local clusters use token authentication; a client reads ~/.ray/auth_token only when told.
        joined = {**env, "FINETUNE_RAY_ADDRESS": address, "RAY_AUTH_MODE": env.get("RAY_AUTH_MODE", "token")}
        for rep in range(reps):
            log(f"cold start of finetune run (1 worker, embedded and joined Ray), repetition {rep + 1}/{reps}")
            a, b = alternate(
                rep,
                lambda: run_trainer(job, "bench-1w", workdir, env),
                lambda: run_trainer(job, "bench-1w", workdir, joined, cpu_roots=[holder.pid]),
            )
            runs["1 worker"].append(a)
            runs["1 worker, joining a running Ray"].append(b)
        return runs
    finally:
        holder.kill()
        holder.wait()


CPU_OF = "cpu of "
"""Prefix of cold_start's keys holding one kind of process's CPU by the first step."""


def cold_start(runs: list[TrainerRun]) -> dict[str, list[float]]:
    total, ray_up, ready, cpu = [], [], [], []
    by_kind: dict[str, list[float]] = {}
    for r in runs:
        first, starting = r.first_step_at, r.status_at("starting")
        if first is None or starting is None:
            continue
        total.append(first - r.spawned_at)
        ray_up.append(starting - r.spawned_at)
        ready.append(first - starting)
        spent = interpolate(r.cpu_samples, first)
        if spent is not None:
            cpu.append(spent)
        # By kind of process: the last sample before the first step (up to CPU_SAMPLE_SECONDS early).
        before = [kinds for at, kinds in r.cpu_by_kind if at <= first]
        for kind, seconds in (before[-1] if before else {}).items():
            by_kind.setdefault(f"{CPU_OF}{kind}", []).append(seconds)
    return {
        "to_first_step": total,
        "to_worker_loop": ray_up,
        "worker_loop_to_first_step": ready,
        "cpu_to_first_step": cpu,
        **dict(sorted(by_kind.items(), key=lambda kv: -statistics.median(kv[1]))),
    }


# -------------------------------------------------------------------------------------------- main
def environment(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch
    import torchvision

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "load_average_at_start": os.getloadavg(),
        "baseline_nice": args.baseline_nice,
        "ray_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
        | ({"RAY_worker_niceness": str(args.ray_worker_niceness)} if args.ray_worker_niceness is not None else {})
        | ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(args.ray_train_poll)} if args.ray_train_poll is not None else {}),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--plain-worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (default 3)")
    parser.add_argument("--samples", type=int, default=1024, help="FakeData training images per epoch (default 1024)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per throughput run, the first is warm-up (default 3)")
    parser.add_argument("--probe-epochs", type=int, default=4, help="epochs per linear-probe run (default 4)")
    parser.add_argument("--only", default="1,2,3", help="measurements, of 1,2,3,4 (cold start comes with 1, 2; 4: it alone)")
    parser.add_argument(
        "--baseline-nice",
        type=int,
        default=None,
        help=f"niceness of the baselines (default: Ray's worker niceness, {DEFAULT_RAY_NICENESS})",
    )
    parser.add_argument("--ray-worker-niceness", type=int, help="set RAY_worker_niceness for the trainer runs")
    parser.add_argument(
        "--ray-train-poll",
        type=float,
        metavar="S",
        help="set RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray Train's controller poll, 2 s) for the trainer runs",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, runs)")
    args = parser.parse_args(argv)
    if args.plain_worker:
        plain_worker(json.loads(args.plain_worker))
        return 0
    if args.baseline_nice is None:
        args.baseline_nice = DEFAULT_RAY_NICENESS if args.ray_worker_niceness is None else args.ray_worker_niceness
    if min(args.epochs, args.probe_epochs) < 2:
        parser.error("--epochs and --probe-epochs need at least 2 (the first epoch is warm-up)")
    only = {s.strip() for s in args.only.split(",")}
    env = dict(os.environ)
    if args.ray_worker_niceness is not None:
        env["RAY_worker_niceness"] = str(args.ray_worker_niceness)
    if args.ray_train_poll is not None:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.ray_train_poll)
    w = Workload(samples=args.samples, epochs=args.epochs)
    started = time.time()
    info = environment(args)
    if only & {"1", "2", "3"}:
        log(f"checking that the baseline sees the trainer's images and model ({w.samples} FakeData images, resnet18)")
        check_same_inputs(w)
    res = Results()
    workdir = Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    try:
        cold: dict[str, dict[str, list[float]]] = {}
        if "1" in only:
            cold["1 worker"] = cold_start(measure_one_worker(w, args.reps, workdir, env, args.baseline_nice, res))
        if "2" in only:
            cold["2 workers"] = cold_start(measure_two_workers(w, args.reps, workdir, env, args.baseline_nice, res))
        if "4" in only and "1" not in only:
            cold |= {which: cold_start(runs) for which, runs in measure_cold_start(w, args.reps, workdir, env).items()}
        if "3" in only:
            measure_probe(Workload(samples=args.samples, epochs=args.probe_epochs), args.reps, workdir, env, res)
    finally:
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    info["load_average_at_end"] = os.getloadavg()
    info["bench_seconds"] = round(time.time() - started)
    print()
    print(
        f"# trainer benchmark, {info['date']}: {info['machine']}; python "
        f"{info['python']}, torch {info['torch']}, ray {info['ray']}"
    )
    print(
        f"# resnet18 {w.image_size}×{w.image_size}, FakeData {w.samples} train / "
        f"{w.val_samples} val images, batch {w.batch_size}, "
        f"AdamW, loaderWorkers 0; {args.reps} repetitions; median [min–max]"
    )
    print()
    print(print_table(res.rows))
    print()
    for which, c in cold.items():
        if c["to_first_step"]:
            print(
                f"4. cold start of `finetune run` ({which}): {spread(c['to_first_step'])} s to the first training step "
                f"(Ray + worker up {spread(c['to_worker_loop'])} s, then data + model {spread(c['worker_loop_to_first_step'])} s)"
            )
            if c["cpu_to_first_step"]:
                cores = len(os.sched_getaffinity(0))
                floor = [v / cores for v in c["cpu_to_first_step"]]
                print(
                    f"   CPU of the run's processes by then {spread(c['cpu_to_first_step'])} s: on {cores} cores no "
                    f"scheduling starts the first step before {spread(floor)} s"
                )
                kinds = [f"{k[len(CPU_OF) :]} {statistics.median(v):.2g}" for k, v in c.items() if k.startswith(CPU_OF)]
                print(f"   of which, by kind of process (median s): {', '.join(kinds)}")
    if "plain_cold_start_s" in res.details:
        print(f"   for scale: plain loop process start to first step {spread(res.details['plain_cold_start_s'])} s")
    if "probe_caching_pass_s" in res.details:
        print(f"3. one-off caching pass (train + val features): {spread(res.details['probe_caching_pass_s'])} s")
        acc = res.details["probe_val_accuracy"]
        print(f"   final val accuracy cached {acc['cached']} vs uncached {acc['uncached']} (FakeData: chance level)")
    print(
        "threads: plain 2 / torchrun 1 per rank / trainer cpusPerWorker 2 (1 worker), 1 (2 workers); OMP_WAIT_POLICY: "
        "trainer workers as driver.worker_env leaves them (the caller's, else unset), "
        "baselines PyTorch's default (unset) except row 1c; "
        f"niceness: baselines {args.baseline_nice}, Ray train workers {res.details.get('one_worker_nice')} (1 worker), "
        f"{res.details.get('two_worker_nice')} (2 workers)"
    )
    print(
        f"load average at start {info['load_average_at_start']}, at end "
        f"{info['load_average_at_end']}; bench took {info['bench_seconds']} s"
    )
    if args.json:
        doc = {
            "environment": info,
            "rows": [asdict(r) | {"ratio": r.ratio, "met": r.met} for r in res.rows],
            "cold_start": cold,
            "details": res.details,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
