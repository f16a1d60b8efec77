"""The one module that leans on Ray Train's private surface (``ray.train.v2._internal``, private methods).

Ray offers no public way to do the things below, and all matter only for local runs
(``finetune run``). Keeping them here means a Ray upgrade that moves them breaks this module and
``tests/unit/test_ray_compat.py`` (which names the Ray version), not the training loop or the driver.
That test also keeps every other trainer module off ``ray.train.v2._internal``: import-linter sees an
external package only as a whole (``ray``), so no contract can say it. Written against the pinned Ray
(``ray[train]`` in pyproject.toml, the images' rayVersion).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

# Private: the module whose logger writes that traceback on the worker (see user_errors_in_one_line).
from ray.train.v2._internal import util as _train_util

# Private: the callback classes are the only handles on what TorchTrainer adds unconditionally.
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

# Private: the module whose logger writes a line per ray.train.report (see quiet_train_reports).
from ray.train.v2._internal.execution import context as _train_context

# Private: the policy a fixed-size run gets (scaling_policy.factory), whose resource requests go to Ray
# Data's AutoscalingCoordinator actor.
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
from ray.train.v2.torch.torch_trainer import TorchTrainer

__all__ = [
    "DatasetsCallback",
    "FixedScalingPolicy",
    "LocalTorchTrainer",
    "PlacementGroupCleanerCallback",
    "UnannouncedFixedScalingPolicy",
    "quiet_train_reports",
    "user_errors_in_one_line",
]

# The start of the line Ray Train logs, with a traceback, for whatever the training function raised.
_USER_FAILURE_PREFIX = "Error in training function"


class UnannouncedFixedScalingPolicy(FixedScalingPolicy):
    """Ray Train's fixed-size policy without its resource requests to the AutoscalingCoordinator.

    Those requests tell an autoscaler (none in a local Ray) and Ray Data's executors (none in a job that
    does not stream) what the training workers hold. Making the first one starts the coordinator actor,
    a process that imports Ray Data, and the controller waits for its answer before it starts any
    worker: seconds of a local run's start on a small machine (bench/README.md, "Start-up")."""

    def after_controller_start(self, train_run_context: Any) -> None:
        return None

    def _maybe_send_resource_request(self) -> None:
        return None

    def _send_resource_request(self) -> None:
        return None

    def _cancel_resource_request(self) -> None:
        return None


class LocalTorchTrainer(TorchTrainer):
    """A TorchTrainer for an embedded (or joined local) Ray, without the helper actors a local run does
    not use; each is a Ray worker process that imports Ray Train, started while the run starts:

    - the placement-group cleaner: the Ray dies with this process anyway; the cleaner asks the state API
      (the dashboard, not installed locally) whether the controller lives, and logs a warning every few
      seconds when it cannot tell;
    - the datasets callback when the trainer has no ``datasets`` (ours never has: the streaming ingest
      builds its datasets on the workers): it starts a DatasetManager actor for them regardless;
    - with ``uses_ray_data=False`` (a job that never streams), the AutoscalingCoordinator requests
      (``UnannouncedFixedScalingPolicy``)."""

    def __init__(self, *args: Any, uses_ray_data: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.uses_ray_data = uses_ray_data

    # Private: TorchTrainer's own list of default callbacks, the only place they can be left out.
    def _create_default_callbacks(self) -> list[Any]:
        unused: tuple[type, ...] = (PlacementGroupCleanerCallback,)
        if not self.datasets:
            unused += (DatasetsCallback,)
        return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

    # Private: where fit() hands the controller its scaling policy (made by create_scaling_policy).
    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        policy = controller_init_kwargs.get("scaling_policy")
        if not self.uses_ray_data and type(policy) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = UnannouncedFixedScalingPolicy(scaling_config=policy.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def quiet_train_reports() -> None:
    """Keep Ray Train's per-report INFO lines off the console (local runs, where our console sink speaks).

    Ray 2.60 logs every report through a logger named after its source file rather than under
    "ray.train", so RunConfig's LoggingConfig does not reach it."""
    logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)


class _UserErrorFilter(logging.Filter):
    def __init__(self, user_error: Callable[[BaseException], str | None], drop: bool) -> None:
        super().__init__()
        self._user_error = user_error
        self._drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        # Ray logs from inside its `except`, so the exception is the one being handled on this thread.
        exc = sys.exc_info()[1]
        if exc is None or not str(record.msg).startswith(_USER_FAILURE_PREFIX):
            return True
        message = self._user_error(exc)
        if message is None:
            return True  # a bug: its traceback is what whoever fixes it needs
        if self._drop:
            return False
        record.msg, record.args = "%s: %s", (_USER_FAILURE_PREFIX.lower(), message)
        return True


def user_errors_in_one_line(user_error: Callable[[BaseException], str | None], *, drop: bool) -> None:
    """Ray Train logs a traceback on the worker for anything the training function raises. A user error
    (``user_error`` returns its one line, None for anything else) is the job's input at fault: it gets one
    line, or none where the driver prints it anyway (``drop``: ``finetune run``); other failures keep theirs."""
    logger: logging.Logger = _train_util.logger
    for old in [f for f in logger.filters if isinstance(f, _UserErrorFilter)]:
        logger.removeFilter(old)  # one per process: a worker reused by the next run gets that run's choice
    logger.addFilter(_UserErrorFilter(user_error, drop))
