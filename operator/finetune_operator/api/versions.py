"""Versions that must agree across the operator, the trainer image and the RayJobs it renders.

One place, so that a bump is one edit: the chart's default image, the Dockerfile's base and the
RayJob's ``rayVersion`` all read from here (tests check the Dockerfile and the chart against it).
"""

from __future__ import annotations

from typing import Final

from finetune_operator import __version__

GROUP: Final = "finetune.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"
SINGULAR: Final = "finetunejob"
SHORT_NAMES: Final = ("ftj",)
CATEGORIES: Final = ("all", "ml")

# KubeRay's RayJob, the one child kind that is not ours (KubeRay v1 API, served since KubeRay 1.0).
RAYJOB_GROUP: Final = "ray.io"
RAYJOB_VERSION: Final = "v1"
RAYJOB_API_VERSION: Final = f"{RAYJOB_GROUP}/{RAYJOB_VERSION}"
RAYJOB_KIND: Final = "RayJob"
RAYJOB_PLURAL: Final = "rayjobs"

# Kueue's Workload: the operator deactivates it (``spec.active: false``) to suspend a queued job, because Kueue
# un-suspends an admitted job whose ``spec.suspend`` anyone else sets. v1beta2 is Kueue's storage version
# since v0.15; ``spec.active`` has the same meaning in v1beta1.
KUEUE_GROUP: Final = "kueue.x-k8s.io"
KUEUE_VERSION: Final = "v1beta2"
WORKLOAD_KIND: Final = "Workload"
WORKLOAD_PLURAL: Final = "workloads"

RAY_VERSION: Final = "2.60.0"
KUBERAY_VERSION: Final = "v1.7.0"
TORCH_VERSION: Final = "2.14.1"
TORCHVISION_VERSION: Final = "0.29.1"

TRAINER_IMAGE_REPOSITORY: Final = "ghcr.io/finetune-operator/trainer"
OPERATOR_IMAGE_REPOSITORY: Final = "ghcr.io/finetune-operator/operator"
DEFAULT_TRAINER_IMAGE: Final = f"{TRAINER_IMAGE_REPOSITORY}:{__version__}"
DEFAULT_OPERATOR_IMAGE: Final = f"{OPERATOR_IMAGE_REPOSITORY}:{__version__}"
