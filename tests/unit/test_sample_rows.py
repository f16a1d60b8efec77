"""The streaming path's rows built in the read tasks (``sample_rows``): the same rows ``from_items`` was given before,
whatever the cut into tasks, names that are not plain ASCII, and a listing repeated ``passes`` times; then decoded a
block at a time (``streaming.BlockDecoder``). No Ray runtime: the read tasks are run here, as a Ray Data task runs them,
on the objects themselves."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from finetune_trainer.data import eval_transform
from finetune_trainer.inputs import InputSpec
from finetune_trainer.sample_rows import PositionRows, SampleTable
from finetune_trainer.streaming import _RAW_ROW_BYTES, BlockDecoder, _row_bytes, split_finish

SAMPLES = [
    ("/data/cat/1.jpg", 0),
    ("s3://bucket/dog/été.jpg", 1),
    ("/data/dog/\udcff-not-utf8.png", 1),  # os.walk's surrogate escape of a byte that is not UTF-8
    ("s3://bucket/x::y/2.jpeg", 2),
    ("", 0),
]


def read_all(table: Any, positions: np.ndarray, task_rows: int) -> dict[str, list[Any]]:
    tasks = PositionRows(table, positions, len(positions), task_rows).get_read_tasks(parallelism=1)
    out: dict[str, list[Any]] = {"path": [], "label": [], "key": []}
    for task in tasks:
        for block in task():
            for column in out:
                out[column].extend(block[column].tolist())
    return out


def test_a_table_gives_back_every_path_and_label() -> None:
    table = SampleTable(SAMPLES)
    assert len(table) == len(SAMPLES)
    assert [(table.path(i), int(table.labels[i])) for i in range(len(table))] == SAMPLES


def test_a_pickled_table_leaves_its_object_ref_behind() -> None:
    table = SampleTable(SAMPLES)
    table._ref = object()  # what placed() keeps: a worker's ObjectRef, meaningless in another process
    copy = pickle.loads(pickle.dumps(table))
    assert copy._ref is None
    assert [copy.path(i) for i in range(len(copy))] == [path for path, _ in SAMPLES]


@pytest.mark.parametrize("task_rows", [1, 3, 8, 1024])
@pytest.mark.parametrize("passes", [1, 3])
def test_the_read_tasks_build_the_rows_from_items_was_given(task_rows: int, passes: int) -> None:
    table = SampleTable(SAMPLES)
    positions = np.random.default_rng(7).permutation(len(SAMPLES) * passes)
    got = read_all(table, positions, task_rows)
    # The rows as StreamSource built them before: the sample at position % n, keyed by the position.
    expected = [{"path": SAMPLES[p % len(SAMPLES)][0], "label": SAMPLES[p % len(SAMPLES)][1], "key": int(p)} for p in positions]
    assert [dict(zip(got, row, strict=True)) for row in zip(*got.values(), strict=True)] == expected


def test_tasks_are_cut_at_task_rows_and_say_their_row_counts() -> None:
    positions = np.arange(10)
    tasks = PositionRows(SampleTable(SAMPLES), positions, 10, task_rows=4).get_read_tasks(parallelism=99)
    assert [task.metadata.num_rows for task in tasks] == [4, 4, 2]
    assert [sum(len(block) for block in task()) for task in tasks] == [4, 4, 2]


def test_an_empty_epoch_has_no_read_task() -> None:
    assert PositionRows(SampleTable(SAMPLES), np.arange(0), 0, 1024).get_read_tasks(parallelism=1) == []


# ------------------------------------------------------------------------------- a task's rows, decoded a block at a time
def test_a_read_tasks_rows_are_decoded_and_handed_on_a_block_at_a_time() -> None:
    calls: list[list[int]] = []

    def decoder(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(batch["key"].tolist())
        return {"image": batch["key"] * 10, "label": batch["label"]}

    batch = {"key": np.arange(10), "label": np.arange(10) % 3, "path": np.asarray([f"/p/{i}" for i in range(10)], dtype=object)}
    out = BlockDecoder(decoder, 4)(batch)  # type: ignore[arg-type]
    first = next(out)
    assert calls == [[0, 1, 2, 3]]  # the first block is out before the next is decoded
    rest = list(out)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert np.concatenate([b["image"] for b in [first, *rest]]).tolist() == [k * 10 for k in range(10)]


@pytest.mark.parametrize(("raw", "expected"), [(False, 3 * 16 * 16), (True, _RAW_ROW_BYTES)])
def test_a_decoded_row_is_measured_from_the_preset_it_goes_through(raw: bool, expected: int) -> None:
    spec = InputSpec(
        image_size=16, resize_size=18, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", grayscale_to_rgb=True
    )
    per_image, _ = split_finish(eval_transform(spec))  # what crosses the object store: uint8, 3 x 16 x 16
    assert _row_bytes(per_image, raw) == expected
