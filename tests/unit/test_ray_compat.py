"""Ray Train's private surface that ``ray_compat`` relies on is still where it was, and nothing else in
the trainer reaches for it. Imports Ray, never starts it."""

from __future__ import annotations

import ast
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import ray

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec

TRAINER = Path(__file__).resolve().parents[2] / "trainer" / "finetune_trainer"
PRIVATE = "ray.train.v2._internal"


def _moved(what: str) -> str:
    return f"Ray {ray.__version__}: {what}; update finetune_trainer/ray_compat.py for this Ray version"


def _ray_compat() -> ModuleType:
    try:
        from finetune_trainer import ray_compat
    except ImportError as e:
        pytest.fail(_moved(f"a private module ray_compat imports has moved ({e})"))
    return ray_compat


def _cleaner_is_a_class() -> bool:
    return isinstance(_ray_compat().PlacementGroupCleanerCallback, type)


def _torch_trainer_builds_its_callbacks_privately() -> bool:
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    return callable(getattr(TorchTrainer, "_create_default_callbacks", None))


def _report_logger_is_named_after_its_file() -> bool:
    from ray.train.v2._internal.execution import context

    logger = getattr(context, "logger", None)
    return isinstance(logger, logging.Logger) and logger.name == context.__file__


def _lazy_config_mirrors_torch_config() -> bool:
    import inspect

    from ray.train._internal import utils as train_utils
    from ray.train.backend import Backend
    from ray.train.torch import config
    from ray.train.torch.config import TorchConfig, _TorchBackend

    ray_compat = _ray_compat()
    ours, theirs = ray_compat.LazyTorchConfig(backend="gloo"), TorchConfig(backend="gloo")
    lazy = ray_compat._WorkerSideTorchBackend
    steps = ray_compat.WORKER_STEPS
    return (
        [(f.name, f.default) for f in dataclasses.fields(ours)] == [(f.name, f.default) for f in dataclasses.fields(theirs)]
        and ours.to_dict() == theirs.to_dict()
        and ours.framework == theirs.framework
        and (lazy.share_cuda_visible_devices, lazy.has_replica_groups)
        == (_TorchBackend.share_cuda_visible_devices, _TorchBackend.has_replica_groups)
        # Ray's backend does its work in exactly these hooks (on_training_start: only for Ray Train v1's worker
        # group); a hook it adds would be Backend's no-op in local runs.
        and {m for m, v in vars(_TorchBackend).items() if callable(v) and hasattr(Backend, m)}
        == {"on_start", "on_training_start", "on_shutdown"}
        # The worker-side steps on_worker runs are still Ray's, with the keywords it passes.
        and all(
            callable(fn := getattr(config, step, None)) and set(keywords) <= set(inspect.signature(fn).parameters)
            for step, keywords in steps.items()
        )
        and callable(getattr(train_utils, "get_address_and_port", None))
    )


def test_the_mirror_check_sees_ray_rename_a_worker_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train.torch import config

    assert _lazy_config_mirrors_torch_config()
    monkeypatch.delattr(config, "_setup_torch_process_group")
    assert not _lazy_config_mirrors_torch_config()


def test_the_mirror_check_sees_ray_change_a_worker_steps_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train.torch import config

    monkeypatch.setattr(config, "_shutdown_torch", lambda destroy: None)
    assert not _lazy_config_mirrors_torch_config()


@pytest.mark.parametrize(
    ("check", "what"),
    [
        (_lazy_config_mirrors_torch_config, "TorchConfig or its backend changed; LazyTorchConfig no longer mirrors them"),
        (_cleaner_is_a_class, "PlacementGroupCleanerCallback is no longer a class"),
        (_torch_trainer_builds_its_callbacks_privately, "TorchTrainer._create_default_callbacks is gone"),
        (_report_logger_is_named_after_its_file, "the per-report logger is no longer named after context.py"),
    ],
)
def test_private_surface_is_where_ray_compat_expects_it(check: Callable[[], bool], what: str) -> None:
    assert check(), _moved(what)


