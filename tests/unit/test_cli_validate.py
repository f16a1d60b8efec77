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
        # go-yaml reads these as a float64, and Go's JSON writes a whole float64 below 1e21 without a fraction: kubectl
        # sends `epochs: 10`, which the API server takes for an integer field.
        ("epochs", "10.0", None),
        ("epochs", "1e3", None),
        ("epochs", "08", None),  # not octal (8 is no octal digit): go-yaml falls back to the float 8
        ("epochs", "-0.0", "spec.hyperparameters.epochs: 0: should be greater than or equal to 1; accepted: ≥ 1 and ≤ 10000"),
        # A fraction, or an exponent at 1e21 and beyond (Go writes 1e+21), is a float there: refused for an integer field.
        ("epochs", "10.5", "spec.hyperparameters.epochs: 10.5: should be a valid integer"),
        ("epochs", "1e21", "spec.hyperparameters.epochs: 1e+21: should be a valid integer"),
        # Go's integer prefixes, in either case (PyYAML read 0o17, 0X1F and 0B101 as text).
        ("epochs", "0o17", None),
        ("epochs", "0X1F", None),
        ("epochs", "0B101", None),
        ("epochs", "1_000", None),
        # A float64 overflow is text to go-yaml: a string on the wire (PyYAML read infinity).
        ("learningRate", "1e400", "spec.hyperparameters.learningRate: '1e400': should be a valid number"),
        ("epochs", "9" * 5000, f"spec.hyperparameters.epochs: '{'9' * 76}...: should be a valid integer"),
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


def test_a_document_built_in_python_nested_too_deep_is_one_line() -> None:
    doc = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
    inner: dict[str, Any] = {}
    doc["spec"]["x"] = inner
    for _ in range(5000):  # deeper than Python's recursion limit: json.dumps raised RecursionError, a traceback
        inner["x"] = inner = {}
    result = validate_document(doc, "<dict>")
    assert result.errors == ["(document): nested more than 32 levels deep; a FineTuneJob nests six"]


def test_yaml_timestamps_reach_validation_as_kubectl_writes_them() -> None:
    doc = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
    doc["status"] = {"phase": "Running", "startTime": yaml.safe_load("2026-01-02T03:04:05+01:00")}
    result = validate_document(doc, "job.yaml")
    assert result.ok and result.job is not None and result.job.status is not None
    assert result.job.to_wire()["status"]["startTime"] == "2026-01-02T02:04:05Z"


# (id, text replaced in digits-cpu.yaml, its replacement, the error lines)
SCALARS: list[tuple[str, str, str, list[str]]] = [
    # go-yaml v2 reads y, Y, n and N as booleans, as it does yes and no (PyYAML reads them as text).
    ("y-is-true", "    name: resnet18", "    name: y", ["spec.model.name: true: should be a valid string"]),
    ("N-is-false", "    name: resnet18", "    name: N", ["spec.model.name: false: should be a valid string"]),
    # A timestamp is handed to JSON as the text written (not as RFC 3339 in UTC): a valid name, label value or label key.
    ("date-name", "  name: digits-cpu", "  name: 2024-01-02", []),
    ("date-label", "  name: digits-cpu", "  name: digits-cpu\n  labels: {day: 2024-01-02, 2024-01-03: x}", []),
    ("bad-date-is-text", "  name: digits-cpu", "  name: digits-cpu\n  labels: {day: 2024-13-45}", []),
    ("equals-is-text", "  name: digits-cpu", "  name: digits-cpu\n  annotations: {note: =}", []),
    # sigs.k8s.io/yaml refuses a null map key ("unsupported map key"); PyYAML's None was written as "null".
    (
        "null-key",
        "  name: digits-cpu",
        "  name: digits-cpu\n  labels: {~: x}",
        ["metadata.labels: a null key (~) is not accepted: kubectl refuses it; quote it ('null')"],
    ),
    # Go's JSON refuses NaN and infinities: kubectl refuses the file, even where a model would take any number.
    (
        "nan-status",
        "    uri: pvc://finetune-runs/digits\n",
        "    uri: pvc://finetune-runs/digits\nstatus:\n  progress: {loss: .nan}\n",
        ["status.progress.loss: nan is not a number JSON can carry: kubectl refuses it; write a finite number"],
    ),
]


@pytest.mark.parametrize(("old", "new", "errors"), [c[1:] for c in SCALARS], ids=[c[0] for c in SCALARS])
def test_scalars_and_keys_are_read_as_kubectl_reads_them(old: str, new: str, errors: list[str]) -> None:
    text = (REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text()
    assert old in text
    (result,) = iter_documents(text.replace(old, new, 1), "job.yaml")
    assert result.errors == errors


@pytest.mark.parametrize(
    ("merge", "epochs"),
    [
        ("    epochs: 4\n    <<: {epochs: 5}\n", 5),  # a merge after a key overwrites it in go-yaml v2
        ("    <<: {epochs: 5}\n    epochs: 4\n", 4),
        ("    <<: [{epochs: 5}, {epochs: 6}]\n    batchSize: 64\n", 5),  # of merged mappings, the first wins
    ],
)
def test_merge_keys_are_applied_as_kubectl_applies_them(merge: str, epochs: int) -> None:
    text = (REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text()
    text = text.replace("    epochs: 4\n    batchSize: 64\n", merge, 1)
    (result,) = iter_documents(text, "job.yaml")
    assert result.job is not None, result.errors
    assert result.job.spec.hyperparameters.epochs == epochs
