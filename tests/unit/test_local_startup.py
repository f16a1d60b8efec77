"""Start-up of ``finetune`` (issue 14 item 5): what each command imports, and how ``finetune run`` starts or
joins Ray (``finetune_trainer.local_ray``). The import checks run a fresh interpreter each: a module already
imported by another test would hide what a command pulls in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from typing import Any

import pytest

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.validate import load_job
from finetune_trainer.errors import TrainerError
from finetune_trainer.local_ray import ADDRESS_ENV, embedded_options, ray_address, start_ray
from tests.support.schemas import REPO

HEAVY = ("torch", "torchvision", "ray", "numpy")
DIGITS = REPO / "manifests" / "examples" / "digits-cpu.yaml"

# (what runs, Python code, modules it must not have imported). Code runs in the repository root.
IMPORT_CASES = [
    (
        "finetune --help",
        "import contextlib, io\nfrom finetune_operator import cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    cli.main(['--help'])",
        HEAVY,
    ),
    (
        "finetune verify on a directory without a card",
        "from finetune_operator import cli\nassert cli.main(['verify', 'no-such-dir']) != 0",
        HEAVY,
    ),
    ("finetune predict's module (it needs torch, never Ray)", "import finetune_trainer.predict", ("ray",)),
    (
        "finetune run's checks of a digits job, up to Ray's start",
        "import argparse\nfrom finetune_operator.api.contract import TrainerConfig\n"
        "from finetune_operator.api.validate import decode_manifest, read_manifest\n"
        "from finetune_trainer import local\n"
        f"job = local.local_job(decode_manifest(read_manifest({str(DIGITS)!r}), 'j'), 'j', output='/tmp/x')\n"
        "local._preflight(TrainerConfig.from_job(job))",
        HEAVY,
    ),
    (
        "a worker's digits datasets: the digits and their split without scikit-learn (a second of start-up)",
        "from finetune_operator.api.contract import TrainerConfig\nfrom finetune_operator.api.validate import load_job\n"
        "from finetune_trainer.data import build_datasets\n"
        f"job = load_job(open({str(DIGITS)!r}).read(), 'j')\n"
        "train, val, names, _ = build_datasets(TrainerConfig.from_job(job, output_root='/tmp/x'))\n"
        "assert len(train) + len(val) == 1797 and names == [str(d) for d in range(10)]",
        ("sklearn", "scipy"),
    ),
    (
        "the driver process (finetune run, the RayJob's entrypoint) imports Ray Train but not the training loop",
        "import finetune_trainer.driver, finetune_trainer.__main__",
        ("torchvision", "finetune_trainer.loop", "finetune_trainer.data", "finetune_trainer.model"),
    ),
    (
        "finetune run's driver builds its trainer without torch (the workers and the controller import it)",
        "from finetune_trainer.driver import build_trainer\nfrom tests.unit.test_local_startup import digits\n"
        "trainer = build_trainer(digits(), local=True)\nassert trainer.backend_config.backend == 'gloo'",
        ("torch", "torchvision"),
    ),
]


def fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter in the repository root (this one may have imported anything already)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer"), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.parametrize(("label", "code", "forbidden"), IMPORT_CASES, ids=[c[0] for c in IMPORT_CASES])
def test_a_command_imports_only_what_it_needs(label: str, code: str, forbidden: tuple[str, ...]) -> None:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {list(forbidden)!r} if m in sys.modules)))"
    done = fresh_python(probe)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], f"{label}: imported {done.stdout.strip()}"


def test_finetune_run_starts_ray_before_it_imports_ray_train_and_torch() -> None:
    # A fresh interpreter: this one may have imported the driver already. Ray's start is stopped with a one-line
    # error, as a raylet that missed its deadline would be.
    code = (
        "import sys\nfrom finetune_trainer import local\nfrom finetune_trainer.errors import TrainerError\n"
        "from tests.unit.test_local_startup import digits\nseen = []\n"
        "def start_ray(cfg, address):\n"
        "    seen.append(sorted(m for m in ('finetune_trainer.driver', 'torch') if m in sys.modules))\n"
        "    raise TrainerError('the local Ray did not start')\n"
        "local.start_ray = start_ray\n"
        "assert local._train(digits(), None) == 2\n"
        "print(seen)"
    )
    done = fresh_python(code)
    assert done.stdout.strip().splitlines()[-1] == "[[]]"  # Ray asked to start before either was imported
    assert "error: the local Ray did not start" in done.stderr


# The controller's part of a 2-worker local run's process group, in a fresh interpreter (this one may have imported
# torch): the config arrives pickled, as the controller's actor gets it, and drives a worker group that records what
# it is asked to run on which worker instead of running it.
_CONTROLLER = """
import json, pickle, sys
from finetune_trainer import ray_compat
class Group:
    def __init__(self): self.sent = []
    def __len__(self): return 2
    def get_resources_per_worker(self): return {"CPU": 1.0}
    def _name(self, func, args): return args[0] if func is ray_compat.on_worker else func.__name__
    def execute(self, func, *args, **kwargs): self.sent.append(["all", self._name(func, args), kwargs]); return [None, None]
    def execute_async(self, func, *args, **kwargs): return self.execute(func, *args, **kwargs)
    def execute_single(self, rank, func, *args, **kwargs):
        self.sent.append([rank, self._name(func, args), kwargs]); return ("10.0.0.7", 29500)
    def execute_single_async(self, rank, func, *args, **kwargs): self.execute_single(rank, func, *args, **kwargs); return rank