def _config(tmp_path: Path) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(
        {"model": {"name": "resnet18"}, "dataset": {"format": "fake", "imageSize": 32}, "output": {"uri": str(tmp_path)}}
    )
    return TrainerConfig(job_name="compat", spec=spec, output_root=str(tmp_path), sinks=["console"])


def _unused_helpers() -> list[type]:
    ray_compat = _ray_compat()
    return [ray_compat.PlacementGroupCleanerCallback, ray_compat.DatasetsCallback]


@pytest.mark.parametrize(("local", "present"), [(False, True), (True, False)], ids=["cluster", "local"])
def test_only_the_local_trainer_leaves_the_unused_helpers_out(tmp_path: Path, local: bool, present: bool) -> None:
    from finetune_trainer.driver import build_trainer

    callbacks = build_trainer(_config(tmp_path), local=local)._create_default_callbacks()
    for helper in _unused_helpers():
        found = any(isinstance(c, helper) for c in callbacks)
        # A TorchTrainer without the helper means Ray stopped adding it: the override is dead weight.
        names = [type(c).__name__ for c in callbacks]
        assert found is present, _moved(f"{helper.__name__}: TorchTrainer's default callbacks {names}")
    assert not ray.is_initialized()


def test_the_mirror_check_sees_ray_move_the_process_group_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Ray whose torch backend no longer sets up the process group in on_start: the lazy backend would hand on to
    # Backend's no-op, and DDP would run without a process group.
    from ray.train.torch.config import _TorchBackend

    assert _lazy_config_mirrors_torch_config()
    monkeypatch.delattr(_TorchBackend, "on_start")
    assert not _lazy_config_mirrors_torch_config()


def test_the_mirror_check_sees_a_torch_backend_hook_the_lazy_backend_does_not_hand_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train.backend import Backend
    from ray.train.torch.config import _TorchBackend

    monkeypatch.setattr(Backend, "on_worker_group_restart", lambda self, group, config: None, raising=False)
    monkeypatch.setattr(_TorchBackend, "on_worker_group_restart", lambda self, group, config: group, raising=False)
    assert not _lazy_config_mirrors_torch_config()


@pytest.mark.parametrize(
    ("local", "gpus", "config", "backend"),
    [
        (True, 0, "LazyTorchConfig", "gloo"),
        (True, 1, "LazyTorchConfig", "nccl"),
        (False, 0, "TorchConfig", "gloo"),
        (False, 1, "TorchConfig", "nccl"),
    ],
    ids=["local-cpu", "local-gpu", "cluster-cpu", "cluster-gpu"],
)
def test_each_trainer_sets_up_the_process_group_as_torch_trainer_does(
    tmp_path: Path, local: bool, gpus: int, config: str, backend: str
) -> None:
    from finetune_trainer.driver import build_trainer

    cfg = _config(tmp_path)
    cfg.spec.resources.gpus_per_worker = gpus
    trainer = build_trainer(cfg, local=local)
    assert (type(trainer.backend_config).__name__, trainer.backend_config.backend) == (config, backend)
    assert not ray.is_initialized()


def test_the_lazy_training_context_is_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.train.torch.config as torch_config

    seen: list[object] = []

    class Recording:
        def __enter__(self) -> None:
            seen.append("enter")

        def __exit__(self, *exc: object) -> bool:
            seen.append(exc[0])
            return False

    monkeypatch.setattr(torch_config, "TorchConfigContextManager", Recording)
    context = _ray_compat().LazyTorchConfig().train_func_context
    with pytest.raises(KeyError), context():
        raise KeyError("the training function's error goes on")
    assert seen == ["enter", KeyError]


class _Captured(Exception):
    pass


