"""The object-store listing class folder by class folder (``listing._find_all``): the same classes, samples, order
and errors as the one sequential ``fs.find(prefix)`` it replaced, on moto's S3 server, for every layout rule; the
class folders really listed at the same time; a listing error in one class folder still one line."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
from botocore.exceptions import ClientError

from finetune_trainer import listing
from finetune_trainer.errors import TrainerError
from tests.support.s3 import S3, s3_server

KEYS = {
    "listing": [
        # classes out of order, files before sub-folders, dot files and folders, a non-image, console "folders"
        *("ok/cat/1.png", "ok/cat/2.JPG", "ok/cat/.thumbs/t.png", "ok/cat/._1.png", "ok/cat/notes.txt", "ok/cat/"),
        *("ok/dog/z.png", "ok/dog/a.png", "ok/dog/sub/b.png", "ok/dog/sub/deeper/c.jpeg", "ok/dog/sub/.dot/y.png"),
        *("ok/.hidden/x.png", "ok/beside.png", "ok/emu/"),
        *(f"many/c{k:02d}/{i}.png" for k in range(40) for i in range(3)),  # more folders than LISTING_CONCURRENCY
        *("empty/cat/1.png", "empty/dog/readme.txt"),
        *("nocls/.git/x.png", "nocls/a.png"),
        "marker/",
        *("train/cat/1.png", "train2/dog/1.png"),  # a prefix is a folder, not a stem
        *("dbl/cat/1.png", "dbl//x.png", "dbl//odd/y.png", "dbl/cat//z.png"),  # empty key segments
    ],
    "whole": ["cat/1.png", "dog/2.png"],
    "hollow": [],
}

CASES: list[tuple[str, tuple[list[str], int] | str]] = [
    ("s3://listing/ok", (["cat", "dog"], 6)),
    ("s3://listing/ok/", (["cat", "dog"], 6)),
    ("s3://listing/many", ([f"c{k:02d}" for k in range(40)], 120)),
    ("s3://listing/train", (["cat"], 1)),
    ("s3://listing/dbl", (["cat", "odd"], 3)),
    ("s3://whole", (["cat", "dog"], 2)),
    ("s3://listing/empty", r"^dataset\.trainUri: class folder s3://listing/empty/dog holds no images \(.*\); add some"),
    ("s3://listing/nocls", r"^dataset\.trainUri: s3://listing/nocls holds no class folders; expected one sub-folder"),
    ("s3://listing/marker", r"^dataset\.trainUri: s3://listing/marker holds no class folders"),
    ("s3://listing/ok/beside.png", r"^dataset\.trainUri: s3://listing/ok/beside\.png holds no class folders"),
    ("s3://listing/nope", r"^dataset\.trainUri: s3://listing/nope: no such prefix \(no objects under it\)$"),
    ("s3://hollow", r"^dataset\.trainUri: s3://hollow: no such prefix"),
    ("s3://missing/data", r"^dataset\.trainUri: s3://missing/data: no such prefix"),
]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server(*KEYS) as server:
        for bucket, keys in KEYS.items():
            for key in keys:
                server.client.put_object(Bucket=bucket, Key=key, Body=b"" if key.endswith("/") else b"x")
        yield server


def outcome(uri: str) -> tuple[list[str], list[tuple[str, int]]] | str:
    """What a job gets from ``uri``: (classes, samples) or the one-line error."""
    try:
        return listing.list_image_folder("trainUri", uri)
    except TrainerError as e:
        return str(e)


def sequential(uri: str) -> tuple[list[str], list[tuple[str, int]]] | str:
    """The listing as it was: one ``fs.find`` of the whole prefix, the same rules applied to it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(listing, "_find_all", lambda fs, prefix: fs.find(prefix))
        return outcome(uri)


@pytest.mark.parametrize(("uri", "expected"), CASES, ids=[uri.removeprefix("s3://") for uri, _ in CASES])
def test_the_parallel_listing_gives_what_one_find_of_the_prefix_gives(
    s3: S3, uri: str, expected: tuple[list[str], int] | str
) -> None:
    got = outcome(uri)
    assert got == sequential(uri)
    if isinstance(expected, str):
        assert isinstance(got, str), got
        assert "\n" not in got
        assert re.match(expected, got), got
    else:
        assert not isinstance(got, str), got
        classes, samples = got
        assert (classes, len(samples)) == expected


