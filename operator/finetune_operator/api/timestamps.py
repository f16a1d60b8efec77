"""Timestamps as Kubernetes writes them (RFC 3339, UTC, whole seconds): one helper for every status field.

The operator stamps conditions, the trainer stamps ``status.progress.updatedAt`` and the model card's
``createdAt``; all of them must read alike, so they all come from here.
"""

from __future__ import annotations

from datetime import datetime, timezone


def now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(timezone.utc)


def rfc3339(when: datetime) -> str:
    """``when`` as ``2026-11-30T09:25:34Z`` (a naive datetime is taken as local time, as Python does)."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now() -> str:
    """The current time as RFC 3339 in UTC."""
    return rfc3339(now())