import ray
ray.get = lambda refs, timeout=None: refs
config = pickle.loads(pickle.dumps(ray_compat.LazyTorchConfig(backend=BACKEND)))
group = Group()
backend = config.backend_cls()
backend.on_start(group, config)
backend.on_training_start(group, config)
backend.on_shutdown(group, config)
print(json.dumps(["torch" in sys.modules, group.sent]))
"""


@pytest.mark.parametrize(("backend", "expected"), [("'gloo'", "gloo"), ("None", "gloo")])
def test_the_controller_sets_up_the_process_group_without_importing_torch(backend: str, expected: str) -> None:
    done = fresh_python(_CONTROLLER.replace("BACKEND", backend))
    imported, sent = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported is False  # Ray's torch backend module imports torch: 2 s of the controller's CPU at the start
    pg = {"backend": expected, "world_size": 2, "init_method": "env://", "timeout_s": 1800}
    assert sent == [
        [0, "get_address_and_port", {}],
        ["all", "_set_master", {"addr": "10.0.0.7", "port": 29500}],
        ["all", "_set_torch_distributed_env_vars", {}],
        [0, "_setup_torch_process_group", {**pg, "world_rank": 0}],
        [1, "_setup_torch_process_group", {**pg, "world_rank": 1}],
        ["all", "_shutdown_torch", {"destroy_process_group": True}],
    ]


def digits(workers: int = 1, cpus: float = 1.0, gpus: int = 0) -> TrainerConfig:
    job = load_job(DIGITS.read_text(), DIGITS.name)
    job.spec.resources.workers, job.spec.resources.cpus_per_worker = workers, cpus
    job.spec.resources.gpus_per_worker = gpus
    return TrainerConfig.from_job(job, output_root="/tmp/unused")


def test_the_embedded_ray_is_a_new_local_one_without_dashboard_sized_to_the_job() -> None:
    options = embedded_options(digits(workers=4, cpus=4.0))
    assert options["address"] == "local"  # never RAY_ADDRESS or the last `ray start`
    assert options["include_dashboard"] is False
    assert options["num_cpus"] >= 16  # every worker's reservation fits, or Train waits forever
    assert options["num_gpus"] is None
    assert embedded_options(digits(workers=2, gpus=2))["num_gpus"] == 4
    # No Ray Train process takes a worker prestarted for the driver's runtime env: they only load the machine.
    assert options["_system_config"] == {"prestart_worker_first_driver": False}


def test_the_embedded_ray_runs_no_preemption_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRay({})
    install(monkeypatch, fake)
    unset(monkeypatch, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    assert start_ray(digits()) is True
    assert fake.calls[0]["address"] == "local"
    # The embedded Ray's processes inherit this environment; Ray Train's controller reads it when it starts.
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        (None, {}, None),  # default: an embedded Ray
        (None, {"RAY_ADDRESS": "10.0.0.1:6379"}, None),  # never followed implicitly
        ("auto", {}, "auto"),
        (None, {ADDRESS_ENV: "127.0.0.1:6379"}, "127.0.0.1:6379"),
        ("ray://head:10001", {ADDRESS_ENV: "auto"}, "ray://head:10001"),  # the flag wins
        ("local", {ADDRESS_ENV: "auto"}, None),  # asks for the embedded Ray explicitly
    ],
)
def test_a_running_ray_is_joined_only_when_asked(
    flag: str | None, env: dict[str, str], expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert ray_address(flag) == expected


class FakeRay:
    def __init__(self, resources: dict[str, float], fail: Exception | None = None) -> None:
        self.resources, self.fail = resources, fail
        self.calls: list[dict[str, Any]] = []
        self.shut = False

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        if self.fail is not None:
            raise self.fail

    def cluster_resources(self) -> dict[str, float]:
        return self.resources

    def shutdown(self) -> None:
        self.shut = True


def unset(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Absent for the test and afterwards: start_ray sets them in os.environ (set first so that pytest
    restores the absence; a delenv of an absent variable records nothing)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def install(monkeypatch: pytest.MonkeyPatch, fake: FakeRay) -> None:
    api = {name: getattr(fake, name) for name in ("is_initialized", "init", "cluster_resources", "shutdown")}
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(**api))


def test_joining_a_running_ray_passes_the_local_settings_in_the_jobs_runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRay({"CPU": 8.0})
    install(monkeypatch, fake)
    unset(monkeypatch, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    assert start_ray(digits(workers=2), "auto") is True
    (call,) = fake.calls
    assert call["address"] == "auto"
    assert "num_cpus" not in call  # a running Ray refuses resource arguments
    # Its processes do not inherit this one's environment: the 0.2 s poll (and no preemption watcher on one
    # machine) travel in the runtime env.
    expected = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert call["runtime_env"] == {"env_vars": expected}
    assert not fake.shut


@pytest.mark.parametrize(
    ("resources", "workers", "gpus", "message"),
    [
        ({"CPU": 1.0}, 2, 0, "--address: auto: the job needs 2 CPU (resources.workers × cpusPerWorker), the running Ray has 1"),
        ({"CPU": 8.0}, 1, 1, "--address: auto: the job needs 1 GPU (resources.workers × gpusPerWorker), the running Ray has 0"),
    ],
    ids=["cpus", "gpus"],
)
def test_a_running_ray_too_small_for_the_job_is_refused_in_one_line(
    resources: dict[str, float], workers: int, gpus: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRay(resources)
    install(monkeypatch, fake)
    with pytest.raises(TrainerError) as caught:
        start_ray(digits(workers=workers, gpus=gpus), "auto")
    assert str(caught.value) == message
    assert fake.shut  # disconnected: Train would have waited for the workers forever


def test_no_ray_at_the_address_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    install(monkeypatch, FakeRay({}, ConnectionError("Could not find any running Ray instance.\nPlease specify ...")))
    with pytest.raises(TrainerError) as caught:
        start_ray(digits(), "auto")
    assert str(caught.value).startswith("--address: auto: cannot join a running Ray: ConnectionError: Could not find any")
    assert str(caught.value).endswith("(a Ray with token authentication: set RAY_AUTH_MODE=token)")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("dataset", "may"),
    [
        ({"format": "digits"}, False),
        ({"format": "fake"}, False),
        ({"format": "imagefolder", "trainUri": "/data/train", "ingest": "mapStyle"}, False),
        ({"format": "imagefolder", "trainUri": "/data/train"}, True),  # auto: decided on the workers
        ({"format": "imagefolder", "trainUri": "s3://b/train", "ingest": "streaming"}, True),
    ],
    ids=["digits", "fake", "imagefolder-mapStyle", "imagefolder-auto", "imagefolder-streaming"],
)
def test_only_a_job_that_may_stream_keeps_ray_datas_coordinator(dataset: dict[str, str], may: bool) -> None:
    from finetune_operator.api.v1alpha1 import FineTuneJobSpec
    from finetune_trainer.driver import may_stream

    spec = FineTuneJobSpec.model_validate({"model": {"name": "resnet18"}, "dataset": dataset, "output": {"uri": "/tmp/o"}})
    assert may_stream(spec) is may


def test_cli_run_has_the_address_option() -> None:
    import argparse

    from finetune_trainer.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["run", "job.yaml", "--address", "auto"]).address == "auto"
    assert parser.parse_args(["run", "job.yaml"]).address is None
