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
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend, BackendConfig

# Private: the module whose logger writes that traceback on the worker (see user_errors_in_one_line).
from ray.train.v2._internal import util as _train_util

# Private: the callback classes are the only handles on what TorchTrainer adds unconditionally.
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

# Private: the module whose logger writes a line per ray.train.report (see quiet_train_reports).
from ray.train.v2._internal.execution import context as _train_context

# Private: the policy a fixed-size run gets (scaling_policy.factory), whose resource requests go to Ray
# Data's AutoscalingCoordinator actor, and the module whose logger reports a request that failed.
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as _coordinator_client

# Private: the framework tag TorchConfig reports (Ray's state export reads it).
from ray.train.v2._internal.util import TrainingFramework
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

__all__ = [
    "AnnouncedFixedScalingPolicy",
    "DatasetsCallback",
    "FixedScalingPolicy",
    "LazyTorchConfig",
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


class _RequestTimeoutInOneLine(logging.Filter):
    """Ray's warning for a resource request whose answer did not come within its 5-s ``ray.get`` (a busy
    machine: Ray says to ignore it), without the GetTimeoutError's traceback: one line, with the error's text."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, GetTimeoutError):
            first, _, rest = record.getMessage().partition(". ")
            error = " ".join(str(exc).split())
            # A request is sent again; a cancel is not: it expires, as the rest of Ray's message says.
            rest = rest.split(". ", 1)[0].rstrip(".")
            after = (
                "Ray sends it again, and the run goes on" if first.startswith("Failed to send") else rest[:1].lower() + rest[1:]
            )
            record.msg, record.args = "%s (GetTimeoutError: %s); %s", (first.rstrip("."), error, after or "the run goes on")
            record.exc_info = record.exc_text = None
        return True


class AnnouncedFixedScalingPolicy(FixedScalingPolicy):
    """Ray Train's fixed-size policy, its resource requests to the AutoscalingCoordinator kept (a run that may
    stream: Ray Data's executors learn from them what the training workers hold), with a request that times
    out reported in one line: on a busy machine Ray's warning carried a traceback to the user's terminal."""

    def after_controller_start(self, train_run_context: Any) -> None:
        # Runs in the controller, whose logger this is, before the first request.
        logger = _coordinator_client.logger
        if not any(isinstance(f, _RequestTimeoutInOneLine) for f in logger.filters):
            logger.addFilter(_RequestTimeoutInOneLine())
        super().after_controller_start(train_run_context)


class _TorchFuncContext:
    """TorchConfig's context around the training function (it picks the worker's CUDA device), imported on
    the worker when entered rather than in the driver that builds the trainer."""

    def __enter__(self) -> None:
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        self._inner.__enter__()  # type: ignore[no-untyped-call]  # Ray's, untyped

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        return bool(self._inner.__exit__(kind, exc, tb))  # type: ignore[no-untyped-call]


def on_worker(step: str, /, **kwargs: Any) -> Any:
    """Run ``step``, a function of Ray's torch backend module (``ray.train.torch.config``, private), on a training
    worker: that module imports torch at its top, which the worker does anyway and the controller need not."""
    from ray.train.torch import config

    return getattr(config, step)(**kwargs)


# The steps of Ray's torch backend (_TorchBackend) that run on the workers, by the names and keywords on_worker
# passes them; tests/unit/test_ray_compat.py checks them against the pinned Ray.
WORKER_STEPS: Final = {
    "_set_torch_distributed_env_vars": (),
    "_setup_torch_process_group": ("backend", "world_rank", "world_size", "init_method", "timeout_s"),
    "_shutdown_torch": ("destroy_process_group",),
}


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


class _WorkerSideTorchBackend(Backend):
    """Ray's torch backend as the controller drives it, with torch imported on the workers alone: the same steps as
    Ray's ``_TorchBackend`` for CPU and GPU workers (rank 0's address and a free port, the torch.distributed
    variables, the process group; its teardown), each step Ray's own function run there through ``on_worker``.
    Ray's backend module imports torch at its top, which cost the controller 2 s of CPU on the path to the first
    step of a local run (bench/README.md, "The cold start's CPU floor"). TPUs are not offered in local runs."""

    # As Ray's: the workers on one node see all of that node's GPUs, which DDP needs.
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        import ray
        from ray.train._internal.utils import get_address_and_port

        addr, port = worker_group.execute_single(0, get_address_and_port)
        if backend_config.init_method == "env":
            worker_group.execute(_set_master, addr=addr, port=port)
            url = "env://"
        elif backend_config.init_method == "tcp":
            url = f"tcp://[{addr}]:{port}" if ":" in addr else f"tcp://{addr}:{port}"
        else:
            raise ValueError(f"init_method {backend_config.init_method!r}: accepted: env, tcp")
        worker_group.execute(on_worker, "_set_torch_distributed_env_vars")
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")  # as Ray's, for CPU and GPU workers
        size = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    on_worker,
                    "_setup_torch_process_group",
                    backend=backend,
                    world_rank=rank,
                    world_size=size,
                    init_method=url,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(size)
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
        import ray

        futures = worker_group.execute_async(on_worker, "_shutdown_torch", destroy_process_group=len(worker_group) > 1)
        timeout = float(os.environ.get("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", 30))  # Ray's variable and default
        try:
            ray.get(futures, timeout=timeout)
        except GetTimeoutError:
            logging.getLogger(__name__).warning("the torch process group's shutdown timed out after %g s", timeout)


@dataclass
class LazyTorchConfig(BackendConfig):
    """Ray's ``TorchConfig`` without importing torch where it is defined: ``ray.train.torch.config`` imports
    torch at its top, so the driver building a TorchTrainer and the controller unpickling its config each
    spent 2-3 s of a local run's start importing torch, on the path to the first step (bench/README.md,
    "Start-up"). Torch is imported on the workers alone, which train with it (``_WorkerSideTorchBackend``). Same
    fields and meaning as TorchConfig's."""

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type:
        return _WorkerSideTorchBackend

    @property
    def train_func_context(self) -> type:
        return _TorchFuncContext

    @property
    def framework(self) -> Any:
        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


