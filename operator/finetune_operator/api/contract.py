"""The contract between the operator and the trainer: what a RayJob entrypoint (or `finetune run`) hands it.

Pydantic only (no torch, no Ray) and part of the API layer, so that the operator renders the RayJob's
config from it and the trainer validates the very same object on start-up without either package
importing the other. It wraps the FineTuneJob spec with the facts the spec alone does not hold (the
job's identity and where, on this node, the output lives) and defines once the names both sides use:
the config file's place in the pod and the environment variables the operator sets for the trainer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Final, Literal

from pydantic import Field

from finetune_operator.api.base import WireModel
from finetune_operator.api.fields import uri_scheme
from finetune_operator.api.v1alpha1 import FineTuneJob, FineTuneJobSpec

# Where the operator mounts a `pvc://CLAIM/PATH` output or dataset in every Ray pod.
PVC_MOUNT_ROOT: Final = "/mnt/finetune"

# Where the operator mounts the trainer's config (a ConfigMap key) and the entrypoint that reads it.
CONFIG_DIR: Final = "/etc/finetune"
CONFIG_KEY: Final = "trainer.json"
CONFIG_PATH: Final = f"{CONFIG_DIR}/{CONFIG_KEY}"
ENTRYPOINT: Final = f"python -m finetune_trainer --config {CONFIG_PATH}"

# Environment variables the operator sets in every Ray pod for the trainer's Kubernetes status sink.
ENV_JOB_NAME: Final = "FINETUNE_JOB_NAME"
ENV_JOB_NAMESPACE: Final = "FINETUNE_JOB_NAMESPACE"
ENV_CONFIG: Final = "FINETUNE_CONFIG"
ENV_THROTTLE: Final = "FINETUNE_STATUS_THROTTLE_SECONDS"

# Ray Train's controller polls its workers for reports every 2 s by default, and a worker holds one pending
# report, so an epoch shorter than that (a cached-feature linear probe: ~0.1 s) waits ~2 s in report().
# Both `finetune run` and the RayJob's pods set it; Ray Train hands the driver's value on to its controller.
ENV_REPORT_POLL: Final = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_SECONDS: Final = "0.2"

# The custom Ray resource each training pod offers (one per Ray Train worker it holds) when the job has data
# workers (spec.resources.dataWorkers), and each Ray Train worker then asks for: Ray never places training on a
# data pod, while Ray Data's tasks, which do not ask for it, run on any pod.
TRAIN_RESOURCE: Final = "finetune-train"

Sink = Literal["console", "file", "kubernetes"]

# Spec fields, by section, that do not change what is trained; a resumed run may differ in them.
_NOT_TRAINING: Final[dict[str, bool | set[str]]] = {
    "run_policy": True,
    "tracking": True,
    "runtime": True,
    "resources": True,
    "output": {"exports", "keep_checkpoints", "encryption", "sign"},
    "dataset": {"loader_workers"},
}


def pvc_mount_path(claim: str) -> str:
    return f"{PVC_MOUNT_ROOT}/{claim}"


def resolve_uri(uri: str) -> str:
    """A spec URI as the trainer opens it: pvc://CLAIM/P → the mount path, file:///p → /p, others unchanged."""
    scheme = uri_scheme(uri)
    if scheme == "pvc":
        claim, _, rest = uri[len("pvc://") :].partition("/")
        return f"{pvc_mount_path(claim)}/{rest}".rstrip("/")
    if scheme == "file":
        return uri[len("file://") :]
    return uri


class TrainerConfig(WireModel):
    """Everything one training run needs; serialised as JSON into the RayJob (a ConfigMap) or built locally."""

    job_name: Annotated[str, Field(min_length=1, max_length=253)]
    """The FineTuneJob's name: also the Ray Train run name, so a relaunch resumes its checkpoints."""

    namespace: str | None = None
    """The FineTuneJob's namespace (cluster mode)."""

    job_uid: str | None = None
    """The FineTuneJob's uid (cluster mode); recorded in the model card."""

    spec: FineTuneJobSpec
    """The validated job spec."""

    output_root: Annotated[str, Field(min_length=1)]
    """Resolved artifact root (local path, s3:// or gs://); the run writes under `<outputRoot>/<jobName>/`."""

    sinks: list[Sink] = Field(default_factory=lambda: list[Sink](["console"]))
    """Where progress goes: a console bar, a JSON status file, the FineTuneJob status (cluster mode)."""

    status_file: str | None = None
    """Path of the JSON status file when the `file` sink is on."""

    @property
    def run_dir(self) -> str:
        """`<outputRoot>/<jobName>`: Ray Train's run directory and the artifact directory."""
        return f"{self.output_root.rstrip('/')}/{self.job_name}"

    def public_uri(self, path: str | None) -> str | None:
        """A path the trainer wrote, as the user named its place: ``/mnt/finetune/models/x`` → ``pvc://models/x``.

        Status and model card are read outside the pod, where the mount path means nothing.
        """
        spec_uri = self.spec.output.uri.rstrip("/")
        root = resolve_uri(spec_uri).rstrip("/")
        if path is None or root == spec_uri or not (path == root or path.startswith(root + "/")):
            return path
        return spec_uri + path[len(root) :]

    def spec_fingerprint(self) -> str:
        """Hash of what determines the training result; a checkpoint of another fingerprint is not resumed."""
        # What only shapes the run around training (where it runs, how many loader processes feed it, which
        # exports it writes, how many checkpoints it keeps) may change between attempts without a restart.
        spec = self.spec.model_dump(by_alias=True, mode="json", exclude=_NOT_TRAINING)
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_job(
        cls,
        job: FineTuneJob,
        *,
        output_root: str | None = None,
        sinks: list[Sink] | None = None,
        status_file: str | None = None,
    ) -> TrainerConfig:
        return cls(
            job_name=job.metadata.name,
            namespace=job.metadata.namespace,
            job_uid=job.metadata.uid,
            spec=job.spec,
            output_root=output_root or resolve_uri(job.spec.output.uri),
            sinks=sinks or ["console"],
            status_file=status_file,
        )
