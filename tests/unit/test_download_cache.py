"""The dataset download cache against a real S3 API: moto's server on localhost, reached by s3fs through the
endpoint botocore reads from AWS_ENDPOINT_URL (as a trainer pod reaches MinIO or another S3 endpoint).
Object GETs are counted at the server, from its request log, so the counts include other processes."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_trainer.download_cache import fetch_to_cache
from tests.support.s3 import S3, s3_server

BUCKET = "finetune-data"
REPO = Path(__file__).resolve().parents[2]
OBJECTS = {"train/cat/0.png": b"cat-0", "train/cat/1.png": b"cat-1", "train/dog/0.png": b"dog-0"}


class GetCounter(logging.Handler):
    """Counts the server's ``GET /bucket/key`` requests (object downloads, not listings: those have a query)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.paths: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r'"GET (/[^ ?]+/[^ ?]+) HTTP', record.getMessage())
        if match:
            self.paths.append(match.group(1))


@pytest.fixture(scope="module")
def server() -> Iterator[S3]:
    with s3_server(BUCKET) as s3:
        yield s3


@pytest.fixture
def s3(server: S3, tmp_path: Path) -> Iterator[tuple[object, GetCounter]]:
    client = server.client
    prefix = tmp_path.name  # one prefix per test: the module shares the server
    for key, body in OBJECTS.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=body)
    counter = GetCounter()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(counter)
    old_level = werkzeug.level
    werkzeug.setLevel(logging.INFO)
    try:
        yield client, counter
    finally:
        werkzeug.removeHandler(counter)
        werkzeug.setLevel(old_level)


def uri_of(tmp_path: Path) -> str:
    return f"s3://{BUCKET}/{tmp_path.name}/train"


def tree(root: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*.png"))}


def test_first_read_downloads_second_hits_the_cache_changed_object_downloads_again(
    s3: tuple[object, GetCounter], tmp_path: Path
) -> None:
    client, gets = s3
    cache = tmp_path / "cache"
    uri = uri_of(tmp_path)

    first = fetch_to_cache(uri, str(cache))
    assert tree(first) == {k.removeprefix("train/"): v for k, v in OBJECTS.items()}
    assert len(gets.paths) == len(OBJECTS)  # each object once

    assert fetch_to_cache(uri, str(cache)) == first
    assert len(gets.paths) == len(OBJECTS)  # the second read lists, downloads nothing

    client.put_object(Bucket=BUCKET, Key=f"{tmp_path.name}/train/dog/0.png", Body=b"dog-0, relabelled")  # type: ignore[attr-defined]
    changed = fetch_to_cache(uri, str(cache))
    assert tree(changed)["dog/0.png"] == b"dog-0, relabelled"
    assert tree(changed)["cat/0.png"] == b"cat-0"
    assert gets.paths[len(OBJECTS) :] == [f"/{BUCKET}/{tmp_path.name}/train/dog/0.png"]  # only the changed one


def test_missing_prefix_is_one_line(s3: tuple[object, GetCounter], tmp_path: Path) -> None:
    from finetune_trainer.errors import TrainerError

    with pytest.raises(TrainerError) as caught:
        fetch_to_cache(f"s3://{BUCKET}/no/such/prefix", str(tmp_path / "cache"))
    assert str(caught.value) == f"dataset: s3://{BUCKET}/no/such/prefix: no such prefix (no objects under it)"


def test_two_ranks_on_one_node_share_the_cache_without_corrupting_it(s3: tuple[object, GetCounter], tmp_path: Path) -> None:
    _, gets = s3
    cache = tmp_path / "cache"
    uri = uri_of(tmp_path)
    script = (
        "import sys; from finetune_trainer.download_cache import fetch_to_cache; print(fetch_to_cache(sys.argv[1], sys.argv[2]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")])}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", script, uri, str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], [err for _, err in outputs]
    roots = {out.strip() for out, _ in outputs}
    assert len(roots) == 1  # one copy for the node
    assert tree(roots.pop()) == {k.removeprefix("train/"): v for k, v in OBJECTS.items()}
    assert sorted(gets.paths) == sorted(f"/{BUCKET}/{tmp_path.name}/{k}" for k in OBJECTS)  # each object once, both ranks


def test_an_imagefolder_dataset_on_s3_loads_from_the_cache(s3: tuple[object, GetCounter], tmp_path: Path) -> None:
    import io

    import numpy as np
    from PIL import Image

    from finetune_operator.api.contract import TrainerConfig
    from finetune_operator.api.v1alpha1 import FineTuneJobSpec
    from finetune_trainer.data import build_datasets

    client, gets = s3
    rng = np.random.default_rng(0)
    for cls in ("ant", "bee"):
        for i in range(4):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), "RGB").save(png, format="PNG")
            client.put_object(Bucket=BUCKET, Key=f"{tmp_path.name}/insects/{cls}/{i}.png", Body=png.getvalue())  # type: ignore[attr-defined]
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {
                "trainUri": f"s3://{BUCKET}/{tmp_path.name}/insects",
                "cacheDir": str(tmp_path / "cache"),
                "validationSplit": 0.25,
                "imageSize": 16,
                "ingest": "mapStyle",  # an object store streams by default; the download is the map-style path's
            },
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    train, val, classes, _ = build_datasets(TrainerConfig(job_name="insects", spec=spec, output_root=str(tmp_path / "out")))
    assert classes == ["ant", "bee"]
    assert len(train) + len(val) == 8  # type: ignore[arg-type]
    image, label = val[0]
    assert tuple(image.shape) == (3, 16, 16) and label in (0, 1)
    assert len(gets.paths) == 8