class LocalTorchTrainer(DataParallelTrainer):
    """Ray Train's TorchTrainer for an embedded (or joined local) Ray: its backend (``LazyTorchConfig``,
    gloo, or NCCL for GPU workers, as TorchTrainer chooses), without the helper actors a local run does not
    use; each is a Ray worker process that imports Ray Train, started while the run starts:

    - the placement-group cleaner: the Ray dies with this process anyway; the cleaner asks the state API
      (the dashboard, not installed locally) whether the controller lives, and logs a warning every few
      seconds when it cannot tell;
    - the datasets callback when the trainer has no ``datasets`` (ours never has: the streaming ingest
      builds its datasets on the workers): it starts a DatasetManager actor for them regardless;
    - with ``uses_ray_data=False`` (a job that never streams), the AutoscalingCoordinator requests
      (``UnannouncedFixedScalingPolicy``); a job that may stream keeps them (``AnnouncedFixedScalingPolicy``)."""

    def __init__(self, train_fn: Callable[..., Any], *, uses_ray_data: bool = True, **kwargs: Any) -> None:
        scaling = kwargs["scaling_config"]
        backend = LazyTorchConfig(backend="nccl" if scaling.use_gpu else "gloo")
        super().__init__(train_fn, backend_config=backend, **kwargs)
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
        if type(policy) is FixedScalingPolicy:
            chosen = AnnouncedFixedScalingPolicy if self.uses_ray_data else UnannouncedFixedScalingPolicy
            controller_init_kwargs["scaling_policy"] = chosen(scaling_config=policy.scaling_config)
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
