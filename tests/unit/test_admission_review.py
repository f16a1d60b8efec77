"""The admission webhook's decision (``admission.review``), without Kopf: every invalid document of the corpus
(tests/unit/test_api_invalid.py) is refused with exactly the lines ``finetune validate --cluster`` prints, and an
update may change ``spec.runPolicy.suspend`` and nothing else of the spec."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import cli
from finetune_operator.admission import SUSPEND_ONLY, denial, review, spec_changes
from finetune_operator.settings import OperatorSettings
from tests.support.schemas import REPO
from tests.unit.test_api_invalid import invalid_documents

EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
DEFAULTS = OperatorSettings()


def _job(**spec: Any) -> dict[str, Any]:
    """The shared-output example job, as the API server sends it (server-written metadata included)."""
    job = copy.deepcopy(EXAMPLE)
    job["metadata"] |= {"namespace": "team-a", "uid": "0f3c", "resourceVersion": "7", "generation": 1, "managedFields": []}
    for section, fields in spec.items():
        job["spec"][section] = {**job["spec"].get(section, {}), **fields}
    return job


# The corpus, plus what only the operator refuses (its limits, its cluster rules) and what it accepts.
CASES: list[tuple[str, dict[str, Any], OperatorSettings]] = [
    *((name, document, DEFAULTS) for name, document in invalid_documents()),
    ("above-max-workers", _job(resources={"workers": 4}, hyperparameters={"batchSize": 64}), OperatorSettings(max_workers=2)),
    ("above-max-gpus", _job(resources={"gpusPerWorker": 2}), OperatorSettings(max_gpus_per_worker=1)),
    ("relative-input", _job(dataset={"format": "imagefolder", "trainUri": "data/train"}), DEFAULTS),
    ("valid", _job(), DEFAULTS),
]


def _cli_lines(document: dict[str, Any], settings: OperatorSettings, tmp_path: Path, capsys: Any, env: Any) -> list[str]:
    """What `finetune validate --cluster` prints for the document under these settings, one line per mistake."""
    for variable in OperatorSettings().to_env():
        env.delenv(variable, raising=False)
    for variable, value in settings.to_env().items():
        env.setenv(variable, value)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    status = cli.main(["validate", "--cluster", str(path)])
    printed = capsys.readouterr().out.splitlines()
    assert status == (1 if len(printed) > 1 else 0), printed
    return [line.removeprefix("  ") for line in printed[1:]]


@pytest.mark.parametrize(("document", "settings"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_create_is_refused_with_the_lines_of_validate_cluster(
    document: dict[str, Any], settings: OperatorSettings, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _cli_lines(document, settings, tmp_path, capsys, monkeypatch)
    assert review("CREATE", document, None, settings) == expected


def test_every_invalid_document_of_the_corpus_is_refused() -> None:
    corpus = list(invalid_documents())
    assert len(corpus) >= 40
    assert all(review("CREATE", document, None, DEFAULTS) for _, document in corpus)


def test_the_denial_is_one_mistake_a_line() -> None:
    assert denial(["spec.a: bad", "spec.b: worse"]) == "invalid FineTuneJob (2 errors):\n  spec.a: bad\n  spec.b: worse"
    assert denial(["spec.a: bad"]).splitlines() == ["invalid FineTuneJob (1 error):", "  spec.a: bad"]


def _changed(job: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    job = copy.deepcopy(job)
    *parents, last = path.split(".")
    node = job
    for key in parents:
        node = node.setdefault(key, {})
    if value is REMOVE:
        del node[last]
    else:
        node[last] = value
    return job


REMOVE = object()
OLD = _job(resources={"workers": 2}, runtime={"env": [{"name": "A", "value": "1"}]})


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        pytest.param("spec.runPolicy.suspend", True, [], id="suspend"),
        pytest.param("spec.runPolicy", {"suspend": True}, [], id="run-policy-added-to-suspend"),
        pytest.param("spec.runPolicy", {"backoffLimit": 0, "maxWorkerFailures": 0}, [], id="defaults-spelled-out"),
        pytest.param("metadata.labels", {"team": "vision"}, [], id="labels"),
        pytest.param("metadata.annotations", {"finetune.dev/last-handled-configuration": "{}"}, [], id="operator-annotation"),
        pytest.param("metadata.finalizers", [], [], id="finalizers"),
        pytest.param("status", {"phase": "Running"}, [], id="status"),
        pytest.param(
            "spec.model.name",
            "resnet50",
            ["spec.model.name: changed from 'resnet18' to 'resnet50'"],
            id="model-name",
        ),
        pytest.param("spec.resources.workers", True, ["spec.resources.workers: changed from 2 to true"], id="int-to-bool"),
        pytest.param("spec.resources.workers", REMOVE, ["spec.resources.workers: 2 was removed"], id="field-removed"),
        pytest.param(
            "spec.runtime",
            {"env": [{"name": "A", "value": "1"}], "queueName": "gpu"},
            ["spec.runtime.queueName: 'gpu' was added"],
            id="field-added",
        ),
        pytest.param("spec.strategy", REMOVE, ["spec.strategy: {'method': 'full'} was removed"], id="section-removed"),
        pytest.param(
            "spec.runtime.env",
            [{"name": "A", "value": "2"}],
            ["spec.runtime.env: changed from [{'name': 'A', 'value': '1'}] to [{'name': 'A', 'value': '2'}]"],
            id="list-item",
        ),
        pytest.param(
            "spec.runPolicy",
            {"suspend": True, "ttlSecondsAfterFinished": 60},
            ["spec.runPolicy.ttlSecondsAfterFinished: changed from null to 60"],  # null: the platform default
            id="run-policy-field",
        ),
        pytest.param(
            "spec.output",
            {"uri": "s3://bucket/other", "exports": ["onnx"]},
            ["spec.output.uri: changed from 'pvc://finetune-runs/digits' to 's3://bucket/other'", "spec.output.exports: "],
            id="two-changes-two-lines",
        ),
    ],
)
def test_update_may_change_suspend_only(path: str, value: Any, expected: list[str]) -> None:
    lines = review("UPDATE", _changed(OLD, path, value), OLD, DEFAULTS)
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start) and line.endswith(f"; {SUSPEND_ONLY}"), line


def test_an_update_does_not_judge_the_job_again() -> None:
    """Admitted under the limits of its day: a lower maxWorkers must not block its suspension or its labels."""
    old = _job(resources={"workers": 8}, hyperparameters={"batchSize": 64})
    stricter = OperatorSettings(max_workers=2)
    assert review("CREATE", old, None, stricter) != []
    assert review("UPDATE", _changed(old, "spec.runPolicy", {"suspend": True}), old, stricter) == []
    assert review("UPDATE", _changed(old, "metadata.labels", {"a": "b"}), old, stricter) == []


@pytest.mark.parametrize("operation", ["DELETE", "CONNECT"])
def test_other_operations_are_allowed(operation: str) -> None:
    assert review(operation, None, _job(), DEFAULTS) == []


def test_spec_changes_of_a_spec_that_is_not_an_object() -> None:
    expected = f"spec: changed from {{'model': {{'name': 'a'}}}} to 'train'; {SUSPEND_ONLY}"
    assert spec_changes({"model": {"name": "a"}}, "train") == [expected]
