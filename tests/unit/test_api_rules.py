"""Cross-field rules of the FineTuneJob spec, judged on valid and invalid specs alike (the invalid-document corpus
only shows refusals; these tables also show what must stay accepted)."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.admission import AdmissionError, admit, policy_errors
from finetune_operator.api import catalog
from finetune_operator.api.v1alpha1 import FineTuneJobSpec
from finetune_operator.api.validate import validate_document, validate_spec
from finetune_operator.settings import OperatorSettings


def _spec(model: dict[str, Any], image_size: int) -> dict[str, Any]:
    return {"model": model, "dataset": {"format": "digits", "imageSize": image_size}, "output": {"uri": "s3://b/o"}}


@pytest.mark.parametrize(
    ("model", "size", "accepted"),
    [
        ({"name": "vit_b_16", "weights": "IMAGENET1K_SWAG_E2E_V1"}, 384, True),
        ({"name": "vit_b_16", "weights": "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1"}, 224, False),
        ({"name": "vit_b_16", "weights": "IMAGENET1K_SWAG_LINEAR_V1"}, 224, True),
        ({"name": "vit_b_16", "weights": "DEFAULT"}, 224, True),
        ({"name": "vit_b_16"}, 224, True),
        ({"name": "vit_b_16", "weightsUri": "s3://b/m.pt"}, 384, False),
        ({"name": "vit_h_14", "weights": "DEFAULT"}, 518, True),
        ({"name": "vit_h_14", "weights": "IMAGENET1K_SWAG_LINEAR_V1"}, 224, True),
        ({"name": "vit_h_14"}, 224, True),
        ({"name": "maxvit_t"}, 256, False),
        ({"name": "inception_v3", "weights": "DEFAULT"}, 75, True),
        ({"name": "inception_v3"}, 74, False),
        ({"name": "regnet_y_16gf", "weights": "IMAGENET1K_SWAG_E2E_V1"}, 224, True),  # a convnet takes any size
        ({"name": "resnet18"}, 32, True),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(map(str, v.values())),
)
def test_image_size_follows_the_chosen_weights(model: dict[str, Any], size: int, accepted: bool) -> None:
    _spec_or_none, errors = validate_spec(_spec(model, size))
    assert (errors == []) is accepted, errors
    assert all(e.startswith("spec.dataset.imageSize: ") for e in errors)


def _fixed_input_weights() -> list[tuple[str, str, int]]:
    return [(m.name, w.member, w.min_size[0]) for m in catalog.load_catalog().values() if m.fixed_input_size for w in m.weights]


@pytest.mark.parametrize(("name", "weights", "size"), _fixed_input_weights())
def test_every_fixed_input_weights_accepts_its_own_size_only(name: str, weights: str, size: int) -> None:
    assert validate_spec(_spec({"name": name, "weights": weights}, size))[1] == []
    other = 224 if size != 224 else 384
    assert validate_spec(_spec({"name": name, "weights": weights}, other))[1] != []


# ------------------------------------------------------------------------------- every mistake, one pass
def _paths(lines: list[str]) -> list[str]:
    return sorted(line.split(": ", 1)[0] for line in lines)


BASE_SPEC: dict[str, Any] = {
    "model": {"name": "resnet18"},
    "dataset": {"format": "digits", "imageSize": 32},
    "output": {"uri": "runs"},
}


@pytest.mark.parametrize(
    ("sections", "paths"),
    [
        pytest.param(
            {"dataset": {"format": "fake", "imageSize": 32, "trainUri": "/t", "validationUri": "/v", "classes": [1, 2]}},
            ["spec.dataset.classes", "spec.dataset.trainUri", "spec.dataset.validationUri"],
            id="one-section-three-rules",
        ),
        pytest.param(
            {
                "hyperparameters": {"batchSize": 10, "epochs": 1, "stepSize": 2},
                "strategy": {"method": "lp-ft"},
                "resources": {"workers": 3},
                "model": {"name": "vit_b_16", "weights": "IMAGENET1K_SWAG_E2E_V1"},
                "dataset": {"format": "digits", "imageSize": 224},
            },
            [
                "spec.dataset.imageSize",
                "spec.hyperparameters.batchSize",
                "spec.hyperparameters.epochs",
                "spec.hyperparameters.stepSize",
            ],
            id="section-rule-and-three-cross-section-rules",
        ),
        pytest.param(
            {"runtime": {"image": "a b"}, "hyperparameters": {"batchSize": 10}, "resources": {"workers": 3}},
            ["spec.hyperparameters.batchSize", "spec.runtime.image"],
            id="field-error-elsewhere-does-not-hide-a-cross-section-rule",
        ),
        pytest.param(
            {"hyperparameters": {"batchSize": 10, "warmupEpochs": 20}, "resources": {"workers": 3}},
            ["spec.hyperparameters.batchSize", "spec.hyperparameters.warmupEpochs"],
            id="section-rule-failure-does-not-hide-a-cross-section-rule",
        ),
        pytest.param(
            {"hyperparameters": {"batchSize": 10, "learningRate": -1}, "resources": {"workers": 3}},
            ["spec.hyperparameters.learningRate"],
            id="a-section-whose-fields-fail-is-not-judged-further",
        ),
        pytest.param(
            {
                "strategy": {"method": "linear-probe"},
                "hyperparameters": {"backboneLearningRate": 0.1, "backboneLrMultiplier": 0.1},
            },
            [
                "spec.hyperparameters.backboneLearningRate",
                "spec.hyperparameters.backboneLrMultiplier",
                "spec.hyperparameters.backboneLrMultiplier",
            ],
            id="both-backbone-rates-with-linear-probe",
        ),
        pytest.param(
            {"model": {"name": "vit_b_16", "weights": "IMAGENET1K_SWAG"}, "dataset": {"format": "digits", "imageSize": 384}},
            ["spec.model.weights"],
            id="unknown-weights-judge-no-image-size",
        ),
        pytest.param(
            {"resources": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x", "tolerationSeconds": 5}]}},
            ["spec.resources.tolerations[0].tolerationSeconds", "spec.resources.tolerations[0].value"],
            id="toleration-rules-together",
        ),
    ],
)
def test_every_mistake_is_reported_in_one_pass(sections: dict[str, Any], paths: list[str]) -> None:
    spec, errors = validate_spec({**BASE_SPEC, **sections})
    assert spec is None
    assert _paths(errors) == sorted(paths), errors


def test_document_reports_api_version_with_the_spec_mistakes() -> None:
    doc = {"apiVersion": "finetune.dev/v1", "kind": "FineTuneJob", "metadata": {"name": "j"}, "spec": {**BASE_SPEC, "x": 1}}
    assert _paths(validate_document(doc).errors) == ["apiVersion", "spec.x"]


def test_another_kind_of_object_is_not_judged_as_a_job() -> None:
    doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}}
    assert _paths(validate_document(doc).errors) == ["apiVersion", "kind"]


def test_admit_reports_policy_errors_with_validation_errors() -> None:
    spec = {**BASE_SPEC, "hyperparameters": {"learningRate": -1}, "resources": {"workers": 100, "gpusPerWorker": 1}}
    with pytest.raises(AdmissionError) as info:
        admit({"metadata": {"name": "j"}, "spec": spec}, OperatorSettings(max_workers=8))
    assert _paths(info.value.lines) == ["spec.hyperparameters.learningRate", "spec.output.uri", "spec.resources.workers"]


def test_data_workers_are_bounded_by_the_operators_limits() -> None:
    """Review F7: maxWorkers bounded the worker pods only; the data pods beside them went unchecked."""
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "resnet18"},
            "dataset": {"format": "digits"},
            "output": {"uri": "s3://bucket/runs"},
            "resources": {"workers": 1, "dataWorkers": {"replicas": 256, "cpusPerWorker": 512, "memoryPerWorker": "4Ti"}},
        }
    )
    errors = policy_errors(spec, OperatorSettings(max_workers=2))
    assert errors == [
        "spec.resources.dataWorkers.replicas: 256 exceeds this operator's limit of 16 "
        "(FINETUNE_OPERATOR_MAX_DATA_WORKERS); ask for fewer data workers"
    ]
    assert policy_errors(spec, OperatorSettings(max_data_workers=256)) == []


# ------------------------------------------------------------ Kubernetes syntax: what must stay accepted
@pytest.mark.parametrize(
    ("section", "value"),
    [
        ("resources", {"accelerator": "amd.com/gpu"}),
        ("resources", {"accelerator": "gpu.intel.com/i915"}),
        ("resources", {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "gpu": ""}}),
        ("resources", {"tolerations": [{"key": "", "operator": "Exists"}, {"operator": "Exists", "effect": "NoSchedule"}]}),
        ("resources", {"tolerations": [{"key": "nvidia.com/gpu", "effect": "NoExecute", "tolerationSeconds": 60}]}),
        ("runtime", {"env": [{"name": "my.setting-1", "value": "x"}, {"name": ".hidden", "value": "y"}, {"name": "_X"}]}),
        ("runtime", {"envFrom": [{"configMapRef": {"name": "c"}, "prefix": "_S3_"}]}),
        ("runtime", {"image": "trainer"}),
        ("runtime", {"image": "localhost:5000/team/trainer:v1.2.3-rc_1"}),
        ("runtime", {"image": "ghcr.io/acme/trainer@sha256:" + "a" * 64}),
        ("runtime", {"image": "Registry.Example.com/a__b/c-d.e:latest"}),
        ("runPolicy", {"activeDeadlineSeconds": 2**31 - 1}),
        ("output", {"uri": "pvc://models/runs/..hidden/x"}),
        ("output", {"uri": "file:///tmp/../runs"}),
        ("output", {"uri": "../runs"}),
        ("dataset", {"format": "digits", "imageSize": 32, "cacheDir": "pvc://cache/datasets"}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_kubernetes_syntax_accepts_what_kubernetes_accepts(section: str, value: dict[str, Any]) -> None:
    assert validate_spec({**BASE_SPEC, section: value})[1] == []
