"""In-epoch progress (issue 13 item 2) with a fake clock: status reports at most once per throttle interval,
the loss read from the device only at the log and report intervals, the Kubernetes sink's PATCHes counted
(and its epoch-end patch removing the in-epoch fields), the console's step line and bar."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from finetune_operator.api.contract import ENV_THROTTLE, TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec, Metrics, Progress
from finetune_trainer.progress import ConsoleSink, MultiSink, format_step_line
from finetune_trainer.status_reporter import KubernetesStatusSink
from finetune_trainer.step_progress import DEFAULT_REPORT_SECONDS, StepMeter, report_seconds_from_env

SPEC = FineTuneJobSpec.model_validate({"model": {"name": "resnet18"}, "dataset": {"format": "digits"}, "output": {"uri": "runs"}})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Loss:
    """A loss 'tensor' that counts how often the host reads it (each read is a device sync on a GPU)."""

    reads = 0

    def __init__(self, value: float) -> None:
        self.value = value

    def detach(self) -> Loss:
        return self

    def float(self) -> Loss:
        return self

    def __mul__(self, n: float) -> Loss:
        return Loss(self.value * n)

    def __add__(self, other: Loss) -> Loss:
        return Loss(self.value + other.value)

    def __float__(self) -> float:
        Loss.reads += 1
        return self.value


class Recorder:
    def __init__(self) -> None:
        self.updates: list[Progress] = []
        self.steps: list[Progress] = []

    def update(self, progress: Progress) -> None:
        self.updates.append(progress)

    def step(self, progress: Progress, epoch_eta_seconds: int | None) -> None:
        self.steps.append(progress)


class Points:
    def __init__(self) -> None:
        self.points: list[tuple[int, float, list[float]]] = []
        self.accuracies: list[float | None] = []

    def step(
        self, global_step: int, loss: float, lrs: list[float], images_per_second: float, accuracy: float | None = None
    ) -> None:
        self.points.append((global_step, loss, lrs))
        self.accuracies.append(accuracy)


def meter(sinks: Recorder, tracker: Points | None, clock: Clock, **changes: Any) -> StepMeter:
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.1}, {"params": [torch.zeros(1)], "lr": 0.01}])
    args: dict[str, Any] = {
        "epoch": 3,
        "total_epochs": 10,
        "stage": "fine-tune",
        "steps_per_epoch": 200,
        "world": 2,
        "global_step": 400,
        "log_every": 20,
        "report_seconds": 30.0,
    }
    return StepMeter(sinks=sinks, tracker=tracker, optimizer=optimizer, clock=clock, **(args | changes))


def test_status_reports_are_throttled_and_the_loss_is_read_only_at_intervals() -> None:
    clock, sinks, points = Clock(), Recorder(), Points()
    hook = meter(sinks, points, clock)
    Loss.reads = 0
    for _ in range(100):  # one step a second, a loss of 2.0 on 8 images per worker
        clock.now += 1
        hook(Loss(2.0), 8)  # type: ignore[arg-type]

    # 100 s of steps at one report per 30 s: three reports, not one per step.
    assert [p.step for p in sinks.updates] == [30, 60, 90]
    assert hook.reports == 3
    # A TensorBoard point and a bar refresh every 20 steps; the loss left the device only then and at reports.
    assert [g for g, _, _ in points.points] == [420, 440, 460, 480, 500]
    assert points.points[0][1:] == (2.0, [0.1, 0.01])
    assert [p.step for p in sinks.steps] == [20, 40, 60, 80, 100]
    assert Loss.reads == len({20, 40, 60, 80, 100} | {30, 60, 90})


def test_in_epoch_progress_fields() -> None:
    clock, sinks = Clock(), Recorder()
    hook = meter(sinks, None, clock, report_seconds=0.0)
    for _ in range(50):
        clock.now += 0.5  # 2 steps/s
        hook(Loss(1.5), 8)  # type: ignore[arg-type]
    progress = sinks.updates[-1]
    assert (progress.epoch, progress.step, progress.steps_per_epoch, progress.stage) == (2, 50, 200, "fine-tune")
    assert progress.percent == pytest.approx(100 * (2 + 50 / 200) / 10)
    assert progress.loss == 1.5
    assert progress.images_per_second == pytest.approx(50 * 16 / 25)
    # 150 steps left in this epoch and 7 more epochs of 200, at 2 steps/s.
    assert progress.eta_seconds == (150 + 7 * 200) // 2
    assert hook.progress(clock.now)[1] == 75


def test_no_report_on_the_last_step_of_an_epoch() -> None:
    """The epoch's end reports anyway (with the epoch's metrics): an in-epoch report then would be one PATCH too many."""
    clock, sinks = Clock(), Recorder()
    hook = meter(sinks, None, clock, steps_per_epoch=3, report_seconds=0.0)
    for _ in range(3):
        clock.now += 1
        hook(Loss(1.0), 8)  # type: ignore[arg-type]
    assert [p.step for p in sinks.updates] == [1, 2]


@pytest.mark.parametrize(("raw", "expected"), [(None, DEFAULT_REPORT_SECONDS), ("30", 30.0), ("-1", 0.0), ("soon", 10.0)])
def test_report_interval_from_the_operator_setting(raw: str | None, expected: float, monkeypatch: pytest.MonkeyPatch) -> None:
    if raw is None:
        monkeypatch.delenv(ENV_THROTTLE, raising=False)
    else:
        monkeypatch.setenv(ENV_THROTTLE, raw)
    assert report_seconds_from_env() == expected


class FakeStatusApi:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    def patch_namespaced_custom_object_status(self, *args: Any, **kwargs: Any) -> None:
        self.patches.append(args[5]["status"])


def kubernetes_sink(clock: Clock, throttle: float) -> tuple[KubernetesStatusSink, FakeStatusApi]:
    cfg = TrainerConfig(job_name="job-a", namespace="default", spec=SPEC, output_root="runs", sinks=["kubernetes"])
    sink = KubernetesStatusSink(cfg, api_client=object(), throttle_seconds=throttle, clock=clock)  # type: ignore[arg-type]
    api = FakeStatusApi()
    sink._api = api  # type: ignore[assignment]
    return sink, api


def test_kubernetes_sink_patch_count_during_a_long_epoch() -> None:
    clock = Clock()
    sink, api = kubernetes_sink(clock, throttle=30)
    hook = meter(MultiSink([sink]), None, clock, report_seconds=0.0, steps_per_epoch=1000)  # type: ignore[arg-type]
    for _ in range(300):  # a report offered every step, one step a second: the sink's throttle bounds the PATCHes
        clock.now += 1
        hook(Loss(1.0), 8)  # type: ignore[arg-type]
    assert len(api.patches) == 10  # t = 1, 31, …, 271
    assert api.patches[-1]["progress"]["step"] == 271


def test_kubernetes_sink_removes_in_epoch_fields_at_the_epoch_end() -> None:
    clock = Clock()
    sink, api = kubernetes_sink(clock, throttle=0)
    sink.update(Progress(epoch=2, total_epochs=10, percent=25, stage="fine-tune", step=100, steps_per_epoch=200, loss=0.5))
    clock.now += 1
    sink.update(Progress(epoch=3, total_epochs=10, percent=30, stage="fine-tune"), Metrics(val_accuracy=0.9))
    first, second = (patch["progress"] for patch in api.patches)
    assert (first["step"], first["loss"]) == (100, 0.5)
    # A merge patch leaves keys it does not name: null removes them.
    assert {k: second[k] for k in ("step", "stepsPerEpoch", "loss", "imagesPerSecond", "etaSeconds")} == dict.fromkeys(
        ("step", "stepsPerEpoch", "loss", "imagesPerSecond", "etaSeconds")
    )
    sink.finish()
    assert api.patches[-1]["progress"]["step"] is None and api.patches[-1]["progress"]["stage"] == "done"


IN_EPOCH = Progress(
    epoch=3, total_epochs=10, percent=32.5, stage="fine-tune", step=120, steps_per_epoch=500, loss=0.41234,
    images_per_second=1234.4, eta_seconds=2470,
)  # fmt: skip


def test_format_step_line() -> None:
    assert format_step_line(IN_EPOCH, 125) == (
        "epoch  4/10 step 120/500  fine-tune  loss 0.4123  1234 img/s  eta epoch 2m05s, job 41m10s"
    )
    assert format_step_line(IN_EPOCH.model_copy(update={"eta_seconds": None, "loss": None})).endswith(
        "loss -  1234 img/s  eta epoch -, job -"
    )


def test_a_step_line_at_the_status_pace_shares_the_jobs_eta_out_over_the_steps_left() -> None:
    # epoch 4 of 10 at step 120/500: 380 steps left in it, 380 + 6 × 500 = 3380 in the job, which needs 3380 s.
    line = format_step_line(IN_EPOCH.model_copy(update={"eta_seconds": 3380}))
    assert line.endswith("eta epoch 6m20s, job 56m20s")
    last = IN_EPOCH.model_copy(update={"epoch": 9, "step": 500, "eta_seconds": 0})
    assert format_step_line(last).endswith("eta epoch 0m00s, job 0m00s")


def test_console_prints_in_epoch_lines_at_the_status_pace_without_a_tty() -> None:
    out = io.StringIO()
    console = ConsoleSink(out, bar=False, label="job")
    console.step(IN_EPOCH, 125)  # the bar's pace: nothing to print without a bar
    console.update(IN_EPOCH)
    assert out.getvalue().splitlines() == [format_step_line(IN_EPOCH)]


def test_console_bar_counts_the_steps_of_the_job() -> None:
    out = io.StringIO()
    console = ConsoleSink(out, bar=True, label="job")
    console.step(IN_EPOCH, 125)
    bar = console._bar
    assert (bar.n, bar.total, bar.unit) == (3 * 500 + 120, 10 * 500, "step")
    assert "epoch 4/10 loss 0.4123 1234 img/s eta epoch 2m05s" in out.getvalue()
    console.update(Progress(epoch=4, total_epochs=10, percent=40, stage="fine-tune"), Metrics(val_accuracy=0.5))
    assert bar.n == 4 * 500
    console.finish()


def test_train_one_epoch_calls_the_step_hook_after_every_step_with_the_loss_tensor() -> None:
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from finetune_trainer.engine import Precision, train_one_epoch

    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    loader = DataLoader(TensorDataset(torch.rand(10, 4), torch.tensor([0, 1] * 5)), batch_size=4)
    calls: list[tuple[bool, int, int]] = []

    def hook(loss: torch.Tensor, batch: int, correct: torch.Tensor) -> None:
        assert 0 <= int(correct) <= batch
        calls.append((isinstance(loss, torch.Tensor), batch, scheduler.last_epoch))

    precision = Precision(torch.device("cpu"), None, torch.amp.GradScaler("cpu", enabled=False))
    train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, scheduler, precision, None, False, on_step=hook)
    assert calls == [(True, 4, 1), (True, 4, 2), (True, 2, 3)]  # after the optimizer and scheduler stepped


def test_training_accuracy_is_read_at_the_log_interval_and_once_for_the_epoch() -> None:
    """Issue 13 item 1 asks for accuracies per step: the right predictions stay on the device like the loss, and
    leave it only with each TensorBoard point (the interval's accuracy) and once at the epoch's end."""
    clock, sinks, points = Clock(), Recorder(), Points()
    hook = meter(sinks, points, clock, report_seconds=1e9)
    for step in range(40):  # 6 of 8 right for 20 steps, then 2 of 8
        clock.now += 1
        hook(torch.tensor(1.0), 8, torch.tensor(6 if step < 20 else 2))
    assert points.accuracies == [0.75, 0.25]
    assert hook.epoch_accuracy() == 0.5
