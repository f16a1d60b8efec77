"""Helpers the slow tier's training tests share: a small learnable ImageFolder written on disk, a bounded wait
for a file a running job writes (a checkpoint, Ray Train's checkpoint snapshot), and what two runs are compared
by (their per-epoch curves and their shipped weights)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finetune_trainer.metrics_log import EpochRecord

__all__ = ["curve", "learnable_image", "same_weights", "wait_for_path", "write_image_folder"]


def learnable_image(label: int, i: int, size: int = 32) -> Image.Image:
    """A class you can learn: bright top half for class 0, bright bottom half for the others, plus noise."""
    pixels = np.random.default_rng(100 * label + i).integers(0, 80, (size, size, 3), dtype=np.uint8)
    rows = slice(0, size // 2) if label == 0 else slice(size // 2, size)
    pixels[rows] += 150
    return Image.fromarray(pixels)


def write_image_folder(root: Path, classes: Sequence[str], per_class: int, suffix: str = ".png") -> Path:
    """``root/<class>/<nn><suffix>`` for each class, ``per_class`` images each (PIL picks the format by suffix)."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            learnable_image(label, i).save(root / name / f"{i:02d}{suffix}")
    return root


def streamed_folder(folder: Path) -> dict[str, Any]:
    """``spec.dataset`` of ``folder`` streamed with Ray Data, a quarter held out, randomly cropped and flipped every
    epoch (seeded by (seed, epoch, index): a resumed epoch must draw the same)."""
    return {
        "format": "imagefolder",
        "classes": None,
        "maxPerClass": None,
        "trainUri": str(folder),
        "validationSplit": 0.25,
        "ingest": "streaming",
        "augmentation": "standard",
    }


class BackgroundFit:
    """``fit()`` run in a thread while the test changes the cluster (Ray's ``Cluster.add_node``/``remove_node`` must
    run in the main thread): ``done`` is set once it returns or raises; ``result`` joins it and gives what it returned,
    failing the test with its error."""

    def __init__(self, fit: Callable[[], Any]) -> None:
        self.done = threading.Event()
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fit,), daemon=True)
        self._thread.start()

    def _run(self, fit: Callable[[], Any]) -> None:
        try:
            self._outcome["result"] = fit()
        except BaseException as e:  # handed to the main thread's assertions
            self._outcome["error"] = e
        finally:
            self.done.set()

    def __repr__(self) -> str:
        return f"BackgroundFit({self._outcome})"

    def result(self, timeout: float = 600) -> Any:
        self._thread.join(timeout=timeout)
        assert not self._thread.is_alive(), f"the fit did not end within {timeout} s"
        assert "error" not in self._outcome, self._outcome.get("error")
        return self._outcome["result"]


def wait_for_path(path: Path, done: threading.Event, timeout: float = 300) -> None:
    """Until ``path`` exists, ``done`` is set or ``timeout`` seconds have passed. Not a timing assertion: the
    caller asserts on what happened (e.g. that the run had not ended), never on how long it took."""
    deadline = time.monotonic() + timeout
    while not path.exists() and not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.2)


def curve(records: list[EpochRecord]) -> list[tuple[object, ...]]:
    """What a run computed, epoch by epoch (not its timings)."""
    return [(r.epoch, r.stage, r.train_loss, r.val_loss, r.val_accuracy, r.val_top5, r.lr) for r in records]


def same_weights(*run_dirs: str) -> bool:
    """Whether the runs' ``model.pt`` hold exactly the same tensors under the same names."""
    models = [torch.load(Path(run) / "model.pt", map_location="cpu", weights_only=True) for run in run_dirs]
    return all(m.keys() == models[0].keys() and all(torch.equal(m[k], models[0][k]) for k in m) for m in models[1:])