@pytest.mark.parametrize(
    ("dataset", "policy"),
    [
        ({"format": "fake", "imageSize": 32}, "UnannouncedFixedScalingPolicy"),
        ({"format": "imagefolder", "trainUri": "/data/train", "ingest": "mapStyle"}, "UnannouncedFixedScalingPolicy"),
        ({"format": "imagefolder", "trainUri": "/data/train"}, "AnnouncedFixedScalingPolicy"),  # auto: it may stream
    ],
    ids=["fake", "imagefolder-mapStyle", "imagefolder-auto"],
)
def test_a_local_job_that_never_streams_makes_no_autoscaling_requests(
    tmp_path: Path, dataset: dict[str, object], policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from finetune_trainer.driver import build_trainer

    ray_compat = _ray_compat()
    seen: dict[str, object] = {}

    def capture(self: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise _Captured

    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller", capture)
    spec = FineTuneJobSpec.model_validate({"model": {"name": "resnet18"}, "dataset": dataset, "output": {"uri": str(tmp_path)}})
    cfg = TrainerConfig(job_name="compat", spec=spec, output_root=str(tmp_path), sinks=["console"])
    trainer = build_trainer(cfg, local=True)
    given = ray_compat.FixedScalingPolicy(scaling_config=trainer.scaling_config)
    with pytest.raises(_Captured):
        trainer._initialize_and_run_controller(scaling_policy=given, callbacks=[])
    assert type(seen["scaling_policy"]).__name__ == policy, _moved("the controller no longer takes scaling_policy from fit()")
    assert not ray.is_initialized()


def test_the_unannounced_policy_still_sizes_the_worker_group_without_the_coordinator(tmp_path: Path) -> None:
    from finetune_trainer.driver import build_trainer

    ray_compat = _ray_compat()
    scaling = build_trainer(_config(tmp_path), local=True).scaling_config
    policy = ray_compat.UnannouncedFixedScalingPolicy(scaling_config=scaling)
    policy.after_controller_start(object())  # Ray's would start the AutoscalingCoordinator actor here
    decision = policy.make_decision_for_non_running_worker_group()
    wanted = (scaling.num_workers, scaling._resources_per_worker_not_none)
    assert (decision.num_workers, decision.resources_per_worker) == wanted, _moved(f"decision {decision!r}")
    assert policy._coordinator_client is None  # nothing asked Ray Data's coordinator
    assert not ray.is_initialized()


def test_a_resource_request_that_times_out_is_one_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A streaming run keeps Ray Train's requests to the AutoscalingCoordinator; on a busy machine the request's
    5-s `ray.get` times out and Ray logs a warning with the GetTimeoutError's traceback, which reached the user's
    terminal next to the run's own lines. The policy keeps the request and the warning, in one line."""
    from ray.exceptions import GetTimeoutError
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

    from finetune_trainer.driver import build_trainer

    ray_compat = _ray_compat()
    scaling = build_trainer(_config(tmp_path), local=True).scaling_config

    class Coordinator:
        class request_resources:  # an actor method's shape: .remote(...)
            @staticmethod
            def remote(**kwargs: object) -> object:
                return "ref"

        cancel_request = request_resources

    def get(ref: object, *, timeout: float) -> object:
        raise GetTimeoutError("Get timed out: some object(s) not ready.")

    monkeypatch.setattr(client, "get_or_create_autoscaling_coordinator", Coordinator)
    monkeypatch.setattr(client.ray, "get", get)
    policy = ray_compat.AnnouncedFixedScalingPolicy(scaling_config=scaling)
    ctx = type("Ctx", (), {"run_id": "r1"})()
    with caplog.at_level(logging.WARNING, logger=client.logger.name):
        policy.after_controller_start(ctx)  # the request is still sent...
        policy.before_controller_abort()
    warnings = [r for r in caplog.records if r.name == client.logger.name]
    assert len(warnings) == 2, _moved("the coordinator client no longer logs a failed request")
    for record in warnings:
        line = record.getMessage()
        assert record.exc_info is None and record.exc_text is None and "\n" not in line, line
        assert "GetTimeoutError" in line and "some object(s) not ready" in line, line
    assert "Failed to send resource request for train-r1" in warnings[0].getMessage()
    assert "sends it again" not in warnings[1].getMessage(), warnings[1].getMessage()  # a cancel is not sent again...
    assert "Failed to cancel resource request for train-r1" in warnings[1].getMessage()
    assert "expire after the timeout" in warnings[1].getMessage()  # ...it expires, as Ray's message says

    # Anything else the request meets keeps its traceback: that is a fault someone needs to read.
    def broken(ref: object, *, timeout: float) -> object:
        raise RuntimeError("coordinator died")

    monkeypatch.setattr(client.ray, "get", broken)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=client.logger.name):
        policy._send_resource_request()
    assert [r.exc_info is not None for r in caplog.records if r.name == client.logger.name] == [True]


def test_quieting_reaches_the_report_logger() -> None:
    from ray.train.v2._internal.execution import context

    logger = logging.getLogger(context.__file__)
    level = logger.level
    try:
        _ray_compat().quiet_train_reports()
        assert not context.logger.isEnabledFor(logging.INFO), _moved("quiet_train_reports no longer silences the report logger")
    finally:
        logger.setLevel(level)


def _private_imports(path: Path) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found += [f"{path.name}:{node.lineno}: {name}" for name in names if name == PRIVATE or name.startswith(f"{PRIVATE}.")]
    return found


def test_only_ray_compat_imports_ray_private_modules() -> None:
    offenders = [hit for path in sorted(TRAINER.glob("*.py")) if path.name != "ray_compat.py" for hit in _private_imports(path)]
    assert offenders == [], f"import these through finetune_trainer.ray_compat instead: {offenders}"
    assert _private_imports(TRAINER / "ray_compat.py"), "the guard above must see ray_compat's own private imports"


def _failure_logged_by_ray(exc: BaseException, caplog: pytest.LogCaptureFixture) -> list[str]:
    """What Ray Train's own code logs for ``exc`` raised by a training function (its real call)."""
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="ray.train.v2._internal.util"):
        try:
            raise exc
        except BaseException as e:
            construct_user_exception_with_traceback(e)
    return [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    ("exc", "drop", "expected"),
    [
        # the job's input at fault: one line on a cluster's worker log, none where the driver prints it
        ("weights", False, ["error in training function: weights_uri w.pt does not fit resnet18"]),
        ("weights", True, []),
        ("trainer", False, ["error in training function: dataset.trainUri: x: no such folder"]),
        ("wrapped", False, ["error in training function: dataset.trainUri: x: no such folder"]),
        # a bug keeps its traceback, whatever the setting
        ("bug", False, ["Traceback", "ZeroDivisionError: boom"]),
        ("bug", True, ["Traceback", "ZeroDivisionError: boom"]),
        # a bug raised while a user error was being reported: the user error is only its context
        ("bug in an error path", True, ["Traceback", "ZeroDivisionError: boom"]),
    ],
)
def test_a_user_error_is_one_line_in_the_worker_log(
    exc: str, drop: bool, expected: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    from finetune_trainer.errors import TrainerError, WeightsError, find_user_error

    def line(e: BaseException) -> str | None:
        error = find_user_error(e)
        return None if error is None else str(error)

    errors: dict[str, BaseException] = {
        "weights": WeightsError("weights_uri w.pt does not fit resnet18"),
        "trainer": TrainerError("dataset.trainUri: x: no such folder"),
        "bug": ZeroDivisionError("boom"),
    }
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = errors["trainer"]
    errors["wrapped"] = wrapped
    in_error_path = ZeroDivisionError("boom")
    in_error_path.__context__ = errors["trainer"]
    errors["bug in an error path"] = in_error_path
    _ray_compat().user_errors_in_one_line(line, drop=drop)
    try:
        logged = _failure_logged_by_ray(errors[exc], caplog)
    finally:
        _ray_compat().user_errors_in_one_line(lambda e: None, drop=False)
    if exc.startswith("bug"):
        assert len(logged) == 1 and all(part in logged[0] for part in expected), logged
    else:
        assert logged == expected
        assert not any("Traceback" in m for m in logged)


@pytest.mark.parametrize(
    ("quiet", "failures", "dropped"),
    [(True, 0, True), (True, 2, False), (False, 0, False), (False, 2, False)],
    ids=["finetune-run", "finetune-run-retried", "cluster", "cluster-retried"],
)
def test_a_worker_leaves_its_user_error_to_the_driver_only_where_no_attempt_is_retried(
    tmp_path: Path, quiet: bool, failures: int, dropped: bool
) -> None:
    """``finetune run`` prints the run's error once; with retries the driver sees only the last attempt's, so a worker
    must say each earlier attempt's itself (before, a retried attempt's reason was said nowhere)."""
    from finetune_trainer.loop import _driver_says_it

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "fake"},
            "runPolicy": {"maxWorkerFailures": failures},
            "output": {"uri": str(tmp_path)},
        }
    )
    assert _driver_says_it(TrainerConfig(job_name="j", spec=spec, output_root=str(tmp_path)), quiet=quiet) is dropped