# Layouts an S3 console or another tenant makes, read by both ingest paths: the console's "Create folder" leaves a
# zero-byte ``cat/`` object; an object may share its name with a folder; a dot segment is a dot folder.
LAYOUTS = {
    "directory-markers": ["cat/", "cat/1.png", "dog/", "dog/2.png", "emu/"],
    "object-and-folder": ["cat/b", "cat/b/c.png", "cat/1.png", "dog/1.png"],
    "dot-segment": ["cat/1.png", "cat/./2.png", "dog/1.png"],
    "dot-files-only": ["cat/1.png", "dog/.DS_Store"],
    "beside-and-hidden": ["cat/1.png", "notes.txt", ".cache/x.png", "cat/.thumbs/t.png", "cat/readme.md", "dog/1.png"],
}


@pytest.mark.parametrize("keys", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_the_download_gives_the_classes_and_images_the_listing_gives_and_fetches_no_other_object(
    s3: tuple[object, GetCounter], tmp_path: Path, keys: list[str]
) -> None:
    from finetune_trainer.errors import TrainerError
    from finetune_trainer.listing import list_image_folder

    client, gets = s3
    uri = f"s3://{BUCKET}/{tmp_path.name}/layout"
    for key in keys:
        client.put_object(Bucket=BUCKET, Key=f"{tmp_path.name}/layout/{key}", Body=b"" if key.endswith("/") else b"x")  # type: ignore[attr-defined]

    def listed() -> object:
        try:
            classes, samples = list_image_folder("trainUri", uri)
        except TrainerError as e:
            return str(e).replace(uri, "ROOT").rpartition(" holds")[0]
        return classes, [(path.removeprefix(uri + "/"), label) for path, label in samples]

    def downloaded() -> object:
        root = fetch_to_cache(uri, str(tmp_path / "cache"))
        with pytest.MonkeyPatch.context() as mp:  # the map-style path's listing, of the local copy
            mp.setattr("finetune_trainer.listing.is_object_store", lambda _: False)
            mp.setattr("finetune_trainer.listing.resolve_uri", lambda _: root)
            try:
                classes, samples = list_image_folder("trainUri", uri)
            except TrainerError as e:
                return str(e).replace(root, "ROOT").replace(uri, "ROOT").rpartition(" holds")[0]
        return classes, [(str(Path(path).relative_to(root)), label) for path, label in samples]

    assert downloaded() == listed()
    images = [k for k in keys if k.endswith(".png") and "/." not in k and k.count("/") >= 1 and not k.startswith(".")]
    assert sorted(p.rsplit("/layout/", 1)[1] for p in gets.paths) == sorted(images)


@pytest.mark.parametrize("field", ["trainUri", "validationUri"])
def test_a_download_error_names_the_dataset_field(s3: tuple[object, GetCounter], tmp_path: Path, field: str) -> None:
    import io

    from PIL import Image

    from finetune_operator.api.contract import TrainerConfig
    from finetune_operator.api.v1alpha1 import FineTuneJobSpec
    from finetune_trainer.data import build_datasets
    from finetune_trainer.errors import TrainerError

    client, _ = s3
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    for key in ("ant/0.png", "ant/1.png", "bee/0.png", "bee/1.png"):
        client.put_object(Bucket=BUCKET, Key=f"{tmp_path.name}/ok/{key}", Body=png.getvalue())  # type: ignore[attr-defined]
    ok, missing = f"s3://{BUCKET}/{tmp_path.name}/ok", f"s3://{BUCKET}/{tmp_path.name}/missing"
    uris = {"trainUri": missing, "validationUri": ok} if field == "trainUri" else {"trainUri": ok, "validationUri": missing}
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {**uris, "cacheDir": str(tmp_path / "cache"), "imageSize": 16, "ingest": "mapStyle"},
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    with pytest.raises(TrainerError) as info:
        build_datasets(TrainerConfig(job_name="j", spec=spec, output_root=str(tmp_path / "out")))
    assert str(info.value) == f"dataset.{field}: {missing}: no such prefix (no objects under it)"


def test_an_enormous_object_is_not_downloaded_and_is_counted_unreadable(
    s3: tuple[object, GetCounter], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object over MAX_IMAGE_FILE_BYTES (lowered here to 4 bytes) is not copied onto the node's disk: an empty
    file stands in for it, which the map-style scan skips and counts as it would the object."""
    from finetune_trainer import image_folder

    client, gets = s3
    monkeypatch.setattr(image_folder, "MAX_IMAGE_FILE_BYTES", 5, raising=False)  # the fixture's objects: 5 bytes each
    client.put_object(Bucket=BUCKET, Key=f"{tmp_path.name}/train/dog/big.png", Body=b"x" * 6)  # type: ignore[attr-defined]
    root = fetch_to_cache(uri_of(tmp_path), str(tmp_path / "cache"))
    assert tree(root)["dog/big.png"] == b""
    assert tree(root)["dog/0.png"] == b"dog-0"
    assert f"/{BUCKET}/{tmp_path.name}/train/dog/big.png" not in gets.paths
    assert len(gets.paths) == len(OBJECTS)
