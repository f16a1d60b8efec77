"""The ingest benchmark's pieces that are not pipelines: the generated ImageFolder (``generate_folder``), the
moto S3 server in its own process (``S3Child``) and the memory and disk figures (``TreeMemory``, ``du``).

The images are photo-like for a 224-px pipeline: 256-320 px per side (random aspect), a colour gradient under
smooth blotches and fine grain, JPEG quality 85, about 16 KB each (12-19 KB). Generation is cheap on purpose
(textures made once per process, each image a random crop of one plus its own gradient): 100k images take a
few minutes on two cores. Files are ``class_KK/img_NNNNNN.jpg`` with image i in class ``i % classes``, so the
first n images of the largest folder are a smaller dataset: smaller folders are hard links into the largest
one (no extra disk). A folder is complete when its ``.complete`` marker exists (a dot file: not data).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = 10
MARKER = ".complete"
_TEXTURE = 400  # px: larger than the largest image, so that any crop fits
_TEXTURES = 16


def image_path(root: Path, i: int) -> Path:
    return root / f"class_{i % CLASSES:02d}" / f"img_{i:06d}.jpg"


def _textures(rng: np.random.Generator) -> list[Any]:
    from PIL import Image

    out = []
    for _ in range(_TEXTURES):
        low = rng.uniform(0, 255, (_TEXTURE // 24, _TEXTURE // 24, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((_TEXTURE, _TEXTURE), Image.Resampling.BICUBIC), np.float32)
        out.append((0.6 * (smooth - 128) + rng.normal(0, 6, smooth.shape)).astype(np.float32))
    return out


def _write_range(root: str, start: int, stop: int) -> int:
    """Writes images start..stop-1 that are not there yet (a killed generation resumes); returns bytes written."""
    from PIL import Image

    rng = np.random.default_rng(start)
    textures = _textures(rng)
    written = 0
    for i in range(start, stop):
        path = image_path(Path(root), i)
        if path.exists():
            continue
        w, h = (int(v) for v in rng.integers(256, 321, 2))
        tex = textures[int(rng.integers(_TEXTURES))]
        y0, x0 = int(rng.integers(0, _TEXTURE - h)), int(rng.integers(0, _TEXTURE - w))
        colours = rng.uniform(0, 255, (3, 3)).astype(np.float32)
        gy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        gx = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
        img = colours[0] * (1 - gy) + colours[1] * gy * (1 - gx) + colours[2] * gx * gy + tex[y0 : y0 + h, x0 : x0 + w]
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)  # a half-written file never carries the final name
        written += buf.tell()
    return written


def generate_folder(workdir: Path, n: int, procs: int) -> Path:
    """``workdir/images-<n>``, generated in ``procs`` processes unless already complete."""
    root = workdir / f"images-{n}"
    if (root / MARKER).exists():
        return root
    for k in range(CLASSES):
        (root / f"class_{k:02d}").mkdir(parents=True, exist_ok=True)
    chunk = 2000
    started = time.perf_counter()
    with ProcessPoolExecutor(procs) as pool:
        written = sum(
            pool.map(
                _write_range,
                [str(root)] * len(range(0, n, chunk)),
                range(0, n, chunk),
                [min(s + chunk, n) for s in range(0, n, chunk)],
            )
        )
    (root / MARKER).touch()
    print(f"generated {n} JPEGs in {root} ({written / 2**20:.0f} MiB new) in {time.perf_counter() - started:.0f} s")
    return root


def subset_folder(workdir: Path, full: Path, full_n: int, n: int) -> Path:
    """The first ``n`` images of ``full`` as their own folder of hard links."""
    if n == full_n:
        return full
    root = workdir / f"images-{n}"
    if (root / MARKER).exists():
        return root
    for i in range(n):
        link = image_path(root, i)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.link(image_path(full, i), link)
    (root / MARKER).touch()
    return root


def du(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links not followed, each inode once)."""
    seen: set[int] = set()
    total = 0
    for current, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(current, name))
            if st.st_ino not in seen and not os.path.islink(os.path.join(current, name)):
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


# ------------------------------------------------------------------------------------------ memory
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _status_kb(pid: int, keys: Sequence[str]) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in out:
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


class TreeMemory:
    """Peak memory of this process and its descendants (Ray's raylet, workers, DataLoader workers), sampled
    every ``interval`` s from /proc: private memory as the peak of the summed ``RssAnon``, and shared memory
    (Ray's object store pages in use, mapped by several processes) as the peak of the largest ``RssShmem``.
    ``exclude``: pids whose subtrees are not counted (the moto server: its objects are the store's, not ours)."""

    def __init__(self, exclude: Sequence[int] = (), interval: float = 0.2) -> None:
        self.exclude, self.interval = set(exclude), interval
        self.private_kb = self.shared_kb = self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        kids, todo, pids = _children(), [os.getpid()], []
        while todo:
            pid = todo.pop()
            if pid in self.exclude:
                continue
            pids.append(pid)
            todo.extend(kids.get(pid, []))
        rows = [_status_kb(pid, ("RssAnon", "RssShmem")) for pid in pids]
        self.private_kb = max(self.private_kb, sum(r["RssAnon"] for r in rows))
        self.shared_kb = max(self.shared_kb, max((r["RssShmem"] for r in rows), default=0))
        self.processes = max(self.processes, len(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
        self.sample()


# ---------------------------------------------------------------------------------------------- S3
class S3Child:
    """moto's S3 server (``tests/support/s3.py``'s ``s3_server``) in a child process of this script, so that the
    objects it holds in memory and the CPU it spends answering are not counted as the pipeline's own."""

    def __init__(self, script: Path, bucket: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--serve-s3", bucket],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # one log line per request
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http"):
            raise RuntimeError(f"moto server did not start: {line!r}")
        self.endpoint = line
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def serve_s3(bucket: str) -> None:
    """``--serve-s3``: run the server until stdin closes, its endpoint on the first line of stdout."""
    from tests.support.s3 import s3_server

    with s3_server(bucket) as s3:
        print(s3.endpoint, flush=True)
        sys.stdin.read()


def upload(client: Any, bucket: str, prefix: str, root: Path, n: int, threads: int = 16) -> float:
    """Puts images 0..n-1 of ``root`` under ``prefix``; returns the seconds it took."""
    from concurrent.futures import ThreadPoolExecutor

    def put(i: int) -> None:
        path = image_path(root, i)
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root)}", Body=path.read_bytes())

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(n)))
    return time.perf_counter() - started
