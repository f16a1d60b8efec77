"""``spec.resources.dataWorkers``: an optional group of CPU-only Ray pods for data preprocessing.

Its own module (``v1alpha1`` references it with one field line). Ray Data decodes and augments on any node of
the Ray cluster; these pods add CPU cores that are not on the GPU nodes, so a GPU node's few cores are not the
limit on JPEG decoding. No Ray Train worker ever runs on them: the training pods carry a custom Ray resource
(``contract.TRAIN_RESOURCE``) that the trainer's workers ask for whenever the job has data workers.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import Field

from finetune_operator.api.base import WireModel
from finetune_operator.api.fields import QUANTITY

MAX_DATA_WORKERS: Final = 256


class DataWorkersSpec(WireModel):
    """CPU-only Ray pods that decode and augment images for the training workers (no GPU, never a training process)."""

    replicas: Annotated[int, Field(ge=0, le=MAX_DATA_WORKERS)] = 1
    """Data worker pods; 0 renders no data group (the same as leaving `dataWorkers` out)."""

    cpus_per_worker: Annotated[float, Field(gt=0, le=512)] = 4
    """CPU cores per data worker pod, all of them Ray's for decoding and augmentation."""

    memory_per_worker: Annotated[str, Field(max_length=32, pattern=QUANTITY)] = "8Gi"
    """Memory per data worker pod as a Kubernetes quantity (e.g. 16Gi); Ray's object store, which holds the decoded
    batches on their way to the GPUs, takes about 30% of it."""


def data_replicas(spec: DataWorkersSpec | None) -> int:
    """Data worker pods a job's Ray cluster has: 0 (no data group) when ``dataWorkers`` is absent or asks for none."""
    return spec.replicas if spec is not None else 0