def test_the_checkpoints_fingerprint_does_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    """With the batch size left to the trainer, the planned batch is rounded to a multiple of the workers (64 for 2,
    66 for 3), and the fingerprint of the planned spec refused a relaunch on 3 workers of a run begun on 2 ("holds
    checkpoints of a different spec; delete that folder"). The checkpoints carry the spec's as written."""
    from finetune_trainer.loop import _planned

    spec = FineTuneJobSpec.model_validate(
        {"model": {"name": "resnet18"}, "dataset": {"format": "fake"}, "output": {"uri": str(tmp_path)}}
    )
    cfg = TrainerConfig(job_name="j", spec=spec, output_root=str(tmp_path))
    on_two, on_three = _planned(cfg, 1000, 2), _planned(cfg, 1000, 3)
    assert (on_two[2].batch_size, on_three[2].batch_size) == (64, 66)  # the premise: plans differ
    assert on_two[1].spec_fingerprint() != on_three[1].spec_fingerprint()
    assert on_two[0] == on_three[0] == cfg.spec_fingerprint()


class _RecordingGroup:
    """A worker group of two that records the process-group URL the backend sends, running nothing."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.urls: list[object] = []

    def __len__(self) -> int:
        return 2

    def get_resources_per_worker(self) -> dict[str, float]:
        return {"CPU": 1.0}

    def execute(self, func: object, *args: object, **kwargs: object) -> list[None]:
        return [None, None]

    def execute_single(self, rank: int, func: object, *args: object, **kwargs: object) -> tuple[str, int]:
        return self.addr, 29500

    def execute_single_async(self, rank: int, func: object, *args: object, **kwargs: object) -> int:
        self.urls.append(kwargs["init_method"])
        return rank


@pytest.mark.parametrize(
    ("init_method", "addr", "url"),
    [
        ("env", "10.0.0.7", "env://"),
        ("tcp", "10.0.0.7", "tcp://10.0.0.7:29500"),
        ("tcp", "fd00::7", "tcp://[fd00::7]:29500"),  # an IPv6 node: the host in brackets, as in any URL
    ],
)
def test_the_process_group_url_follows_the_init_method(
    monkeypatch: pytest.MonkeyPatch, init_method: str, addr: str, url: str
) -> None:
    ray_compat = _ray_compat()
    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)
    config = ray_compat.LazyTorchConfig(backend="gloo", init_method=init_method)
    group = _RecordingGroup(addr)
    config.backend_cls().on_start(group, config)
    assert group.urls == [url, url]


def test_an_init_method_torch_cannot_use_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    ray_compat = _ray_compat()
    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)
    config = ray_compat.LazyTorchConfig(backend="gloo", init_method="file")
    with pytest.raises(ValueError, match="init_method 'file': accepted: env, tcp"):
        config.backend_cls().on_start(_RecordingGroup("10.0.0.7"), config)
