"""The streaming path's rows built in the read tasks (``sample_rows``): the same rows ``from_items`` was given before,
whatever the cut into tasks, names that are not plain ASCII, and a listing repeated ``passes`` times. No Ray runtime:
the read tasks are run here, as a Ray Data task runs them, on the objects themselves."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from finetune_trainer.sample_rows import PositionRows, SampleTable

SAMPLES = [
    ("/data/cat/1.jpg", 0),
    ("s3://bucket/dog/été.jpg", 1),
    ("/data/dog/\udcff-not-utf8.png", 1),  # os.walk's surrogate escape of a byte that is not UTF-8
    ("s3://bucket/x::y/2.jpeg", 2),
    ("", 0),
]


def read_all(table: Any, positions: np.ndarray, rows_per_task: int) -> dict[str, list[Any]]:
    tasks = PositionRows(table, positions, len(positions), rows_per_task).get_read_tasks(parallelism=1)
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


@pytest.mark.parametrize("rows_per_task", [1, 3, 64])
@pytest.mark.parametrize("passes", [1, 3])
def test_the_read_tasks_build_the_rows_from_items_was_given(rows_per_task: int, passes: int) -> None:
    table = SampleTable(SAMPLES)
    positions = np.random.default_rng(7).permutation(len(SAMPLES) * passes)
    got = read_all(table, positions, rows_per_task)
    # The rows as StreamSource built them before: the sample at position % n, keyed by the position.
    expected = [{"path": SAMPLES[p % len(SAMPLES)][0], "label": SAMPLES[p % len(SAMPLES)][1], "key": int(p)} for p in positions]
    assert [dict(zip(got, row, strict=True)) for row in zip(*got.values(), strict=True)] == expected


def test_tasks_are_cut_at_rows_per_task_and_say_their_row_counts() -> None:
    positions = np.arange(10)
    tasks = PositionRows(SampleTable(SAMPLES), positions, 10, 4).get_read_tasks(parallelism=99)
    assert [task.metadata.num_rows for task in tasks] == [4, 4, 2]
    assert [sum(len(block) for block in task()) for task in tasks] == [4, 4, 2]


def test_an_empty_epoch_has_no_read_task() -> None:
    assert PositionRows(SampleTable(SAMPLES), np.arange(0), 0, 64).get_read_tasks(parallelism=1) == []
