"""Manifests are read by their camelCase names only, at every entry point; Python code keeps its field names.

A snake_case key that pydantic would populate by name is pruned by the API server (the CRD declares only
the camelCase property), so a job that validated locally would silently lose the setting on a cluster.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from finetune_operator.admission import AdmissionError, admit
from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import FineTuneJob, FineTuneJobSpec, HyperparametersSpec, ResourcesSpec
from finetune_operator.api.validate import ManifestError, load_job, validate_spec
from finetune_operator.settings import OperatorSettings

SPEC: dict[str, Any] = {
    "model": {"name": "resnet18"},
    "dataset": {"format": "digits", "imageSize": 32},
    "output": {"uri": "s3://bucket/runs"},
    "hyperparameters": {"learning_rate": 0.05},
}
JOB: dict[str, Any] = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"}, "spec": SPEC}
EXPECTED = "spec.hyperparameters.learning_rate: unknown field 'learning_rate'; write it as 'learningRate'"


def _lines_of_validate_spec() -> list[str]:
    return validate_spec(copy.deepcopy(SPEC))[1]


def _lines_of_load_job() -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_job(json.dumps(JOB), "job.json")
    return info.value.lines


def _lines_of_admit() -> list[str]:
    with pytest.raises(AdmissionError) as info:
        admit(copy.deepcopy(JOB), OperatorSettings())
    return info.value.lines


@pytest.mark.parametrize(
    "lines", [_lines_of_validate_spec, _lines_of_load_job, _lines_of_admit], ids=["validate_spec", "load_job", "admit"]
)
def test_every_manifest_reader_refuses_snake_case(lines: Callable[[], list[str]]) -> None:
    assert any(line.startswith(EXPECTED) for line in lines()), lines()


@pytest.mark.parametrize(
    "parse",
    [
        lambda: FineTuneJobSpec.model_validate(copy.deepcopy(SPEC)),
        lambda: FineTuneJob.model_validate(copy.deepcopy(JOB)),
        lambda: FineTuneJob.parse(copy.deepcopy(JOB)),
        lambda: FineTuneJobSpec.model_validate_json(json.dumps(SPEC)),
        lambda: TrainerConfig.model_validate_json(json.dumps({"jobName": "j", "spec": SPEC, "outputRoot": "/o"})),
        lambda: TrainerConfig.model_validate({"job_name": "j", "spec": {**SPEC, "hyperparameters": {}}, "outputRoot": "/o"}),
    ],
    ids=["spec", "job", "parse", "spec-json", "trainer-config-json", "trainer-config-top-level"],
)
def test_model_validation_refuses_snake_case(parse: Callable[[], object]) -> None:
    with pytest.raises(ValidationError) as info:
        parse()
    assert "extra_forbidden" in {e["type"] for e in info.value.errors()}


def test_python_callers_keep_field_names() -> None:
    assert HyperparametersSpec(learning_rate=0.1).learning_rate == 0.1
    assert ResourcesSpec(gpus_per_worker=1, memory_per_worker="8Gi").gpus_per_worker == 1
    spec = FineTuneJobSpec(
        model={"name": "resnet18"}, dataset={"format": "digits", "image_size": 32}, output={"uri": "runs"}, run_policy={}
    )
    assert spec.dataset.image_size == 32
    # An explicit opt-in for Python-side mappings (not used for manifests).
    assert FineTuneJobSpec.model_validate(copy.deepcopy(SPEC), by_name=True).hyperparameters.learning_rate == 0.05


def test_camel_case_round_trip() -> None:
    spec = FineTuneJobSpec.model_validate({**SPEC, "hyperparameters": {"learningRate": 0.05}})
    assert FineTuneJobSpec.model_validate(spec.to_wire()) == spec
    assert FineTuneJobSpec.model_validate_json(spec.model_dump_json(by_alias=True)) == spec