def test_the_parallel_listing_keeps_the_walk_order_and_the_labels(s3: S3) -> None:
    got = outcome("s3://listing/ok")
    assert not isinstance(got, str), got
    assert [(path.removeprefix("s3://listing/ok/"), label) for path, label in got[1]] == [
        ("cat/1.png", 0),
        ("cat/2.JPG", 0),
        ("dog/a.png", 1),
        ("dog/z.png", 1),
        ("dog/sub/b.png", 1),
        ("dog/sub/deeper/c.jpeg", 1),
    ]


def test_the_parallel_listing_finds_every_object_one_find_finds(s3: S3) -> None:
    fs, _ = fsspec.core.url_to_fs("s3://listing")
    fs.invalidate_cache()
    assert listing._find_all(fs, "listing") == sorted(fs.find("listing"))
    fs.invalidate_cache()


@pytest.mark.parametrize(
    ("denied", "both"),
    [("ok/dog/", False), ("ok/", True)],
    ids=["one-class-folder", "the-prefix"],
)
def test_a_listing_error_fails_in_one_line_naming_the_field_and_the_uri(
    s3: S3, monkeypatch: pytest.MonkeyPatch, denied: str, both: bool
) -> None:
    """An S3 403 on the listing requests under ``denied`` (through s3fs's own translation of botocore's error)."""
    fs, _ = fsspec.core.url_to_fs("s3://listing/ok")
    real = fs._call_s3

    async def call_s3(method: str, *args: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("Prefix", "")).startswith(denied):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, method)
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", call_s3)
    got = outcome("s3://listing/ok")
    assert isinstance(got, str), got
    assert got.startswith("dataset.trainUri: s3://listing/ok: cannot list: PermissionError: ")
    assert got.endswith("Access Denied") and "\n" not in got
    if both:
        assert sequential("s3://listing/ok") == got


# ------------------------------------------------------------------------------------------------ concurrency
@pytest.fixture
def memory_folder() -> Iterator[Any]:
    fs = fsspec.filesystem("memory")
    for k in range(12):
        fs.pipe(f"/overlap/ds/c{k:02d}/0.png", b"x")
    yield fs
    fs.rm("/overlap", recursive=True)


def test_class_folders_are_listed_at_the_same_time_and_no_more_than_the_bound(
    memory_folder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each folder's ``find`` waits at a barrier for ``LISTING_CONCURRENCY`` of them to be in flight: listed one
    after the other, the first would wait alone until the barrier's timeout broke the listing."""
    bound, calls, lock = 4, [], threading.Lock()
    monkeypatch.setattr(listing, "LISTING_CONCURRENCY", bound)
    barrier = threading.Barrier(bound, timeout=20)
    in_flight = peak = 0
    real = memory_folder.find

    def find(path: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
            calls.append(path)
        try:
            barrier.wait()
            return real(path, *args, **kwargs)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(memory_folder, "find", find)
    classes, samples = listing._list_remote("trainUri", "memory://overlap/ds")
    assert peak == bound
    assert sorted(calls) == [f"/overlap/ds/c{k:02d}" for k in range(12)]
    assert classes == [f"c{k:02d}" for k in range(12)] and len(samples) == 12


def test_a_class_folder_deleted_between_the_two_listings_is_left_out(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted after the prefix was listed: s3fs's ``find`` of it gives [], as a listing made after would."""
    s3.client.put_object(Bucket="listing", Key="gone/cat/1.png", Body=b"x")
    s3.client.put_object(Bucket="listing", Key="gone/dog/1.png", Body=b"x")
    fs, _ = fsspec.core.url_to_fs("s3://listing/gone")
    real = fs.find

    def find(path: str, *args: Any, **kwargs: Any) -> Any:
        if path.endswith("/dog"):
            s3.client.delete_object(Bucket="listing", Key="gone/dog/1.png")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fs, "find", find)
    assert outcome("s3://listing/gone") == (["cat"], [("s3://listing/gone/cat/1.png", 0)])


def test_a_class_folder_whose_listing_fails_with_not_found_fails_the_listing(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 404 (NoSuchBucket: the bucket deleted, a proxy's 404) on a class folder's listing, which s3fs raises as
    FileNotFoundError: the class must not vanish from the classes (every label after it would shift)."""
    fs, _ = fsspec.core.url_to_fs("s3://listing/ok")
    real = fs._call_s3

    async def call_s3(method: str, *args: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("Prefix", "")).startswith("ok/cat/"):
            raise ClientError({"Error": {"Code": "NoSuchBucket", "Message": "The specified bucket does not exist"}}, method)
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", call_s3)
    got = outcome("s3://listing/ok")
    assert isinstance(got, str), got
    assert re.match(r"^dataset\.trainUri: s3://listing/ok: cannot list: .*listing/ok/cat.*bucket does not exist$", got), got
    assert "\n" not in got
