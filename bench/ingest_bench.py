"""Ingest benchmark: Ray Data streaming next to today's DataLoader path, in one run (issue 14 item 6, bullets 1-4).

This script owns the numbers of the "Ingest (Ray Data streaming)" section of ``bench/README.md``. It measures and
prints ratios; it asserts nothing about speed. Parts (``--only`` picks some):

1. **ingest**: images per second of decode + augment at 224 px, the trainer's own ``standard`` train transform
   (``data.build_input_spec`` + ``data.train_transform``), on a generated ImageFolder (``--ingest-files``, 20,000
   by default), on the same ``--workers`` cores: (a) today's path, ``image_folder.ImageFiles`` in a torch
   ``DataLoader`` with W worker processes; (b) Ray Data on a local ``ray.init(num_cpus=W)``:
   ``ray_data_images_per_second``: the trainer's own ``streaming.StreamSource``. Ratio (b) ÷ (a), target ≥ 1.0×.
2. **first batch**: time from "job given" (the dataset URI) to the first training batch delivered, and peak
   memory and disk, for each of ``--sizes`` (2k, 20k, 100k) from a local folder and from S3 (moto's server on
   localhost, in a child process). Today's path lists and opens every header (``scan_images``) and, from S3,
   first copies the whole prefix (``download_cache.fetch_to_cache``: its time and the bytes it writes are
   shown). The streaming path lists the objects and starts decoding.
3. **scale-out**: images per second of the Ray Data pipeline on a ``ray.cluster_utils.Cluster`` whose head has
   1 CPU, then again after a CPU-only node of 1 CPU has joined.

Fairness: both sides shuffle with a seeded order, batch 64, and decode at the niceness Ray gives its workers
(``RAY_worker_niceness``, 15: DataLoader workers take it in their ``worker_init_fn``); the consumer is this
process on both sides. Throughput is counted after the first batch (pool start-up excluded), over
``--ingest-images`` images. Memory is sampled from /proc (``ingest_data.TreeMemory``): private memory of the
whole process tree (Ray's daemons and workers included, moto excluded) and the largest shared mapping (Ray's
object store pages).

Run from the repository root: ``.venv/bin/python bench/ingest_bench.py`` (``--workdir`` keeps the generated
folders between runs; ``--quick``: a few hundred tiny-count images, seconds, to check the script end to end;
``--json FILE`` keeps the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _sub in ("", "trainer", "operator"):  # self-contained: the checkout's packages, no install needed
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ingest_data  # noqa: E402

BATCH = 64
TARGET = 1.0
RAY_WORKER_NICENESS = 15
"""Ray starts its workers at this niceness (``RAY_worker_niceness``); the DataLoader's workers take it too."""


@dataclass
class Run:
    images: int
    first_batch_s: float  # from the call to the first batch in hand
    steady_images_per_s: float  # after the first batch
    first_batch_at: float = 0.0  # time.perf_counter() when the first batch arrived


def _consume(batches: Iterator[Any], limit: int, started: float) -> Run:
    first_at, images = 0.0, 0
    try:
        for batch in batches:
            n = len(batch[1]) if isinstance(batch, tuple | list) else len(batch["label"])
            if not first_at:
                first_at = time.perf_counter()
            else:
                images += n
            if images >= limit:
                break
    finally:
        # Stops the producers now (Ray Data's executor, the DataLoader's workers), not when collected: a
        # pipeline left running would take the cores from the next measurement.
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    seconds = time.perf_counter() - first_at
    return Run(images, first_at - started, images / seconds if seconds > 0 else 0.0, first_at)


# --------------------------------------------------------------------------------- the two pipelines
def _renice() -> None:
    os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))


def _renice_worker(worker_id: int) -> None:
    from finetune_trainer.seeding import seed_loader_worker

    _renice()
    seed_loader_worker(worker_id)


