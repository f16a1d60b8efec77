"""Progress sinks: the console lines people read, the JSON status file scripts poll, the fan-out that
keeps a broken sink from stopping training, and which sinks a config builds."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.contract import Sink, TrainerConfig
from finetune_operator.api.v1alpha1 import Artifacts, FineTuneJobSpec, Metrics, Progress, newest_warnings
from finetune_trainer.progress import ConsoleSink, JsonFileSink, MultiSink, build_sinks, format_epoch_line


def _epoch(n: int, total: int = 3, stage: str = "fine-tune") -> Progress:
    return Progress(epoch=n, total_epochs=total, percent=100 * n / total, stage=stage)


def _metrics(n: int) -> Metrics:
    return Metrics(
        train_loss=1.0 / n,
        val_loss=1.5 / n,
        val_accuracy=0.5 + 0.1 * n,
        best_val_accuracy=0.5 + 0.1 * n,
        best_epoch=n,
        images_per_second=1000.0 + n,
        epoch_seconds=2.5,
    )


def _config(tmp_path: Path, sinks: list[Sink], status_file: str | None = None) -> TrainerConfig:
    spec = FineTuneJobSpec.model_validate(
        {"model": {"name": "resnet18"}, "dataset": {"format": "digits"}, "output": {"uri": str(tmp_path)}}
    )
    return TrainerConfig(job_name="job", spec=spec, output_root=str(tmp_path), sinks=sinks, status_file=status_file)


# ------------------------------------------------------------------------------------------ console
@pytest.mark.parametrize(
    ("progress", "metrics", "expected"),
    [
        (
            _epoch(3, 10, "probe"),
            _metrics(3),
            "epoch  3/10  probe      train_loss 0.3333  val_loss 0.5000  val_acc 80.00%  best 80.00% (epoch 3)  1003 img/s  2.5s",
        ),
        (
            _epoch(1, 1),
            Metrics(val_accuracy=0.25, val_top5=0.9),
            "epoch 1/1  fine-tune  train_loss -  val_loss -  val_acc 25.00%  top5 90.00%  best -  - img/s  -s",
        ),
        (_epoch(2, 4), None, "epoch 2/4  fine-tune"),
    ],
)
def test_format_epoch_line(progress: Progress, metrics: Metrics | None, expected: str) -> None:
    assert format_epoch_line(progress, metrics) == expected


def test_console_sink_prints_one_line_per_epoch_without_a_bar_when_not_a_tty(capsys: pytest.CaptureFixture[str]) -> None:
    sink = ConsoleSink()
    sink.update(Progress(stage="caching-features", total_epochs=3))
    sink.update(_epoch(0, stage="probe"))  # a stage start, no metrics yet: no line
    for n in (1, 2):
        sink.update(_epoch(n, stage="probe"), _metrics(n))
    sink.update(_epoch(2, stage="probe"), _metrics(2))  # the same epoch again: no second line
    sink.update(_epoch(3), _metrics(3))
    sink.update(_epoch(3, stage="export"))
    sink.finish(Artifacts(model_uri="/out/job/model.pt", model_card_uri="/out/job/model.json"))
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout stays for results (and Ray Train forwards it twice)
    lines = captured.err.splitlines()
    assert lines == [
        "caching-features...",
        format_epoch_line(_epoch(1, stage="probe"), _metrics(1)),
        format_epoch_line(_epoch(2, stage="probe"), _metrics(2)),
        format_epoch_line(_epoch(3), _metrics(3)),
        "export...",
        "done: model /out/job/model.pt, model card /out/job/model.json",
    ]
    assert "\r" not in "".join(lines)


def test_console_sink_reports_failure(capsys: pytest.CaptureFixture[str]) -> None:
    sink = ConsoleSink()
    sink.update(_epoch(1), _metrics(1))
    sink.finish(error="dataset.trainUri /data: no such directory")
    assert capsys.readouterr().err.splitlines()[-1] == "failed: dataset.trainUri /data: no such directory"


def test_console_sink_draws_a_bar_and_keeps_epoch_lines() -> None:
    stream = io.StringIO()
    sink = ConsoleSink(stream, bar=True, label="digits")
    for n in (1, 2, 3):
        sink.update(_epoch(n), _metrics(n))
    sink.finish()
    out = stream.getvalue()
    assert "digits [fine-tune]" in out
    assert "3/3" in out
    for n in (1, 2, 3):
        assert format_epoch_line(_epoch(n), _metrics(n)) in out
    assert out.rstrip().endswith("done")


# --------------------------------------------------------------------------------------------- file
def _read(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def test_json_file_sink_content_after_updates_and_finish(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "status.json"
    sink = JsonFileSink(str(path))
    assert not path.exists()  # nothing is written before there is something to say

    sink.update(_epoch(1, stage="probe"), _metrics(1))
    doc = _read(path)
    assert doc["phase"] == "Running"
    assert doc["error"] is None
    assert doc["artifacts"] is None
    progress = Progress.model_validate(doc["progress"])
    assert (progress.epoch, progress.total_epochs, progress.stage) == (1, 3, "probe")
    assert progress.updated_at is not None  # stamped by the sink
    assert doc["metrics"]["valAccuracy"] == pytest.approx(0.6)  # camelCase, as in the FineTuneJob status

    sink.update(_epoch(1, stage="evaluate"))  # no metrics: the last epoch's stay
    doc = _read(path)
    assert doc["progress"]["stage"] == "evaluate"
    assert Metrics.model_validate(doc["metrics"]) == _metrics(1)

    artifacts = Artifacts(
        model_uri="/o/model.pt", sha256="ab" * 32, class_names=["a", "b"], exports={"state_dict": "/o/model.pt"}
    )
    sink.finish(artifacts)
    doc = _read(path)
    assert doc["phase"] == "Succeeded"
    assert Artifacts.model_validate(doc["artifacts"]) == artifacts
    assert (doc["progress"]["stage"], doc["progress"]["percent"]) == ("done", 100.0)
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]  # no temporary files left behind


def test_json_file_sink_keeps_warnings_to_the_end(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    sink = JsonFileSink(str(path))
    sink.update(_epoch(1), _metrics(1))
    assert _read(path)["warnings"] == []
    sink.warn("checkpoint checkpoint_epoch_0002: truncated; resumed from checkpoint checkpoint_epoch_0001 (epoch 1)")
    assert _read(path)["warnings"] == [
        "checkpoint checkpoint_epoch_0002: truncated; resumed from checkpoint checkpoint_epoch_0001 (epoch 1)"
    ]
    sink.update(_epoch(2), _metrics(2))
    sink.finish(Artifacts())
    doc = _read(path)
    assert (doc["phase"], len(doc["warnings"])) == ("Succeeded", 1)


@pytest.mark.parametrize(
    ("warnings", "expected"),
    [
        ([], []),
        (["a", "b"], ["a", "b"]),
        ([str(n) for n in range(20)], [str(n) for n in range(4, 20)]),  # the newest 16
        (["x" * 2000], ["x" * 1023 + "…"]),  # each fits status.warnings' 1024 characters
    ],
)
def test_newest_warnings(warnings: list[str], expected: list[str]) -> None:
    assert newest_warnings(warnings) == expected


def test_console_sink_prints_a_warning_line() -> None:
    stream = io.StringIO()
    ConsoleSink(stream, bar=False).warn("checkpoint x: truncated")
    assert stream.getvalue() == "warning: checkpoint x: truncated\n"


def test_json_file_sink_failure(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    sink = JsonFileSink(str(path))
    sink.update(_epoch(2), _metrics(2))
    sink.finish(error="boom")
    doc = _read(path)
    assert (doc["phase"], doc["error"], doc["progress"]["stage"]) == ("Failed", "boom", "fine-tune")


def test_json_file_sink_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "status.json"
    sink = JsonFileSink(str(path))
    sink.update(_epoch(1), _metrics(1))
    before = path.read_bytes()
    written: list[bytes] = []

    def crash_on_rename(src: str, dst: str) -> None:
        written.append(Path(src).read_bytes())  # the new document was complete before the rename...
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash_on_rename)
    with pytest.raises(OSError, match="disk gone"):
        sink.update(_epoch(2), _metrics(2))
    # ...and a failed rename leaves the previous document whole, and no temporary file.
    assert json.loads(written[0])["progress"]["epoch"] == 2
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


# ------------------------------------------------------------------------------------------ fan-out
class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def update(self, progress: Progress, metrics: Metrics | None = None) -> None:
        self.calls.append(("update", progress.epoch))

    def warn(self, message: str) -> None:
        self.calls.append(("warn", message))

    def finish(self, artifacts: Artifacts | None = None, error: str | None = None) -> None:
        self.calls.append(("finish", error))


class _Broken:
    def update(self, progress: Progress, metrics: Metrics | None = None) -> None:
        raise RuntimeError("api server unreachable")

    def warn(self, message: str) -> None:
        raise RuntimeError("api server unreachable")

    def finish(self, artifacts: Artifacts | None = None, error: str | None = None) -> None:
        raise RuntimeError("api server unreachable")


def test_multi_sink_survives_a_raising_sink(caplog: pytest.LogCaptureFixture) -> None:
    before, after = _Recorder(), _Recorder()
    sink = MultiSink([before, _Broken(), after])
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.progress"):
        sink.update(_epoch(1), _metrics(1))
        sink.update(_epoch(2), _metrics(2))
        sink.warn("checkpoint x: truncated")
        sink.finish(error=None)
    assert before.calls == after.calls == [("update", 1), ("update", 2), ("warn", "checkpoint x: truncated"), ("finish", None)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert all("_Broken failed" in r.getMessage() and "api server unreachable" in r.getMessage() for r in warnings)
    # The traceback once, not at every epoch.
    assert [bool(r.exc_info) for r in warnings] == [True, False, False, False]


# ------------------------------------------------------------------------------------------- build
@pytest.mark.parametrize(
    ("sinks", "status_file", "expected"),
    [
        (["console"], None, [ConsoleSink]),
        (["console", "file"], "custom.json", [ConsoleSink, JsonFileSink]),
        (["file", "file"], None, [JsonFileSink]),
        ([], None, []),
    ],
)
def test_build_sinks(tmp_path: Path, sinks: list[Sink], status_file: str | None, expected: list[type]) -> None:
    cfg = _config(tmp_path, sinks, str(tmp_path / status_file) if status_file else None)
    built = build_sinks(cfg)
    assert isinstance(built, MultiSink)
    assert [type(s) for s in built.sinks] == expected
    files = [s for s in built.sinks if isinstance(s, JsonFileSink)]
    if files:
        assert files[0].path == str(tmp_path / (status_file or "job/status.json"))


def test_build_sinks_skips_kubernetes_when_its_module_cannot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "finetune_trainer.status_reporter", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.progress"):
        built = build_sinks(_config(tmp_path, ["console", "kubernetes"]))
    assert isinstance(built, MultiSink)
    assert [type(s) for s in built.sinks] == [ConsoleSink]
    assert "kubernetes progress sink unavailable" in caplog.text


def test_build_sinks_uses_the_kubernetes_sink_when_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeKubernetesSink(_Recorder):
        def __init__(self, cfg: TrainerConfig) -> None:
            super().__init__()
            self.cfg = cfg

    module = types.ModuleType("finetune_trainer.status_reporter")
    module.KubernetesStatusSink = FakeKubernetesSink  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "finetune_trainer.status_reporter", module)
    cfg = _config(tmp_path, ["kubernetes"])
    built = build_sinks(cfg)
    assert isinstance(built, MultiSink)
    (sink,) = built.sinks
    assert isinstance(sink, FakeKubernetesSink)
    assert sink.cfg is cfg


def test_finetune_runs_console_leaves_a_failure_to_the_driver(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``finetune run`` prints the error as its own last line after Ray stops; the console saying it too showed it twice."""
    cfg = _config(tmp_path, ["console"])
    for local, expected in ((True, []), (False, ["failed: dataset: none of the 8 images of a batch can be decoded"])):
        sinks = build_sinks(cfg, local=local)
        sinks.finish(error="dataset: none of the 8 images of a batch can be decoded")
        assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("failed")] == expected
