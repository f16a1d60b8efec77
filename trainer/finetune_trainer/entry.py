"""The training function the driver hands to Ray Train, and the keys of its config.

It lives apart from ``loop`` so that the driver process (``finetune run``, the RayJob's entrypoint)
never imports the training loop: ``loop`` pulls in torchvision and everything a worker needs (seconds
of start-up on a small machine), while the driver only ships a reference to ``train_fn``. Each worker
imports ``loop`` once, when Ray Train calls ``train_fn`` there.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["FAIL_AFTER_EPOCH_KEY", "QUIET_KEY", "train_fn"]

FAIL_AFTER_EPOCH_KEY: Final = "_fail_after_epoch"
"""Test hook (not part of the spec): raise right after epoch N has been reported, once."""
QUIET_KEY: Final = "quiet"
"""Keep Ray Train's per-report INFO lines off the console (local runs, where the console sink speaks)."""


def train_fn(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``loop.train_loop_per_worker``, imported on the worker."""
    from finetune_trainer.loop import train_loop_per_worker

    train_loop_per_worker(config)
