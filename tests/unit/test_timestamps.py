"""One timestamp format for every status field the operator and the trainer write (RFC 3339, UTC, seconds)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest

from finetune_operator.api import timestamps


@pytest.mark.parametrize(
    ("when", "text"),
    [
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "2026-01-02T03:04:05Z"),
        (datetime(2026, 1, 2, 3, 4, 5, 999_999, tzinfo=timezone.utc), "2026-01-02T03:04:05Z"),  # whole seconds
        (datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))), "2026-01-02T03:04:05Z"),  # converted to UTC
    ],
)
def test_rfc3339(when: datetime, text: str) -> None:
    assert timestamps.rfc3339(when) == text


def test_utc_now_is_rfc3339_and_now() -> None:
    text = timestamps.utc_now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text)
    parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((timestamps.now() - parsed).total_seconds()) < 5
