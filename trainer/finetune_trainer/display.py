"""Names from untrusted places (a model card, a dataset's folder names) as they are shown to people: characters a
terminal or a renderer would act on written as escapes, and cut to a width, so that no name can forge output, move
the cursor, widen every line or stall a drawing. Used by ``finetune predict`` and the confusion matrix."""

from __future__ import annotations

from finetune_operator.api.fields import display_width

__all__ = ["padded", "shown_name"]


def shown_name(name: str, width: int) -> str:
    """``name`` with unprintable characters (escape sequences, newlines, controls) written as escapes, cut past
    ``width`` terminal columns (a wide CJK character takes two, a combining mark none), escapes counted and never cut
    inside one, then '…'."""
    shown: list[str] = []
    size = 0
    for c in name:
        piece = c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        columns = display_width(piece)
        if size + columns > width:
            return "".join(shown) + "…"
        shown.append(piece)
        size += columns
    return "".join(shown)


def padded(shown: str, width: int) -> str:
    """``shown`` (a ``shown_name``) padded with spaces to ``width`` terminal columns, so that what follows lines up
    whatever its characters' widths (``str.ljust`` counts characters: a column of wide names came out ragged)."""
    return shown + " " * max(0, width - display_width(shown))
