"""Class folder and file names another tenant can write: a control character in a name still gives a one-line
error (the whole line survives a DataLoader worker's or Ray's re-raise, after which the first line only is kept);
two class folders whose names are one name in two Unicode forms (NFC and NFD 'é': they look the same everywhere)
are refused, on a local folder and on S3 alike, and a validation class in the other form than the training one is
named as such."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest

from finetune_trainer.errors import TrainerError, find_user_error
from finetune_trainer.image_folder import class_folders, same_classes, scan_images
from finetune_trainer.listing import list_image_folder
from tests.support.s3 import s3_server

NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


def _error(call: object) -> str:
    with pytest.raises(TrainerError) as info:
        call()  # type: ignore[operator]
    return str(info.value)


def _tree(root: Path, files: list[str]) -> str:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    return str(root)


def _scan(root: str) -> object:
    return scan_images("trainUri", root, root, class_folders("trainUri", root, root))


NAMES = {
    "newline-in-an-empty-class": (
        list_image_folder,
        ["cat/1.png", "new\nline/readme.txt"],
        r"class folder .*/new\\nline holds no",
    ),
    "line-separator-in-a-class": (list_image_folder, ["cat/1.png", "a\u2028b/readme.txt"], r"class folder .*/a\\u2028b holds no"),
    "carriage-return": (list_image_folder, ["cat/1.png", "x\ry/readme.txt"], r"class folder .*/x\\ry holds no images"),
    "newline-in-an-unreadable-file": (_scan, ["cat/bad\nfile.png"], r"cannot be read \(e\.g\. .*/cat/bad\\nfile\.png: "),
}


@pytest.mark.parametrize(("call", "files", "expected"), list(NAMES.values()), ids=list(NAMES))
def test_a_control_character_in_a_name_keeps_the_error_on_one_line(
    tmp_path: Path, call: Callable[..., object], files: list[str], expected: str
) -> None:
    root = _tree(tmp_path, files)
    message = _error(lambda: call("trainUri", root) if call is list_image_folder else call(root))
    assert message.startswith("dataset.trainUri: ") and len(message.splitlines()) == 1, message
    assert re.search(expected, message), message
    # Raised in a DataLoader worker, the message comes back inside a traceback's text: the driver finds it whole.
    wrapped = TrainerError(
        f"Caught TrainerError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        f"  File ...\nfinetune_trainer.errors.TrainerError: {message}"
    )
    found = find_user_error(wrapped)
    assert found is not None and str(found) == message


def test_twin_class_folders_on_a_local_folder_are_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path, [f"{NFC}/1.png", f"{NFD}/2.png", "dog/3.png"])
    message = _error(lambda: list_image_folder("trainUri", root))
    assert message.startswith("dataset.trainUri: class folders ") and "\\xe9" in message and "\\u0301" in message, message


def test_twin_class_folders_on_s3_are_refused() -> None:
    with s3_server("twins") as s3:
        for key in (f"t/{NFC}/1.png", f"t/{NFD}/2.png", "t/dog/3.png"):
            s3.client.put_object(Bucket="twins", Key=key, Body=b"x")
        message = _error(lambda: list_image_folder("trainUri", "s3://twins/t"))
    assert message.startswith("dataset.trainUri: class folders ") and "\\xe9" in message and "\\u0301" in message, message


def test_a_validation_class_in_the_other_unicode_form_is_named_as_such() -> None:
    message = _error(lambda: same_classes(["bird", NFC], ["bird", NFD]))
    assert message.startswith("dataset.validationUri: its classes differ from dataset.trainUri's")
    assert "'caf\\xe9'" in message and "'cafe\\u0301'" in message, message


def test_validation_classes_that_differ_by_the_thousand_give_a_short_line() -> None:
    message = _error(lambda: same_classes([f"a{i:05d}" for i in range(50_000)], [f"b{i:05d}" for i in range(50_000)]))
    assert len(message) < 400 and "\n" not in message, message[:300]
    assert message.startswith("dataset.validationUri: its classes differ from dataset.trainUri's: missing ['a00000', ")
