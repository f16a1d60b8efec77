"""`finetune validate` and `finetune validate --cluster`: a job the operator would refuse is not called plainly valid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api.validate import iter_documents, validate_document
from tests.support.schemas import REPO

LOCAL = REPO / "manifests/examples/digits-source.yaml"  # output: runs (a local directory)
SHARED = REPO / "manifests/examples/digits-cpu.yaml"  # output on a PVC


def finetune(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_OPERATOR_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", *args], cwd=REPO, env=environ, capture_output=True, text=True, timeout=120
    )


def _job(tmp_path: Path, **spec: Any) -> str:
    doc = yaml.safe_load(SHARED.read_text())
    doc["spec"].update(spec)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_plain_validate_says_when_a_job_is_local_only() -> None:
    out = finetune("validate", str(LOCAL), str(SHARED))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [
        f"{LOCAL} (FineTuneJob/digits-source): valid (local only: spec.output.uri 'runs' is not shared by the Ray pods; "
        "see --cluster)",
        f"{SHARED} (FineTuneJob/digits-cpu): valid",
    ]


@pytest.mark.parametrize(
    ("spec", "env", "lines"),
    [
        pytest.param(
            {"output": {"uri": "runs"}},
            {},
            [
                "spec.output.uri: 'runs' is not shared by the Ray pods nor kept after the cluster is deleted; on a cluster use s3://"
            ],
            id="output-not-shared",
        ),
        pytest.param(
            {"resources": {"workers": 4}, "hyperparameters": {"batchSize": 64}},
            {"FINETUNE_OPERATOR_MAX_WORKERS": "2"},
            ["spec.resources.workers: 4 exceeds this operator's limit of 2 (FINETUNE_OPERATOR_MAX_WORKERS)"],
            id="operator-limit-from-the-environment",
        ),
        pytest.param(
            {"output": {"uri": "runs"}, "hyperparameters": {"learningRate": -1}},
            {},
            [
                "spec.hyperparameters.learningRate: -1: should be greater than 0; accepted: > 0 and ≤ 10",
                "spec.output.uri: 'runs' is not shared",
            ],
            id="validation-and-policy-together",
        ),
    ],
)
def test_cluster_applies_the_operators_rules(tmp_path: Path, spec: dict[str, Any], env: dict[str, str], lines: list[str]) -> None:
    path = _job(tmp_path, **spec)
    out = finetune("validate", "--cluster", path, env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    printed = out.stdout.splitlines()
    assert printed[0] == f"{path} (FineTuneJob/digits-cpu): invalid ({len(lines)} error{'s' if len(lines) > 1 else ''})"
    assert len(printed) == 1 + len(lines)
    for fragment in lines:
        assert any(line.startswith(f"  {fragment}") for line in printed[1:]), (fragment, printed)


def test_cluster_accepts_a_job_the_operator_accepts() -> None:
    out = finetune("validate", "--cluster", str(SHARED))
    assert out.returncode == 0 and out.stdout == f"{SHARED} (FineTuneJob/digits-cpu): valid\n"


def test_cluster_with_a_bad_operator_setting_is_a_usage_error() -> None:
    out = finetune("validate", "--cluster", str(SHARED), env={"FINETUNE_OPERATOR_MAX_WORKERS": "many"})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: FINETUNE_OPERATOR_MAX_WORKERS='many'") and out.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("field", "value", "line"),
    [
        ("learningRate", ".nan", "spec.hyperparameters.learningRate: nan is not a number; accepted: > 0 and ≤ 10"),
        (
            "learningRate",
            "11",
            "spec.hyperparameters.learningRate: 11: should be less than or equal to 10; accepted: > 0 and ≤ 10",
        ),
        ("epochs", "0", "spec.hyperparameters.epochs: 0: should be greater than or equal to 1; accepted: ≥ 1 and ≤ 10000"),
    ],
)
def test_a_number_out_of_range_names_the_whole_range(field: str, value: str, line: str) -> None:
    """pydantic names the one bound a value broke (NaN breaks the first checked: "should be ≤ 10" alone)."""
    doc = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
    doc["spec"]["hyperparameters"][field] = yaml.safe_load(value)
    result = validate_document(doc, "job.yaml")
    assert result.errors == [line]


@pytest.mark.parametrize(
    ("field", "text", "error"),
    [
        # kubectl's YAML reader (go-yaml) has no YAML 1.1 base-60 numbers: "1:30" is a string there, refused.
        ("epochs", "1:30", "spec.hyperparameters.epochs: '1:30': should be a valid integer"),
        # A quoted number is a string on the wire, which the API server refuses for an integer or number field.
        ("epochs", '"10"', "spec.hyperparameters.epochs: '10': should be a valid integer"),
        ("learningRate", '"0.01"', "spec.hyperparameters.learningRate: '0.01': should be a valid number"),
        # Exponents are numbers to go-yaml with or without a dot (PyYAML alone read '1e-3' as a string).
        ("learningRate", "1e-3", None),
        ("learningRate", "2E-4", None),
        ("epochs", "0x0a", None),
    ],
)
def test_numbers_are_read_as_kubectl_reads_them(field: str, text: str, error: str | None) -> None:
    """A manifest valid here must be valid on a cluster, where kubectl's YAML reader decides what is a number."""
    lines = (REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text().splitlines()
    edited = [f"{line.split(':')[0]}: {text}" if line.strip().startswith(f"{field}:") else line for line in lines]
    (result,) = iter_documents("\n".join(edited), "job.yaml")
    assert result.errors == ([] if error is None else [error])


def test_a_document_built_in_python_with_objects_no_manifest_holds_is_one_line() -> None:
    doc = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
    doc["spec"]["output"]["uri"] = Path("/tmp/runs")  # what a Python caller of FineTuneJobClient.create may pass
    result = validate_document(doc, "<dict>")
    assert result.errors == [
        "(document): not JSON data (PosixPath is not JSON); a FineTuneJob holds strings, numbers, booleans, lists, maps"
    ]


def test_yaml_timestamps_reach_validation_as_kubectl_writes_them() -> None:
    doc = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
    doc["status"] = {"phase": "Running", "startTime": yaml.safe_load("2026-01-02T03:04:05+01:00")}
    result = validate_document(doc, "job.yaml")
    assert result.ok and result.job is not None and result.job.status is not None
    assert result.job.to_wire()["status"]["startTime"] == "2026-01-02T02:04:05Z"