def dataloader_images_per_second(
    samples: Sequence[tuple[str, int]], transform: Callable[[Any], Any], *, workers: int, limit: int, seed: int = 0
) -> Run:
    """(a) Today's path as ``loaders.build_loaders`` builds it for one worker: ``ImageFiles`` under ``SeededSamples``
    (each image augmented under its own seed) through an ``EpochSampler``, in a DataLoader with ``workers``
    processes; whole batches of normalised float32, as the training step receives them."""
    from torch.utils.data import DataLoader

    from finetune_trainer.image_folder import ImageFiles
    from finetune_trainer.seeding import EpochSampler, SeededSamples, loader_generator

    started = time.perf_counter()
    images = SeededSamples(ImageFiles(samples, transform), seed)
    sampler = EpochSampler(images, num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(1)
    loader = DataLoader(
        images,
        batch_size=BATCH,
        sampler=sampler,
        num_workers=workers,
        generator=loader_generator(seed, 0),
        worker_init_fn=_renice_worker,
    )
    batches = iter(loader)
    try:
        return _consume(batches, limit, started)
    finally:
        del batches  # the workers exit now


def ray_data_images_per_second(
    paths: Sequence[str], labels: Sequence[int], *, transform: Callable[[Any], Any], limit: int, seed: int = 0
) -> Run:
    """(b) The trainer's own streaming pipeline (``streaming.StreamSource``, one worker) on the Ray this process is
    connected to: the epoch's order drawn from ``seed``, Ray Data tasks decoding and augmenting, uint8 across the
    object store and normalised here, as a training worker receives its batches."""
    from finetune_trainer.image_folder import StreamedImages
    from finetune_trainer.streaming import StreamSource

    started = time.perf_counter()
    images = StreamedImages(list(zip(paths, labels, strict=True)), transform)
    source = StreamSource(images, images, seed=seed, rank=0, world=1, per_worker=BATCH)
    source.set_epoch(1)
    return _consume(iter(source.train), limit, started)


# ------------------------------------------------------------------------------------------ helpers
def list_folder(uri: str) -> tuple[list[str], list[int], list[str]]:
    """The streaming side's listing: every ``*.jpg`` under ``uri`` (local or s3://), labels from the folder names."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    found = sorted(p for p in fs.find(root) if p.lower().endswith((".jpg", ".jpeg")))
    classes = sorted({p.rsplit("/", 2)[-2] for p in found})
    index = {name: k for k, name in enumerate(classes)}
    prefix = "s3://" if uri.startswith("s3://") else ""
    return [prefix + p for p in found], [index[p.rsplit("/", 2)[-2]] for p in found], classes


def standard_transform() -> Any:
    from finetune_operator.api.contract import TrainerConfig
    from finetune_trainer.data import build_input_spec, train_transform

    cfg = TrainerConfig.model_validate(
        {
            "jobName": "ingest-bench",
            "outputRoot": "/out",
            "spec": {
                "model": {"name": "resnet50", "weights": "IMAGENET1K_V2"},
                "dataset": {"format": "imagefolder", "trainUri": "/data", "imageSize": 224},
                "output": {"uri": "/out"},
            },
        }
    )
    return train_transform(build_input_spec(cfg), "standard")


def start_ray(workers: int, env: dict[str, str]) -> None:
    import ray

    os.environ.update(env)
    # address="local": a Ray of its own, never one already running on the machine (ray.init would join it)
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    _quiet_ray_data()


def _quiet_ray_data() -> None:
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per dataset executed
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


# -------------------------------------------------------------------------------------------- parts
def part_ingest(args: argparse.Namespace, folder: Path, transform: Any) -> dict[str, Any]:
    """Part 1: (a) and (b) alternated ``--reps`` times on the same folder and cores."""
    paths, labels, _ = list_folder(str(folder))
    samples = list(zip(paths, labels, strict=True))
    limit = min(args.ingest_images, len(paths) - 2 * BATCH)
    runs: dict[str, list[float]] = {"dataloader": [], "ray_data": []}
    for rep in range(args.reps):
        order = ("dataloader", "ray_data") if rep % 2 == 0 else ("ray_data", "dataloader")
        for side in order:
            if side == "dataloader":
                run = dataloader_images_per_second(samples, transform, workers=args.workers, limit=limit, seed=rep)
            else:
                run = ray_data_images_per_second(paths, labels, transform=transform, limit=limit, seed=rep)
            runs[side].append(run.steady_images_per_s)
            print(
                f"  ingest rep {rep + 1} {side:<10}: {run.steady_images_per_s:7.1f} images/s "
                f"({run.images} images, first batch after {run.first_batch_s:.1f} s)",
                flush=True,
            )
    dl, rd = sorted(runs["dataloader"])[len(runs["dataloader"]) // 2], sorted(runs["ray_data"])[len(runs["ray_data"]) // 2]
    ratio = rd / dl if dl else 0.0
    print(
        f"ratio ingest ray-data ÷ dataloader: {ratio:.2f}× ({rd:.1f} ÷ {dl:.1f} images/s, {args.workers} cores, "
        f"{len(paths)} files, medians of {args.reps}; target ≥ {TARGET:.1f}×)",
        flush=True,
    )
    return {"files": len(paths), "images_per_rep": limit, "runs": runs, "ratio": ratio}


def _first_batch(side: str, uri: str, transform: Any, workers: int, exclude: Sequence[int], batches: int) -> dict[str, Any]:
    """One row of part 2: ``side`` from ``uri`` to its first batch, then ``batches`` more (memory in steady state)."""
    import ray

    from finetune_trainer.download_cache import fetch_to_cache
    from finetune_trainer.image_folder import class_folders, scan_images

    row: dict[str, Any] = {"side": side, "uri": uri}
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    disk_before = ingest_data.du(session)
    idle = ingest_data.TreeMemory(exclude)
    idle.sample()  # what the tree holds before the job: Ray's daemons and idle workers
    with tempfile.TemporaryDirectory(prefix="ingest-cache-") as cache, ingest_data.TreeMemory(exclude) as mem:
        started = time.perf_counter()
        if side == "dataloader":
            root = uri
            if uri.startswith("s3://"):
                root = fetch_to_cache(uri, cache)
                row["download_s"] = time.perf_counter() - started
            classes = class_folders("trainUri", uri, root)
            samples = scan_images("trainUri", uri, root, classes)
            row["listed_s"] = time.perf_counter() - started
            run = dataloader_images_per_second(samples, transform, workers=workers, limit=batches * BATCH)
        else:
            paths, labels, _ = list_folder(uri)
            row["listed_s"] = time.perf_counter() - started
            run = ray_data_images_per_second(paths, labels, transform=transform, limit=batches * BATCH)
        row["first_batch_s"] = run.first_batch_at - started
        row["disk_bytes"] = ingest_data.du(Path(cache)) + max(0, ingest_data.du(session) - disk_before)
    row.update(
        private_bytes=mem.private_kb * 1024,
        idle_private_bytes=idle.private_kb * 1024,
        shared_bytes=mem.shared_kb * 1024,
        processes=mem.processes,
    )
    return row


def part_first_batch(args: argparse.Namespace, folders: dict[int, Path], transform: Any, s3: Any) -> list[dict[str, Any]]:
    """Part 2: every size, local then S3 (sizes uploaded within ``--s3-upload-budget`` seconds), both sides."""
    rows: list[dict[str, Any]] = []
    uploaded: dict[int, str] = {}
    if s3 is not None:
        import boto3

        client = boto3.client(
            "s3", endpoint_url=s3.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        )
        rate = 0.0
        for n in sorted(folders):
            if rate and n / rate > args.s3_upload_budget:
                print(
                    f"  s3: {n} files not uploaded: ~{n / rate:.0f} s at {rate:.0f} objects/s measured "
                    f"(> --s3-upload-budget {args.s3_upload_budget:.0f} s)",
                    flush=True,
                )
                continue
            seconds = ingest_data.upload(client, "bench", f"d{n}", folders[n], n)
            rate = n / seconds
            print(f"  s3: uploaded {n} files in {seconds:.1f} s ({rate:.0f} objects/s)", flush=True)
            uploaded[n] = f"s3://bench/d{n}"
    exclude = [s3.proc.pid] if s3 is not None else []
    # Warm-up, not recorded: the first pipeline of each kind pays for worker start-up and imports; a cluster's
    # job would too, but once, not per dataset size.
    smallest = folders[min(folders)]
    for side in ("dataloader", "ray_data"):
        _first_batch(side, str(smallest), transform, args.workers, exclude, 1)
    for store, uris in (("local", {n: str(p) for n, p in folders.items()}), ("s3", uploaded)):
        for n in sorted(uris):
            for side in ("dataloader", "ray_data"):
                row = _first_batch(side, uris[n], transform, args.workers, exclude, args.batches_after_first)
                row.update(store=store, files=n)
                rows.append(row)
                extra = f", download {row['download_s']:.1f} s" if "download_s" in row else ""
                print(
                    f"  first batch {store:<5} {n:>6} files {side:<10}: {row['first_batch_s']:6.1f} s "
                    f"(listing {row['listed_s']:.1f} s{extra}); disk written {mib(row['disk_bytes'])}, "
                    f"private memory {mib(row['private_bytes'])} ({mib(row['private_bytes'] - row['idle_private_bytes'])} above "
                    f"idle), object store {mib(row['shared_bytes'])}",
                    flush=True,
                )
    for store in ("local", "s3"):
        for side in ("dataloader", "ray_data"):
            mine = sorted((r for r in rows if r["store"] == store and r["side"] == side), key=lambda r: r["files"])
            if len(mine) >= 2:
                print(
                    f"ratio first batch {store} {side} {mine[-1]['files']} ÷ {mine[0]['files']} files: "
                    f"{mine[-1]['first_batch_s'] / mine[0]['first_batch_s']:.2f}× (target flat: 1×)",
                    flush=True,
                )
    return rows


def part_scale_out(args: argparse.Namespace, folder: Path, transform: Any) -> dict[str, Any]:
    """Part 3: the Ray Data pipeline on a 1-CPU head, then with a 1-CPU node added (in the main thread)."""
    import ray
    from ray.cluster_utils import Cluster

    paths, labels, _ = list_folder(str(folder))
    limit = min(args.scale_images, len(paths) - 2 * BATCH)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        _quiet_ray_data()
        one = ray_data_images_per_second(paths, labels, transform=transform, limit=limit)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        two = ray_data_images_per_second(paths, labels, transform=transform, limit=limit, seed=1)
    finally:
        ray.shutdown()
        cluster.shutdown()
    ratio = two.steady_images_per_s / one.steady_images_per_s if one.steady_images_per_s else 0.0
    print(
        f"ratio scale-out head + CPU node ÷ head alone: {ratio:.2f}× ({two.steady_images_per_s:.1f} ÷ "
        f"{one.steady_images_per_s:.1f} images/s, {limit} images each; target > 1×)",
        flush=True,
    )
    return {"head_only": asdict(one), "with_node": asdict(two), "ratio": ratio}


# --------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ingest-bench",
        help="generated folders are kept here between runs",
    )
    p.add_argument("--workers", type=int, default=2, help="cores of both pipelines (DataLoader workers, Ray CPUs)")
    p.add_argument("--ingest-files", type=int, default=20_000)
    p.add_argument("--ingest-images", type=int, default=20_000, help="images timed per side and repetition")
    p.add_argument("--sizes", default="2000,20000,100000", help="dataset sizes of the first-batch part")
    p.add_argument(
        "--s3-upload-budget",
        type=float,
        default=300.0,
        help="seconds an upload to moto may take; larger sizes are left out of the S3 rows",
    )
    p.add_argument("--batches-after-first", type=int, default=10)
    p.add_argument("--scale-images", type=int, default=3_000)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--only", default="ingest,first-batch,scale-out")
    p.add_argument("--quick", action="store_true", help="a few hundred images: checks the script, measures nothing")
    p.add_argument("--json", type=Path)
    p.add_argument("--serve-s3", metavar="BUCKET", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_s3:
        ingest_data.serve_s3(args.serve_s3)
        return 0
    if args.quick:
        args.ingest_files, args.ingest_images, args.sizes = 200, 128, "100,200"
        args.batches_after_first, args.scale_images = 1, 128
    # Ray's workers import the checkout's packages too, and no token auth for a stand-in cluster.
    env = {
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), str(REPO / "operator"), os.environ.get("PYTHONPATH", "")]),
    }
    os.environ.update(env)
    parts = set(args.only.split(","))
    sizes = sorted(int(s) for s in args.sizes.split(","))
    largest = max([*sizes, args.ingest_files])
    load = os.getloadavg()
    print(
        f"ingest bench: {args.workers} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
        f"{os.cpu_count()} CPUs on the machine, workdir {args.workdir}",
        flush=True,
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    full = ingest_data.generate_folder(args.workdir, largest, max(1, os.cpu_count() or 1))
    folders = {n: ingest_data.subset_folder(args.workdir, full, largest, n) for n in {*sizes, args.ingest_files}}
    print(f"dataset: {largest} JPEGs, {mib(ingest_data.du(full))} on disk", flush=True)
    transform = standard_transform()
    result: dict[str, Any] = {"workers": args.workers, "load_before": load, "quick": args.quick}
    s3 = ingest_data.S3Child(Path(__file__), "bench") if "first-batch" in parts else None
    try:
        import ray

        start_ray(args.workers, s3.env if s3 else {})
        try:
            if "ingest" in parts:
                result["ingest"] = part_ingest(args, folders[args.ingest_files], transform)
            if "first-batch" in parts:
                result["first_batch"] = part_first_batch(args, {n: folders[n] for n in sizes}, transform, s3)
        finally:
            ray.shutdown()
    finally:
        if s3 is not None:
            s3.close()
    if "scale-out" in parts:
        result["scale_out"] = part_scale_out(args, folders[min(sizes[-1], args.ingest_files)], transform)
    result["load_after"] = os.getloadavg()
    print(f"load average after: {' '.join(f'{x:.1f}' for x in result['load_after'])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
