"""The API subcommands of `finetune`, run as a user runs them (a subprocess of the installed script)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_operator.api.explain import UnknownFieldError, explain
from tests.support.schemas import REPO


def finetune(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=120
    )


def test_validate_examples_exit_zero() -> None:
    examples = sorted(str(p) for p in (REPO / "manifests" / "examples").glob("*.yaml"))
    out = finetune("validate", *examples)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": valid") == len(examples)


def test_validate_reports_each_bad_document_and_exits_one(tmp_path: Path) -> None:
    good = yaml.safe_load((REPO / "manifests/examples/digits-cpu.yaml").read_text())
    bad = yaml.safe_load((REPO / "manifests/examples/digits-cpu.yaml").read_text())
    bad["metadata"]["name"] = "bad"
    bad["spec"]["model"]["name"] = "resnet5"
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump_all([good, bad]))
    out = finetune("validate", str(path))
    assert out.returncode == 1
    assert f"{path}[0] (FineTuneJob/digits-cpu): valid" in out.stdout
    assert f"{path}[1] (FineTuneJob/bad): invalid (1 error)" in out.stdout
    assert "  spec.model.name: 'resnet5' is not a torchvision classification model" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("spec: [unclosed", "not valid YAML at line "),  # libyaml places the end of this one-line file on line 2
        ("", "holds no YAML document"),
        ("- just\n- a list\n", "expected a FineTuneJob object"),
    ],
)
def test_validate_broken_yaml(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    out = finetune("validate", str(path))
    assert out.returncode == 1
    assert fragment in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_validate_missing_file() -> None:
    out = finetune("validate", "/nonexistent/job.yaml")
    assert out.returncode == 1
    assert "/nonexistent/job.yaml: cannot read" in out.stderr


def test_validate_an_empty_path_names_it() -> None:
    out = finetune("validate", "")
    assert out.returncode == 1
    assert out.stderr.strip() == ": cannot read: '' (an empty path) names no file; give a manifest's path, or - for stdin"


def test_validate_stdin() -> None:
    out = finetune("validate", "-", stdin=(REPO / "manifests/examples/digits-cpu.yaml").read_text())
    assert out.returncode == 0 and "valid" in out.stdout


def test_crd_prints_the_committed_crd() -> None:
    out = finetune("crd")
    assert out.returncode == 0
    assert out.stdout == (REPO / "manifests/base/crd.yaml").read_text()


@pytest.mark.parametrize(
    ("field", "fragments"),
    [
        (
            "spec.hyperparameters.learningRate",
            ["FIELD:       learningRate <number>", "DEFAULT:     0.001", "RANGE:       > 0, <= 10"],
        ),
        ("spec.strategy.method", ["ALLOWED:     linear-probe, partial, full, lp-ft", "DEFAULT:     full"]),
        ("spec.model", ["name\t<string> -required-", "weightsUri\t<string>"]),
        ("spec.resources.tolerations", ["FIELD:       tolerations <[]object>", "effect\t<string>"]),
        ("SPEC.MODEL.NAME", ["PATH:        spec.model.name", "80 values"]),
        ("", ["RESOURCE:    FineTuneJob <object>", "spec\t<object> -required-"]),
    ],
)
def test_explain(field: str, fragments: list[str]) -> None:
    out = finetune("explain", field) if field else finetune("explain")
    assert out.returncode == 0, out.stderr
    for fragment in fragments:
        assert fragment in out.stdout


def test_explain_unknown_field_lists_alternatives() -> None:
    out = finetune("explain", "spec.hyperparameters.lr")
    assert out.returncode == 1
    assert "field 'lr' does not exist in spec.hyperparameters" in out.stderr
    assert "learningRate" in out.stderr


LONG = "y" * 10_000


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        # An empty segment was dropped: spec..x explained spec.x, spec. explained spec.
        *(
            (path, f"{path!r} is not a field path: it has an empty segment; accepted: field names separated by single dots")
            for path in ("spec..model", "spec.", ".spec")
        ),
        (f"spec.{LONG}", "field 'yyyyyyyy"),
        (f"spec.{LONG}.", "'spec.yyyyyyy"),
        # metadata, a map's keys, a core/v1 object and a scalar all read "fields there: (none: a leaf)".
        ("metadata.name", "metadata is Kubernetes' standard ObjectMeta (name, namespace, labels, annotations, ...)"),
        ("metadata.name", "documented by `kubectl explain pods.metadata.name`"),
        (f"metadata.{LONG}", "documented by `kubectl explain pods.metadata`"),
        ("spec.resources.nodeSelector.gpu", "spec.resources.nodeSelector is a map (map[string]string) with free-form keys"),
        ("spec.runtime.pod.volumes.configMap.name", "core/v1 ConfigMapVolumeSource, passed to the pods as written"),
        ("spec.runtime.pod.affinity.nodeAffinity.x", "`kubectl explain pods.spec.affinity.nodeAffinity`"),
        (
            "spec.hyperparameters.epochs.max",
            "spec.hyperparameters.epochs is a leaf of type integer: it has no fields, so no 'max'",
        ),
    ],
)
def test_explain_a_path_past_the_schema_says_what_it_reached(field: str, expected: str) -> None:
    with pytest.raises(UnknownFieldError) as raised:
        explain(field)
    message = str(raised.value)
    assert expected in message
    assert "\n" not in message and len(message) < 300, message  # one line, the 10,000-character path shortened
    assert "(none: a leaf)" not in message


def test_explain_metadata_describes_object_meta() -> None:
    assert "standard ObjectMeta" in explain("metadata") and "(no description)" not in explain("metadata")
    assert explain("") == explain("finetunejob")  # the whole resource, as before


def test_explain_cli_prints_one_error_line() -> None:
    out = finetune("explain", "spec..x")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "error: 'spec..x' is not a field path: it has an empty segment; "
        "accepted: field names separated by single dots, e.g. spec.hyperparameters.epochs"
    ]


@pytest.mark.parametrize("field", ["", "  "], ids=["empty", "blank"])
def test_explain_an_empty_field_path_is_one_error_line(field: str) -> None:
    """kubectl explain refuses an empty path; `finetune explain ""` explained the whole resource (as no path does)."""
    out = finetune("explain", field)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"error: FIELD.PATH {field!r} names no field; accepted: field names separated by single dots, "
        "e.g. spec.hyperparameters.epochs, or no FIELD.PATH for the whole FineTuneJob"
    ]


def test_models_lists_weights_with_metadata() -> None:
    out = finetune("models", "--family", "resnet")
    assert out.returncode == 0
    line = next(row for row in out.stdout.splitlines() if "ResNet50_Weights.IMAGENET1K_V2" in row)
    assert "*" in line and "25.6" in line and "4.09" in line and "80.86" in line and "224" in line
    assert "vit_b_16" not in out.stdout


def test_models_unknown_family() -> None:
    out = finetune("models", "--family", "transformerz")
    assert out.returncode == 1
    assert "resnet" in out.stderr and "vision_transformer" in out.stderr
