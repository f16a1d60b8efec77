"""What keeps a job's Ray pods to themselves: restricted securityContexts, KubeRay's submitter pod and Ray token
authentication.

Pure builders (plain dicts, no API calls) that ``rayjob.build_children`` assembles; settings say the user and
group IDs and whether Ray demands a token.

What KubeRay v1.7.0 does with these (ray-operator/controllers/ray/…), and why they look as they do:
- ``rayjob_controller.go`` (``getSubmitterTemplate``, ``configureSubmitterContainer``): a given
  ``submitterPodTemplate`` is used as it is. KubeRay then sets the first container's command and args
  (``ray job submit …``) when it has no command, appends ``PYTHONUNBUFFERED``, ``RAY_DASHBOARD_ADDRESS``,
  ``RAY_JOB_SUBMISSION_ID`` and, with token auth, ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``, and adds its labels.
  Image, resources and ``restartPolicy`` come only with its default template (``common/job.go``), so ours
  carries them: the trainer image, KubeRay's default resources, and ``Never`` (a Job's pods must not be ``Always``).
- ``common/pod.go``: the ``wait-gcs-ready`` init container KubeRay adds copies the Ray container's
  securityContext, so the container-level context is restricted on its own.
- ``raycluster_controller.go`` (``reconcileAuthSecret``) and ``common/pod.go`` (``SetContainerTokenAuthEnvVars``):
  with ``authOptions.mode: token`` KubeRay generates a random token per RayCluster in a Secret and sets
  ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (from that Secret) on the head, the workers, their
  ``wait-gcs-ready`` containers and the submitter; its own dashboard client sends it too. Ray (≥ 2.52) then
  demands the token on the dashboard, GCS and every other control-plane port. A user ``env`` entry of the same
  name would win over KubeRay's, so admission refuses ``RAY_AUTH_*`` names while auth is on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from finetune_operator.settings import OperatorSettings

SUBMITTER_CONTAINER: Final = "ray-job-submitter"  # the name KubeRay gives its own default submitter
# KubeRay's default submitter resources (common/job.go GetDefaultSubmitterContainer): `ray job submit` and
# `ray job logs --follow`, nothing heavier.
SUBMITTER_RESOURCES: Final = {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m", "memory": "200Mi"}}


def pod_security_context(settings: OperatorSettings) -> dict[str, Any]:
    """The pod half of the "restricted" profile, with the trainer image's numeric user (runAsNonRoot needs one)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.trainer_uid,
        "runAsGroup": settings.trainer_gid,
        "fsGroup": settings.trainer_gid,
        # Without it the kubelet re-chowns a whole dataset claim at every pod start.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """The container half: no privilege escalation (the image's passwordless sudo stops working) and no capabilities."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def auth_options(settings: OperatorSettings) -> dict[str, str]:
    """``rayClusterSpec.authOptions``: always explicit, so turning auth off reads as a decision in the RayJob."""
    return {"mode": settings.ray_auth_mode}


def submitter_template(labels: Mapping[str, str], image: str, service_account: str, settings: OperatorSettings) -> dict[str, Any]:
    """``spec.submitterPodTemplate`` for K8sJobMode: KubeRay's own default submitter, made restricted.

    It carries the job's labels, like the Ray pods. It runs as the trainers' ServiceAccount only
    for that account's imagePullSecrets: it talks to the Ray dashboard, never to the API server, so no token.
    """
    return {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": service_account,
            "automountServiceAccountToken": False,
            "securityContext": pod_security_context(settings),
            "containers": [
                {
                    "name": SUBMITTER_CONTAINER,
                    "image": image,
                    "resources": {key: dict(value) for key, value in SUBMITTER_RESOURCES.items()},
                    "securityContext": container_security_context(),
                }
            ],
        },
    }
