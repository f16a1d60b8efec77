"""``spec.tracking`` (issue 13 item 1): one-line errors for bad MLflow URIs (credentials refused, never echoed),
and a section that changes neither the wire form of jobs without it nor the spec fingerprint."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_operator.api.validate import validate_document

SPEC: dict[str, Any] = {
    "model": {"name": "resnet18"},
    "dataset": {"format": "digits", "imageSize": 32},
    "output": {"uri": "runs"},
}
DOC: dict[str, Any] = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "job"}, "spec": SPEC}


def with_tracking(tracking: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(DOC)
    doc["spec"]["tracking"] = tracking
    return doc


def mlflow(uri: str) -> dict[str, Any]:
    return {"mlflow": {"trackingUri": uri, "experimentName": "e"}}


@pytest.mark.parametrize(
    ("tracking", "field", "fragments", "absent"),
    [
        (
            mlflow("https://alice:s3cret@mlflow.example.com"),
            "spec.tracking.mlflow.trackingUri",
            ["'https://…@mlflow.example.com'", "credentials", "runtime.envFrom"],
            ["s3cret", "alice"],
        ),
        (mlflow("http://token@mlflow:5000"), "spec.tracking.mlflow.trackingUri", ["credentials"], ["token"]),
        (mlflow("ftp://mlflow"), "spec.tracking.mlflow.trackingUri", ["'ftp://mlflow'", "accepted: http://, https://"], []),
        (mlflow("https:///path"), "spec.tracking.mlflow.trackingUri", ["no host", "https://HOST"], []),
        ({"mlflow": {"trackingUri": "http://m"}}, "spec.tracking.mlflow.experimentName", ["required"], []),
        ({"tensorboard": {"logEverySteps": 0}}, "spec.tracking.tensorboard.logEverySteps", ["0", "1"], []),
        ({"wandb": {}}, "spec.tracking.wandb", ["unknown field", "tensorboard, mlflow"], []),
    ],
)
def test_bad_tracking_is_one_line_on_its_field(
    tracking: dict[str, Any], field: str, fragments: list[str], absent: list[str]
) -> None:
    result = validate_document(with_tracking(tracking), "job.yaml")
    matching = [e for e in result.errors if e.startswith(f"{field}: ")]
    assert matching, result.errors
    for fragment in fragments:
        assert fragment in matching[0], matching[0]
    for secret in absent:
        assert secret not in "\n".join(result.errors)
    assert "\n" not in matching[0]


@pytest.mark.parametrize(
    "uri", ["http://mlflow.mlflow.svc:5000", "https://mlflow.example.com/prefix", "file:///mnt/mlruns", "sqlite:///m.db"]
)
def test_accepted_tracking_uris(uri: str) -> None:
    assert validate_document(with_tracking(mlflow(uri)), "job.yaml").ok


def test_a_default_tracking_section_stays_off_the_wire_and_out_of_the_fingerprint() -> None:
    plain = FineTuneJobSpec.model_validate(SPEC)
    assert "tracking" not in plain.to_wire()
    tracked = FineTuneJobSpec.model_validate({**SPEC, "tracking": mlflow("http://m")})
    assert tracked.to_wire()["tracking"]["mlflow"] == {"trackingUri": "http://m", "experimentName": "e"}

    def fingerprint(spec: FineTuneJobSpec) -> str:
        return TrainerConfig(job_name="j", spec=spec, output_root="runs").spec_fingerprint()

    # A job may gain (or lose) an MLflow server between attempts and still resume its checkpoints.
    assert fingerprint(plain) == fingerprint(tracked)
