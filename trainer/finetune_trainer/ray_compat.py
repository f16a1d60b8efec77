"""The one module that leans on Ray Train's private surface (``ray.train.v2._internal``, private methods).

Ray offers no public way to do the two things below, and both matter only for local runs
(``finetune run``). Keeping them here means a Ray upgrade that moves them breaks this module and
``tests/unit/test_ray_compat.py`` (which names the Ray version), not the training loop or the driver.
That test also keeps every other trainer module off ``ray.train.v2._internal``: import-linter sees an
external package only as a whole (``ray``), so no contract can say it. Written against the pinned Ray
(``ray[train]`` in pyproject.toml, the images' rayVersion).
"""

from __future__ import annotations

import logging
from typing import Any

# Private: the callback class is the only handle on the cleaner, which TorchTrainer adds unconditionally.
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

# Private: the module whose logger writes a line per ray.train.report (see quiet_train_reports).
from ray.train.v2._internal.execution import context as _train_context
from ray.train.v2.torch.torch_trainer import TorchTrainer

__all__ = ["LocalTorchTrainer", "PlacementGroupCleanerCallback", "quiet_train_reports"]


class LocalTorchTrainer(TorchTrainer):
    """A TorchTrainer without the placement-group cleaner, for an embedded Ray that dies with this
    process anyway. The cleaner asks the state API (the dashboard, not installed locally) whether the
    controller lives, and logs a warning every few seconds when it cannot tell."""

    # Private: TorchTrainer's own list of default callbacks, the only place the cleaner can be left out.
    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]


def quiet_train_reports() -> None:
    """Keep Ray Train's per-report INFO lines off the console (local runs, where our console sink speaks).

    Ray 2.60 logs every report through a logger named after its source file rather than under
    "ray.train", so RunConfig's LoggingConfig does not reach it."""
    logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
