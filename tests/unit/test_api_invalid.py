"""Table-driven: every kind of mistake a user can make in a FineTuneJob gets a one-line message that
names the field path, quotes the bad value where there is one, and says what is accepted."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from finetune_operator.api.validate import validate_document

BASE: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "job"},
    "spec": {
        "model": {"name": "resnet18"},
        "dataset": {"format": "digits", "imageSize": 32},
        "output": {"uri": "runs"},
    },
}


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    for key in keys[:-1]:
        doc = doc.setdefault(key, {})
    if value is _DELETE:
        doc.pop(keys[-1], None)
    else:
        doc[keys[-1]] = value


_DELETE = object()

# (id, {path: value} changes to BASE, expected field path, substrings the message must contain)
CASES: list[tuple[str, dict[str, Any], str, list[str]]] = [
    ("model-name-typo", {"spec.model.name": "resnet5"}, "spec.model.name", ["'resnet5'", "did you mean", "resnet50"]),
    ("model-name-case", {"spec.model.name": "ResNet50"}, "spec.model.name", ["'ResNet50'", "resnet50"]),
    (
        "model-name-segmentation",
        {"spec.model.name": "deeplabv3_resnet50"},
        "spec.model.name",
        ["not a torchvision classification model"],
    ),
    ("model-name-missing", {"spec.model.name": _DELETE}, "spec.model.name", ["required"]),
    (
        "ingest-streaming-digits",
        {"spec.dataset.ingest": "streaming"},
        "spec.dataset.ingest",
        ["'streaming'", "imagefolder", "'digits'", "'mapStyle'"],
    ),
    (
        "jpeg-decode-gpu-map-style",
        {"spec.dataset": {"trainUri": "/d", "jpegDecode": "gpu"}},
        "spec.dataset.jpegDecode",
        ["'gpu'", "ingest 'streaming'", "jpegDecode: cpu"],
    ),
    (
        "jpeg-decode-gpu-no-gpus",
        {"spec.dataset": {"trainUri": "/d", "ingest": "streaming", "jpegDecode": "gpu"}},
        "spec.dataset.jpegDecode",
        ["'gpu'", "gpusPerWorker"],
    ),
    ("ingest-unknown", {"spec.dataset.ingest": "copy"}, "spec.dataset.ingest", ["'copy'", "streaming", "mapStyle"]),
    (
        "weights-wrong-model",
        {"spec.model.name": "resnet50", "spec.model.weights": "ResNet18_Weights.IMAGENET1K_V1"},
        "spec.model.weights",
        ["'ResNet18_Weights.IMAGENET1K_V1'", "ResNet50_Weights.IMAGENET1K_V2"],
    ),
    ("weights-unknown-member", {"spec.model.weights": "IMAGENET22K"}, "spec.model.weights", ["'IMAGENET22K'", "DEFAULT"]),
    (
        "weights-and-uri",
        {"spec.model.weights": "DEFAULT", "spec.model.weightsUri": "/models/a.pt"},
        "spec.model.weightsUri",
        ["not both"],
    ),
    (
        "weights-uri-http",
        {"spec.model.weightsUri": "https://example.com/a.pt"},
        "spec.model.weightsUri",
        ["'https://example.com/a.pt'", "s3://"],
    ),
    ("weights-uri-s3-no-bucket", {"spec.model.weightsUri": "s3:///a.pt"}, "spec.model.weightsUri", ["no bucket"]),
    ("num-classes-one", {"spec.model.numClasses": 1}, "spec.model.numClasses", ["1", "greater than or equal to 2"]),
    (
        "num-classes-digits-mismatch",
        {"spec.model.numClasses": 7, "spec.dataset.classes": [1, 2, 3]},
        "spec.model.numClasses",
        ["7", "3"],
    ),
    ("num-classes-string", {"spec.model.numClasses": "ten"}, "spec.model.numClasses", ["'ten'", "integer"]),
    ("dataset-format", {"spec.dataset.format": "csv"}, "spec.dataset.format", ["'csv'", "'imagefolder'", "'digits'", "'fake'"]),
    ("imagefolder-needs-train-uri", {"spec.dataset.format": "imagefolder"}, "spec.dataset.trainUri", ["required", "imagefolder"]),
    ("digits-with-train-uri", {"spec.dataset.trainUri": "/data/train"}, "spec.dataset.trainUri", ["'/data/train'", "digits"]),
    (
        "train-uri-ftp",
        {"spec.dataset.format": "imagefolder", "spec.dataset.trainUri": "ftp://host/data"},
        "spec.dataset.trainUri",
        ["'ftp://host/data'", "gs://"],
    ),
    (
        "train-uri-empty",
        {"spec.dataset.format": "imagefolder", "spec.dataset.trainUri": ""},
        "spec.dataset.trainUri",
        ["at least 1"],
    ),
    (
        "validation-uri-and-split",
        {
            "spec.dataset.format": "imagefolder",
            "spec.dataset.trainUri": "/d/t",
            "spec.dataset.validationUri": "/d/v",
            "spec.dataset.validationSplit": 0.1,
        },
        "spec.dataset.validationSplit",
        ["not both"],
    ),
    (
        "validation-split-one",
        {"spec.dataset.validationSplit": 1.0},
        "spec.dataset.validationSplit",
        ["validationSplit: 1: should be less than 1"],
    ),
    ("validation-split-zero", {"spec.dataset.validationSplit": 0}, "spec.dataset.validationSplit", ["greater than 0"]),
    ("classes-out-of-range", {"spec.dataset.classes": [3, 12]}, "spec.dataset.classes[1]", ["12", "less than or equal to 9"]),
    ("classes-repeated", {"spec.dataset.classes": [3, 3]}, "spec.dataset.classes", ["[3, 3]", "once"]),
    ("classes-single", {"spec.dataset.classes": [3]}, "spec.dataset.classes", ["at least 2"]),
    (
        "classes-on-imagefolder",
        {"spec.dataset.format": "imagefolder", "spec.dataset.trainUri": "/d", "spec.dataset.classes": [1, 2]},
        "spec.dataset.classes",
        ["digits"],
    ),
    ("image-size-tiny", {"spec.dataset.imageSize": 8}, "spec.dataset.imageSize", ["8", "greater than or equal to 16"]),
    ("image-size-vit", {"spec.model.name": "vit_b_16", "spec.dataset.imageSize": 64}, "spec.dataset.imageSize", ["64", "224"]),
    (
        "image-size-below-model-min",
        {"spec.model.name": "inception_v3", "spec.dataset.imageSize": 32},
        "spec.dataset.imageSize",
        ["32", "75"],
    ),
    # The size follows the chosen weights, not the model's first weights.
    (
        "image-size-vit-swag-e2e",
        {"spec.model.name": "vit_b_16", "spec.model.weights": "IMAGENET1K_SWAG_E2E_V1", "spec.dataset.imageSize": 224},
        "spec.dataset.imageSize",
        ["224", "IMAGENET1K_SWAG_E2E_V1", "set imageSize: 384"],
    ),
    (
        "image-size-vit-default-weights",
        {"spec.model.name": "vit_h_14", "spec.model.weights": "DEFAULT", "spec.dataset.imageSize": 224},
        "spec.dataset.imageSize",
        ["224", "IMAGENET1K_SWAG_E2E_V1", "set imageSize: 518"],
    ),
    (
        "image-size-vit-no-weights",
        {"spec.model.name": "vit_h_14", "spec.dataset.imageSize": 518},
        "spec.dataset.imageSize",
        ["518", "without torchvision weights", "set imageSize: 224"],
    ),
    (
        "augmentation-unknown",
        {"spec.dataset.augmentation": "heavy"},
        "spec.dataset.augmentation",
        ["'heavy'", "'trivialaugment'"],
    ),
    (
        "dataset-field-typo",
        {"spec.dataset.augmentaton": "light"},
        "spec.dataset.augmentaton",
        ["unknown field", "did you mean 'augmentation'"],
    ),
    ("fake-options-on-digits", {"spec.dataset.fake": {"samples": 10}}, "spec.dataset.fake", ["fake"]),
    (
        "loader-workers-negative",
        {"spec.dataset.loaderWorkers": -1},
        "spec.dataset.loaderWorkers",
        ["-1", "greater than or equal to 0"],
    ),
    (
        "strategy-method",
        {"spec.strategy.method": "finetune"},
        "spec.strategy.method",
        ["'finetune'", "'linear-probe'", "'lp-ft'"],
    ),
    ("partial-needs-blocks", {"spec.strategy.method": "partial"}, "spec.strategy.unfreezeBlocks", ["required", "partial"]),
    (
        "blocks-without-partial",
        {"spec.strategy.method": "full", "spec.strategy.unfreezeBlocks": 2},
        "spec.strategy.unfreezeBlocks",
        ["partial"],
    ),
    (
        "probe-epochs-without-lpft",
        {"spec.strategy.method": "full", "spec.strategy.probeEpochs": 2},
        "spec.strategy.probeEpochs",
        ["lp-ft"],
    ),
    (
        "probe-epochs-too-many",
        {"spec.strategy.method": "lp-ft", "spec.strategy.probeEpochs": 10, "spec.hyperparameters.epochs": 10},
        "spec.strategy.probeEpochs",
        ["10", "less than"],
    ),
    (
        "lpft-one-epoch",
        {"spec.strategy.method": "lp-ft", "spec.hyperparameters.epochs": 1},
        "spec.hyperparameters.epochs",
        ["lp-ft", "at least 2"],
    ),
    ("epochs-zero", {"spec.hyperparameters.epochs": 0}, "spec.hyperparameters.epochs", ["0", "greater than or equal to 1"]),
    (
        "batch-not-divisible",
        {"spec.hyperparameters.batchSize": 10, "spec.resources.workers": 3},
        "spec.hyperparameters.batchSize",
        ["10", "resources.workers (3)", "multiple of 3"],
    ),
    (
        "optimizer-adam",
        {"spec.hyperparameters.optimizer": "adam"},
        "spec.hyperparameters.optimizer",
        ["'adam'", "'adamw'", "'sgd'"],
    ),
    (
        "learning-rate-negative",
        {"spec.hyperparameters.learningRate": -0.1},
        "spec.hyperparameters.learningRate",
        ["-0.1", "greater than 0"],
    ),
    (
        "learning-rate-string",
        {"spec.hyperparameters.learningRate": "fast"},
        "spec.hyperparameters.learningRate",
        ["'fast'", "number"],
    ),
    (
        "backbone-rate-both",
        {"spec.hyperparameters.backboneLearningRate": 0.001, "spec.hyperparameters.backboneLrMultiplier": 0.1},
        "spec.hyperparameters.backboneLrMultiplier",
        ["not both"],
    ),
    (
        "backbone-rate-linear-probe",
        {"spec.strategy.method": "linear-probe", "spec.hyperparameters.backboneLrMultiplier": 0.1},
        "spec.hyperparameters.backboneLrMultiplier",
        ["linear-probe"],
    ),
    (
        "multiplier-above-one",
        {"spec.hyperparameters.backboneLrMultiplier": 2},
        "spec.hyperparameters.backboneLrMultiplier",
        ["2", "less than or equal to 1"],
    ),
    (
        "scheduler-unknown",
        {"spec.hyperparameters.scheduler": "onecycle"},
        "spec.hyperparameters.scheduler",
        ["'onecycle'", "'cosine'"],
    ),
    (
        "warmup-too-long",
        {"spec.hyperparameters.warmupEpochs": 10, "spec.hyperparameters.epochs": 10},
        "spec.hyperparameters.warmupEpochs",
        ["10", "less than epochs"],
    ),
    ("step-size-without-step", {"spec.hyperparameters.stepSize": 3}, "spec.hyperparameters.stepSize", ["step"]),
    (
        "sync-batch-norm-on-cpu",
        {"spec.strategy.syncBatchNorm": True, "spec.resources.gpusPerWorker": 0},
        "spec.strategy.syncBatchNorm",
        ["true", "gpusPerWorker", "CPU"],
    ),
    ("label-smoothing-one", {"spec.hyperparameters.labelSmoothing": 1}, "spec.hyperparameters.labelSmoothing", ["less than 1"]),
    (
        "mixed-precision",
        {"spec.hyperparameters.mixedPrecision": "fp8"},
        "spec.hyperparameters.mixedPrecision",
        ["'fp8'", "'bf16'"],
    ),
    (
        "mixed-precision-bool",
        {"spec.hyperparameters.mixedPrecision": True},
        "spec.hyperparameters.mixedPrecision",
        ["true", "'no'"],
    ),
    ("grad-clip-zero", {"spec.hyperparameters.gradClipNorm": 0}, "spec.hyperparameters.gradClipNorm", ["greater than 0"]),
    ("seed-negative", {"spec.hyperparameters.seed": -5}, "spec.hyperparameters.seed", ["-5"]),
    (
        "early-stopping-patience",
        {"spec.hyperparameters.earlyStopping": {"patience": 0}},
        "spec.hyperparameters.earlyStopping.patience",
        ["0"],
    ),
    (
        "hyperparameter-typo",
        {"spec.hyperparameters.learningrate": 0.1},
        "spec.hyperparameters.learningrate",
        ["did you mean 'learningRate'"],
    ),
    ("workers-zero", {"spec.resources.workers": 0}, "spec.resources.workers", ["0", "greater than or equal to 1"]),
    ("gpus-negative", {"spec.resources.gpusPerWorker": -1}, "spec.resources.gpusPerWorker", ["-1"]),
    ("cpus-zero", {"spec.resources.cpusPerWorker": 0}, "spec.resources.cpusPerWorker", ["greater than 0"]),
    ("memory-bad-unit", {"spec.resources.memoryPerWorker": "4GB"}, "spec.resources.memoryPerWorker", ["'4GB'", "4Gi"]),
    (
        "accelerator-bad",
        {"spec.resources.accelerator": "nvidia gpu"},
        "spec.resources.accelerator",
        ["'nvidia gpu'", "nvidia.com/gpu"],
    ),
    # The accelerator is an extended resource: a standard name would render `memory: 1` or overwrite the CPU request.
    (
        "accelerator-memory",
        {"spec.resources.accelerator": "memory"},
        "spec.resources.accelerator",
        ["'memory'", "nvidia.com/gpu or amd.com/gpu"],
    ),
    ("accelerator-cpu", {"spec.resources.accelerator": "cpu"}, "spec.resources.accelerator", ["'cpu'", "cpusPerWorker"]),
    (
        "accelerator-hugepages",
        {"spec.resources.accelerator": "hugepages-2Mi"},
        "spec.resources.accelerator",
        ["'hugepages-2Mi'", "extended resource name with a domain"],
    ),
    (
        "accelerator-kubernetes-domain",
        {"spec.resources.accelerator": "kubernetes.io/batteries"},
        "spec.resources.accelerator",
        ["'kubernetes.io/batteries'", "not an extended resource", "nvidia.com/gpu"],
    ),
    (
        "accelerator-quota-name",
        {"spec.resources.accelerator": "requests.nvidia.com/gpu"},
        "spec.resources.accelerator",
        ["'requests.nvidia.com/gpu'", "nvidia.com/gpu"],
    ),
    # Kubernetes syntax, checked here rather than by the API server when the RayJob is created.
    (
        "node-selector-key-space",
        {"spec.resources.nodeSelector": {"gpu type": "a100"}},
        "spec.resources.nodeSelector",
        ["key 'gpu type'", "label key"],
    ),
    (
        "node-selector-key-name-too-long",
        {"spec.resources.nodeSelector": {"example.com/" + "n" * 64: "x"}},
        "spec.resources.nodeSelector",
        ["key 'example.com/nnn", "at most 63"],
    ),
    (
        "node-selector-key-prefix-too-long",
        {"spec.resources.nodeSelector": {"p" * 254 + "/gpu": "x"}},
        "spec.resources.nodeSelector",
        ["key 'ppp", "254 characters", "at most 253"],
    ),
    (
        "node-selector-value",
        {"spec.resources.nodeSelector": {"nvidia.com/gpu.product": "A100 80GB"}},
        "spec.resources.nodeSelector['nvidia.com/gpu.product']",
        ["'A100 80GB'", "label value"],
    ),
    (
        "node-selector-value-too-long",
        {"spec.resources.nodeSelector": {"gpu": "v" * 64}},
        "spec.resources.nodeSelector['gpu']",
        ["'vvv", "at most 63"],
    ),
    (
        "toleration-key",
        {"spec.resources.tolerations": [{"key": "gpu/", "operator": "Exists"}]},
        "spec.resources.tolerations[0].key",
        ["'gpu/'", "taint key such as nvidia.com/gpu"],
    ),
    (
        "toleration-value",
        {"spec.resources.tolerations": [{"key": "gpu", "value": "a100 sxm"}]},
        "spec.resources.tolerations[0].value",
        ["'a100 sxm'", "label value"],
    ),
    (
        "toleration-exists-with-value",
        {"spec.resources.tolerations": [{"key": "gpu", "operator": "Exists", "value": "a100"}]},
        "spec.resources.tolerations[0].value",
        ["'a100'", "remove the value"],
    ),
    (
        "toleration-no-key-equal",
        {"spec.resources.tolerations": [{"effect": "NoSchedule"}]},
        "spec.resources.tolerations[0].operator",
        ["'Equal' (the default)", "operator 'Exists'"],
    ),
    (
        "toleration-seconds-not-noexecute",
        {"spec.resources.tolerations": [{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 30}]},
        "spec.resources.tolerations[0].tolerationSeconds",
        ["30", "'NoSchedule'", "effect: NoExecute"],
    ),
    (
        "toleration-operator",
        {"spec.resources.tolerations": [{"key": "gpu", "operator": "In"}]},
        "spec.resources.tolerations[0].operator",
        ["'In'", "'Exists'"],
    ),
    (
        "toleration-effect",
        {"spec.resources.tolerations": [{"key": "gpu", "effect": "NoRun"}]},
        "spec.resources.tolerations[0].effect",
        ["'NoRun'", "'NoSchedule'"],
    ),
    (
        "node-selector-list",
        {"spec.resources.nodeSelector": ["gpu"]},
        "spec.resources.nodeSelector",
        ["['gpu']", "key: value mapping"],
    ),
    ("output-missing", {"spec.output": _DELETE}, "spec.output", ["required"]),
    ("output-uri-http", {"spec.output.uri": "http://bucket/models"}, "spec.output.uri", ["'http://bucket/models'", "pvc://"]),
    ("output-pvc-bad-claim", {"spec.output.uri": "pvc://Model_Store/x"}, "spec.output.uri", ["claim name"]),
    (
        "output-pvc-escapes-volume",
        {"spec.output.uri": "pvc://models/../../etc"},
        "spec.output.uri",
        ["'pvc://models/../../etc'", "'..' segment", "without '..'"],
    ),
    (
        "train-uri-pvc-escapes-volume",
        {"spec.dataset.format": "imagefolder", "spec.dataset.trainUri": "pvc://data/train/.."},
        "spec.dataset.trainUri",
        ["'pvc://data/train/..'", "without '..'"],
    ),
    ("output-s3-dot-dot", {"spec.output.uri": "s3://bucket/a/../b"}, "spec.output.uri", ["'s3://bucket/a/../b'", "literal key"]),
    ("output-uri-newline", {"spec.output.uri": "runs\nrm -rf"}, "spec.output.uri", ["'runs\\nrm -rf'", "control character"]),
    (
        "cache-dir-object-store",
        {"spec.dataset.cacheDir": "s3://bucket/cache"},
        "spec.dataset.cacheDir",
        ["'s3://bucket/cache'", "pvc://"],
    ),
    (
        "cache-dir-scheme",
        {"spec.dataset.cacheDir": "https://host/cache"},
        "spec.dataset.cacheDir",
        ["'https://host/cache'", "file://"],
    ),
    ("export-format", {"spec.output.exports": ["pickle"]}, "spec.output.exports[0]", ["'pickle'", "'safetensors'"]),
    ("export-repeated", {"spec.output.exports": ["onnx", "onnx"]}, "spec.output.exports", ["repeats"]),
    ("keep-checkpoints-zero", {"spec.output.keepCheckpoints": 0}, "spec.output.keepCheckpoints", ["0"]),
    (
        "env-inline-secret",
        {"spec.runtime.env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]},
        "spec.runtime.env[0].value",
        ["AWS_SECRET_ACCESS_KEY", "envFrom"],
    ),
    (
        "env-bad-name",
        {"spec.runtime.env": [{"name": "1 BAD", "value": "x"}]},
        "spec.runtime.env[0].name",
        ["'1 BAD'", "environment variable name"],
    ),
    (
        "env-duplicate",
        {"spec.runtime.env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
        "spec.runtime.env",
        ["'A'", "twice"],
    ),
    (
        "env-from-both",
        {"spec.runtime.envFrom": [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]},
        "spec.runtime.envFrom[0]",
        ["exactly one"],
    ),
    (
        "env-from-bad-name",
        {"spec.runtime.envFrom": [{"secretRef": {"name": "S3_Creds"}}]},
        "spec.runtime.envFrom[0].secretRef.name",
        ["'S3_Creds'", "DNS-1123"],
    ),
    (
        "env-name-dot-dot",
        {"spec.runtime.env": [{"name": "..HOME", "value": "x"}]},
        "spec.runtime.env[0].name",
        ["'..HOME'", "not starting with a digit or '..'"],
    ),
    (
        "env-name-dot",
        {"spec.runtime.env": [{"name": ".", "value": "x"}]},
        "spec.runtime.env[0].name",
        ["'.'", "environment variable name"],
    ),
    (
        "env-from-prefix",
        {"spec.runtime.envFrom": [{"secretRef": {"name": "s3"}, "prefix": "s3-creds"}]},
        "spec.runtime.envFrom[0].prefix",
        ["'s3-creds'", "C identifier"],
    ),
    ("image-empty", {"spec.runtime.image": ""}, "spec.runtime.image", ["''", "at least 1 character"]),
    ("image-space", {"spec.runtime.image": "my trainer:1"}, "spec.runtime.image", ["'my trainer:1'", "image reference"]),
    (
        "image-upper-case-path",
        {"spec.runtime.image": "ghcr.io/Acme/trainer:1"},
        "spec.runtime.image",
        ["'ghcr.io/Acme/trainer:1'", "lower-case repository path"],
    ),
    ("image-empty-tag", {"spec.runtime.image": "trainer:"}, "spec.runtime.image", ["'trainer:'", "ghcr.io/acme/trainer:1.2"]),
    ("ray-version", {"spec.runtime.rayVersion": "latest"}, "spec.runtime.rayVersion", ["'latest'", "2.60.0"]),
    ("queue-name", {"spec.runtime.queueName": "GPU Queue"}, "spec.runtime.queueName", ["'GPU Queue'", "DNS-1123"]),
    ("backoff-negative", {"spec.runPolicy.backoffLimit": -1}, "spec.runPolicy.backoffLimit", ["-1"]),
    ("deadline-zero", {"spec.runPolicy.activeDeadlineSeconds": 0}, "spec.runPolicy.activeDeadlineSeconds", ["0"]),
    (
        "deadline-above-int32",
        {"spec.runPolicy.activeDeadlineSeconds": 2**31},
        "spec.runPolicy.activeDeadlineSeconds",
        ["2147483648", "less than or equal to 2147483647"],
    ),
    ("suspend-string", {"spec.runPolicy.suspend": "maybe"}, "spec.runPolicy.suspend", ["'maybe'", "boolean"]),
    ("spec-typo", {"spec.hyperparams": {"epochs": 3}}, "spec.hyperparams", ["unknown field", "did you mean 'hyperparameters'"]),
    # snake_case keys: Python would take them by name, but the CRD declares only camelCase and the API server prunes them.
    (
        "snake-case-field",
        {"spec.hyperparameters.learning_rate": 0.05},
        "spec.hyperparameters.learning_rate",
        ["unknown field 'learning_rate'", "write it as 'learningRate'"],
    ),
    (
        "snake-case-resources",
        {"spec.resources.gpus_per_worker": 1},
        "spec.resources.gpus_per_worker",
        ["'gpus_per_worker'", "write it as 'gpusPerWorker'"],
    ),
    (
        "snake-case-section",
        {"spec.run_policy": {"suspend": True}},
        "spec.run_policy",
        ["'run_policy'", "write it as 'runPolicy'"],
    ),
    (
        "snake-case-nested",
        {"spec.runtime.envFrom": [{"secret_ref": {"name": "s3"}}]},
        "spec.runtime.envFrom[0].secret_ref",
        ["'secret_ref'", "write it as 'secretRef'"],
    ),
    # Inside the Kubernetes objects a job passes through as written: the RayJob's schema would prune these silently.
    (
        "snake-case-in-a-volume-source",
        {"spec.runtime.pod": {"volumes": [{"name": "data", "persistentVolumeClaim": {"claim_name": "runs"}}]}},
        "spec.runtime.pod.volumes[0].persistentVolumeClaim.claim_name",
        ["'claim_name'", "drop without a word", "write it as 'claimName'"],
    ),
    (
        "snake-case-in-an-affinity",
        {"spec.runtime.pod": {"affinity": {"nodeAffinity": {"required_during_scheduling_ignored_during_execution": {}}}}},
        "spec.runtime.pod.affinity.nodeAffinity.required_during_scheduling_ignored_during_execution",
        ["write it as 'requiredDuringSchedulingIgnoredDuringExecution'"],
    ),
    (
        "typo-deep-in-a-projected-volume",
        {"spec.runtime.pod": {"volumes": [{"name": "p", "projected": {"sources": [{"secrets": {"name": "ca"}}]}}]}},
        "spec.runtime.pod.volumes[0].projected.sources[0].secrets",
        ["'secrets'", "accepted fields: clusterTrustBundle, configMap, downwardAPI"],
    ),
    (
        "another-jobs-service-account",
        {"spec.runtime.serviceAccountName": "payroll-model-trainer"},
        "spec.runtime.serviceAccountName",
        ["'payroll-model-trainer'", "the ServiceAccount the operator makes for one job", "<job>-trainer"],
    ),
    ("spec-not-object", {"spec": "train please"}, "spec", ["'train please'"]),
    ("metadata-bad-name", {"metadata.name": "My_Job"}, "metadata.name", ["'My_Job'", "DNS-1123"]),
    (
        "metadata-label-key",
        {"metadata.labels": {"team/": "vision"}},
        "metadata.labels",
        ["key 'team/'", "label key"],
    ),
    ("kind-wrong", {"kind": "TrainingJob"}, "kind", ["'TrainingJob'", "'FineTuneJob'"]),
    ("api-version-wrong", {"apiVersion": "finetune.dev/v1"}, "apiVersion", ["'finetune.dev/v1'", "'finetune.dev/v1alpha1'"]),
]


@pytest.mark.parametrize(("changes", "field", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_document_is_reported_on_its_field(changes: dict[str, Any], field: str, fragments: list[str]) -> None:
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        _set(doc, path, value)
    result = validate_document(doc, "job.yaml")
    assert not result.ok
    matching = [e for e in result.errors if e.startswith(f"{field}: ")]
    assert matching, f"no error on {field}: {result.errors}"
    message = matching[0]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message and "Traceback" not in message


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


def test_base_document_is_valid() -> None:
    assert validate_document(copy.deepcopy(BASE)).ok


def invalid_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every document of the corpus, by case id: the admission webhook's tests judge these very documents
    (tests/unit/test_admission_review.py, tests/integration/test_webhook.py)."""
    for name, changes, _field, _fragments in CASES:
        doc = copy.deepcopy(BASE)
        for path, value in changes.items():
            _set(doc, path, value)
        yield name, doc
