"""The rows a streaming epoch decodes, built where they are decoded: ``SampleTable`` packs a listing (paths and
labels) into NumPy arrays put once in Ray's object store, and ``PositionRows`` is the Ray Data datasource whose read
tasks turn a slice of an epoch's positions into ``{path, label, key}`` rows, in the same task as the decoding
(Ray Data fuses the read into ``map_batches`` when both ask for the same resources).

Why not ``ray.data.from_items``: it built every epoch's rows as Python dicts in the training worker and put them block
by block (1,563 objects for 100k images, 1.75 s) before the first task could start. Here the worker puts the table
once per run and the positions once per epoch, and the read tasks ``ray.get`` them zero-copy from the node's shared
memory. Ray Data still puts each read task before the first runs (~0.5 ms each), so the start grows a little with
the epoch: bench/README.md, "The start grows little with the dataset now".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

__all__ = ["PositionRows", "SampleTable", "pieces"]


def pieces(count: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``count`` rows cut every ``size``, a last piece shorter than half of ``size`` joined to the
    one before. Why: an epoch's last block could hold a single image, and a training block with nothing readable has
    nothing to replace its images with (``unreadable.fill_unreadable``): one unreadable image among thousands, shuffled
    there, failed the job."""
    starts = list(range(0, count, size))
    if not starts:
        return []
    if len(starts) > 1 and count - starts[-1] < (size + 1) // 2:
        starts.pop()
    return list(zip(starts, [*starts[1:], count], strict=True))


class SampleTable:
    """``(path, label)`` samples as three arrays: the UTF-8 paths end to end, where each ends, and the labels. File names
    that are not UTF-8 (``os.walk`` gives them as surrogate escapes) survive the round trip."""

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        encoded = [path.encode("utf-8", "surrogateescape") for path, _ in samples]
        self.ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
        self.text = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
        self._ref: Any = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict[str, Any]:
        return {"ends": self.ends, "text": self.text, "labels": self.labels, "_ref": None}

    def path(self, index: int) -> str:
        start = int(self.ends[index - 1]) if index else 0
        return self.text[start : int(self.ends[index])].tobytes().decode("utf-8", "surrogateescape")

    def placed(self) -> Any:
        """This table's ObjectRef, put on the first call only (the listing crosses to the object store once a run)."""
        if self._ref is None:
            import ray

            self._ref = ray.put(self)
        return self._ref


def _rows(table: Any, positions: Any, start: int, stop: int) -> list[pd.DataFrame]:
    """Rows ``start:stop`` of an epoch, in a read task: ``key`` is the position (it seeds the image's augmentation),
    the sample is ``key`` modulo the table (a list repeated ``passes`` times, as ``loaders``' Subset). A pandas block:
    its object column keeps a path Arrow's strings refuse (a surrogate-escaped, non-UTF-8 file name)."""
    import ray

    if isinstance(table, ray.ObjectRef):
        table, positions = ray.get([table, positions])
    keys = np.asarray(positions[start:stop], dtype=np.int64)
    index = keys % len(table)
    paths = [table.path(int(i)) for i in index]
    return [pd.DataFrame({"path": pd.Series(paths, dtype=object), "label": table.labels[index], "key": keys})]


class PositionRows(Datasource):
    """An epoch's rows of ``table`` in ``positions`` order, ``task_rows`` to a read task. ``table`` and ``positions``:
    ObjectRefs (a run) or the objects themselves (tests, no Ray).

    Why not one small task a block: Ray Data puts every read task in the object store before the first one runs
    (~0.5 ms each here): 1.4 s at 100k images in blocks of 64, growing with the dataset. A task's rows are decoded
    and sent on a block at a time (``streaming``), so a larger task does not delay the first batch."""

    def __init__(self, table: Any, positions: Any, count: int, task_rows: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.table, self.positions, self.count, self.task_rows = table, positions, count, task_rows

    def estimate_inmemory_data_size(self) -> int:
        return self.count * 80  # a path and two integers per row: a guess Ray Data only uses for its own plans

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None) -> list[ReadTask]:
        # ``parallelism`` is what ``override_num_blocks`` asked for; the cut is fixed here.
        table, positions = self.table, self.positions
        tasks = []
        for start, stop in pieces(self.count, self.task_rows):

            def read(start: int = start, stop: int = stop) -> Iterable[pd.DataFrame]:
                return _rows(table, positions, start, stop)

            size = (stop - start) * 80
            tasks.append(ReadTask(read, BlockMetadata(num_rows=stop - start, size_bytes=size, input_files=None, exec_stats=None)))
        return tasks
