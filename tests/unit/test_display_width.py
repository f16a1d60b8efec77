"""Values shortened for the terminal are cut to a width in columns: an East-Asian wide character (CJK, full-width
forms) takes two, a combining mark none. They were cut to a count of characters, so a shortened name of wide
characters was twice as wide as intended. Kubernetes name lengths (``naming``) stay counted as the API counts them."""

from __future__ import annotations

import json

import pytest

from finetune_operator.api.fields import display_width, quote, shorten
from finetune_operator.api.validate import iter_documents
from finetune_trainer.display import shown_name

WIDE = "模型"  # two wide characters, four columns
ACCENT = "e\u0301"  # e and a combining acute accent: one column


@pytest.mark.parametrize(
    ("text", "columns"),
    [("abc", 3), (WIDE, 4), ("ＡＢ", 4), (ACCENT * 3, 3), ("a模", 3), ("", 0)],
    ids=["ascii", "cjk", "full-width", "combining", "mixed", "empty"],
)
def test_display_width_counts_columns(text: str, columns: int) -> None:
    assert display_width(text) == columns


@pytest.mark.parametrize(
    ("text", "limit", "shown"),
    [
        ("x" * 10, 10, "x" * 10),
        ("x" * 11, 10, "x" * 7 + "..."),
        (WIDE * 5, 20, WIDE * 5),
        (WIDE * 6, 20, WIDE * 4 + "..."),  # 8 wide characters are 16 columns, and '...' 3 more
        ("a" + WIDE * 6, 20, "a" + WIDE * 4 + "..."),  # 1 + 16 + 3 columns; one more wide character would be 22
        (ACCENT * 30, 20, ACCENT * 17 + "..."),  # the accents ride on their letters
    ],
    ids=["fits", "ascii-cut", "wide-fits", "wide-cut", "wide-cut-odd", "combining-cut"],
)
def test_shorten_cuts_to_columns(text: str, limit: int, shown: str) -> None:
    result = shorten(text, limit)
    assert display_width(result) <= limit
    assert result == shown


def test_quote_of_a_wide_value_is_no_wider_than_its_limit() -> None:
    shown = quote("模" * 200)
    assert display_width(shown) <= 80 and shown.startswith("'模模") and shown.endswith("...")


def test_a_repeated_wide_key_is_named_within_the_path_width() -> None:
    key = "模" * 100
    (result,) = iter_documents(f"spec:\n  {key}: 1\n  {key}: 2\n", "job.yaml")
    (line,) = result.errors
    path = line.split(": the key ")[0]
    assert display_width(path) <= 120, path


def test_an_unknown_wide_field_is_named_within_the_path_width() -> None:
    key = "模" * 100
    document = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}, "spec": {key: 1}}
    (result,) = iter_documents(json.dumps(document), "job.yaml")
    line = next(e for e in result.errors if "模" in e)
    assert line.startswith("spec.模模") and display_width(line.split(": ")[0]) <= len("spec.") + 64, line


@pytest.mark.parametrize(
    ("name", "printed"),
    [
        (WIDE * 10, WIDE * 10),
        ("模" * 40, "模" * 32 + "…"),  # 64 columns, then the mark
        ("a" + "模" * 40, "a" + "模" * 31 + "…"),  # 63 columns: one more wide character would be 65
        (ACCENT * 70, ACCENT * 64 + "…"),
    ],
    ids=["wide-fits", "wide-cut", "wide-cut-odd", "combining"],
)
def test_printed_class_names_are_cut_to_columns(name: str, printed: str) -> None:
    assert shown_name(name, 64) == printed
