"""The evaluation gate: the spec field, the trainer's verdict (``finetune_trainer.gate``) and the status it maps to."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
import yaml

from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_operator.api.validate import validate_spec
from finetune_operator.status import map_status, verdict
from finetune_trainer.errors import TrainerError
from finetune_trainer.gate import check_accuracy_gate
from tests.support.schemas import REPO

SPEC: dict[str, Any] = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())["spec"]


def spec_with(gate: Any) -> FineTuneJobSpec:
    spec, errors = validate_spec({**SPEC, "evaluation": {"minAccuracy": gate}})
    assert spec is not None, errors
    return spec


@pytest.mark.parametrize(
    ("gate", "line"),
    [
        (0, "spec.evaluation.minAccuracy: 0"),
        (1.5, "spec.evaluation.minAccuracy: 1.5"),
        ("high", "spec.evaluation.minAccuracy: 'high'"),
    ],
)
def test_bad_gates_are_one_line_errors(gate: Any, line: str) -> None:
    _, errors = validate_spec({**SPEC, "evaluation": {"minAccuracy": gate}})
    assert len(errors) == 1 and errors[0].startswith(line), errors


def test_no_gate_leaves_the_wire_form_as_it_was() -> None:
    spec, _ = validate_spec(SPEC)
    assert spec is not None and "evaluation" not in spec.to_wire()
    assert spec_with(0.9).to_wire()["evaluation"] == {"minAccuracy": 0.9}


@pytest.mark.parametrize(("gate", "best"), [(None, 0.1), (None, None), (0.9, 0.9), (0.9, 0.95)])
def test_runs_that_pass(gate: float | None, best: float | None) -> None:
    spec = spec_with(gate) if gate is not None else validate_spec(SPEC)[0]
    assert spec is not None
    check_accuracy_gate(spec, best, 3, "/runs/x")  # raises nothing


@pytest.mark.parametrize(
    ("best", "message"),
    [
        (0.8999, "BelowAccuracyGate: best validation accuracy 0.8999 (epoch 3) is below spec.evaluation.minAccuracy 0.9; "),
        (None, "BelowAccuracyGate: no validation accuracy was recorded, so spec.evaluation.minAccuracy 0.9 cannot be met"),
    ],
)
def test_runs_below_the_gate_fail_with_one_line_naming_the_field(best: float | None, message: str) -> None:
    with pytest.raises(TrainerError) as error:
        check_accuracy_gate(spec_with(0.9), best, 3, "/runs/x")
    assert str(error.value).startswith(message) and str(error.value).endswith("kept in /runs/x")


GATE_LINE = "error: BelowAccuracyGate: best validation accuracy 0.4200 (epoch 4) is below spec.evaluation.minAccuracy 0.9; …"


@pytest.mark.parametrize(
    "rayjob",
    [
        # KubeRay's Failed with Ray's message: the entrypoint's exit code and the tail of its output.
        {
            "jobDeploymentStatus": "Failed",
            "jobStatus": "FAILED",
            "reason": "AppFailed",
            "message": f"Job entrypoint command failed with exit code 2, last available logs:\nepoch 4/4 done\n{GATE_LINE}\n",
        },
        {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "message": f"\x1b[31m{GATE_LINE}\x1b[0m"},
    ],
)
def test_the_operator_reports_the_gate_as_the_failure_reason(rayjob: dict[str, Any]) -> None:
    v = verdict(rayjob)
    assert (v.phase.value, v.reason) == ("Failed", "BelowAccuracyGate")
    assert v.message.startswith("the model failed its accuracy gate: best validation accuracy 0.4200 (epoch 4)")
    current = {"phase": "Running", "artifacts": {"modelUri": "s3://b/default/x/model.pt"}}
    patch = map_status(rayjob, current, 1, datetime(2026, 1, 1, tzinfo=timezone.utc))
    failed = next(c for c in patch["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "BelowAccuracyGate")
    assert "artifacts" not in patch  # kept as the trainer wrote them


def test_other_trainer_errors_keep_kuberays_reason() -> None:
    message = "exit code 2\nerror: spec.dataset.trainUri: s3://x holds no class folders"
    v = verdict({"jobDeploymentStatus": "Failed", "reason": "AppFailed", "message": message})
    assert v.reason == "AppFailed"


def test_the_entrypoint_fails_a_finished_run_below_the_gate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    """``python -m finetune_trainer`` (the RayJob's entrypoint) checks the gate after the run; no Ray is started here."""
    import sys
    import types

    import finetune_trainer
    from finetune_operator.api.contract import TrainerConfig
    from finetune_operator.api.v1alpha1 import FineTuneJob
    from finetune_trainer.__main__ import main

    wire = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "g"}}
    wire["spec"] = spec_with(0.9).to_wire()
    job = FineTuneJob.model_validate(wire)
    config = tmp_path / "trainer.json"
    config.write_text(TrainerConfig.from_job(job, sinks=["console"]).model_dump_json(by_alias=True))
    result = types.SimpleNamespace(
        job_name="g", run_dir="/runs/g", val_accuracy=0.4, best_val_accuracy=0.42, best_epoch=4, shipped_accuracy=(0.42, 4)
    )
    fake_driver = types.SimpleNamespace(run=lambda cfg: result)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(init=lambda: None))
    monkeypatch.setitem(sys.modules, "finetune_trainer.driver", fake_driver)
    monkeypatch.setattr(finetune_trainer, "driver", fake_driver, raising=False)
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: BelowAccuracyGate: best validation accuracy 0.4200 (epoch 4) is below")
    assert verdict({"jobDeploymentStatus": "Failed", "reason": "AppFailed", "message": err}).reason == "BelowAccuracyGate"


@pytest.mark.parametrize(
    ("shipped", "message"),
    [
        ((0.95, 3), None),  # the best epoch's weights ship: judged as before
        ((0.5833, 4), "BelowAccuracyGate: validation accuracy of the shipped model (not the best epoch's) 0.5833 (epoch 4)"),
        ((0.93, 4), None),  # the last epoch's ship and clear the gate
    ],
)
def test_the_gate_judges_the_model_that_ships(shipped: tuple[float, int], message: str | None) -> None:
    """The review's run: the best checkpoint (epoch 3, 0.95) was unusable, model.pt held epoch 4's weights at 0.58,
    and the gate, judging the best epoch, let a model below minAccuracy be promoted."""
    if message is None:
        check_accuracy_gate(spec_with(0.9), 0.95, 3, "/runs/x", shipped)
        return
    with pytest.raises(TrainerError) as error:
        check_accuracy_gate(spec_with(0.9), 0.95, 3, "/runs/x", shipped)
    assert str(error.value).startswith(message)
