"""The confusion matrix's axes show class names from folder names or a model card: escaped and cut, so that a long
or hostile name neither squeezes the matrix to nothing nor stalls the drawing (a 100,000-character name took
matplotlib 27 s to lay out), and a control character is written, not passed to the renderer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune_trainer import plots
from finetune_trainer.evaluation import EvalResult


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("cat", "cat"),
        ("x" * 32, "x" * 32),
        ("x" * 100_000, "x" * 32 + "…"),
        ("\x1b[2Jdog", "\\x1b[2Jdog"),
        ("a\nb", "a\\nb"),
    ],
    ids=["short", "at-the-width", "enormous", "escape-sequence", "newline"],
)
def test_confusion_matrix_labels_are_escaped_and_cut(name: str, label: str, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    plots.plot_confusion_matrix(EvalResult(y_true=[0, 1, 1], y_pred=[0, 1, 0], class_names=["ok", name]), "unused.png")
    (ax,) = [a for a in drawn[0].axes if a.get_title().startswith("confusion matrix")]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ok", label]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ok", label]


@pytest.mark.parametrize("name", [r"$\foo$", "$x^{$", "$a$"], ids=["unknown-command", "unclosed-group", "valid-math"])
def test_a_class_name_with_dollar_signs_is_drawn_as_written(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib read a label between two '$' as mathtext: a folder named '$\\foo$' failed the run's artifacts with
    ValueError at savefig (a traceback), and '$a$' was drawn as an italic a."""
    drawn: list[Any] = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (drawn.append(fig), real_save(fig, path)))
    plots.plot_confusion_matrix(EvalResult(y_true=[0, 1], y_pred=[0, 1], class_names=["ok", name]), str(tmp_path / "cm.png"))
    assert (tmp_path / "cm.png").stat().st_size > 0
    (ax,) = [a for a in drawn[0].axes if a.get_title().startswith("confusion matrix")]
    for label in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        assert not label.get_parse_math(), label.get_text()


@pytest.mark.parametrize(
    ("names", "tilted"),
    [
        (["cat", "dog", "fox", "owl"], False),
        (["catcatcatcatcatcat", "dog", "fox", "owl"], True),  # 18 columns × 4 classes: upright labels collide
        (["猫猫猫猫猫猫猫猫猫", "狗", "狐", "鸮"], True),  # 9 wide characters are 18 columns, as wide as the row above
    ],
    ids=["short", "long", "wide"],
)
def test_labels_are_tilted_when_upright_ones_would_collide(
    names: list[str], tilted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the labels collide is a matter of columns on the page: a wide (CJK) character takes two, and counting
    characters left nine of them upright over one another."""
    drawn: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    plots.plot_confusion_matrix(EvalResult(y_true=[0, 1, 2, 3], y_pred=[0, 1, 2, 3], class_names=names), "unused.png")
    (ax,) = [a for a in drawn[0].axes if a.get_title().startswith("confusion matrix")]
    assert {label.get_rotation() for label in ax.get_xticklabels()} == ({45.0} if tilted else {0.0})
