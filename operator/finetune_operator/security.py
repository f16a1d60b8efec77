"""What keeps a job's Ray pods to themselves: restricted securityContexts, KubeRay's submitter pod, Ray token
authentication and the per-job NetworkPolicy.

Pure builders (plain dicts, no API calls) that ``rayjob.build_children`` assembles; settings say the user and
group IDs, whether Ray demands a token, and who besides the job's own pods may connect.

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
- The KubeRay operator itself connects to a job's pods only on the head's dashboard port (8265), which it
  polls for the job's state; head, workers and submitter talk among themselves on GCS (6379), the dashboard
  and many dynamic ports, so the NetworkPolicy admits any port between the job's own pods. It finds them by
  the job's labels: ``common/pod.go`` (``labelPod``) keeps the template's labels on head and worker pods
  (only ``ray.io/node-type``, ``ray.io/group`` and ``ray.io/cluster`` are KubeRay's alone), and the submitter
  Job's pods carry its template's labels plus KubeRay's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from finetune_operator import naming
from finetune_operator.settings import OperatorSettings, labels_of

DASHBOARD_PORT: Final = 8265  # KubeRay utils.DefaultDashboardPort
METRICS_PORT: Final = 8080  # KubeRay utils.DefaultMetricsPort: Ray's metrics-export-port on head and workers
SUBMITTER_CONTAINER: Final = "ray-job-submitter"  # the name KubeRay gives its own default submitter
# KubeRay's default submitter resources (common/job.go GetDefaultSubmitterContainer): `ray job submit` and
# `ray job logs --follow`, nothing heavier.
SUBMITTER_RESOURCES: Final = {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m", "memory": "200Mi"}}
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"  # set by the API server on every namespace; not forgeable


def network_policy_name(job_name: str) -> str:
    return naming.child_name(job_name, "ray-ingress")


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

    The job's labels let the NetworkPolicy admit it to the head. It runs as the trainers' ServiceAccount only
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


def _peer(namespace: str, labels: tuple[str, ...]) -> dict[str, Any]:
    """Pods with ``labels`` in ``namespace`` (any namespace when empty), matched by the namespace's own name."""
    namespaces: dict[str, Any] = {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}} if namespace else {}
    return {"namespaceSelector": namespaces, "podSelector": {"matchLabels": labels_of(labels)} if labels else {}}


def network_policy_spec(pod_labels: Mapping[str, str], settings: OperatorSettings) -> dict[str, Any]:
    """Ingress to the job's Ray pods: from its own pods on any port, from KubeRay to the dashboard, and from the
    configured metrics scraper to Ray's metrics port. Egress is not restricted (object stores, registries, DNS)."""
    own = {"podSelector": {"matchLabels": dict(pod_labels)}}
    ingress: list[dict[str, Any]] = [
        {"from": [own]},
        {
            "from": [_peer(settings.kuberay_namespace, settings.kuberay_pod_labels)],
            "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}],
        },
    ]
    if settings.metrics_scraper_namespace or settings.metrics_scraper_pod_labels:
        ingress.append(
            {
                "from": [_peer(settings.metrics_scraper_namespace, settings.metrics_scraper_pod_labels)],
                "ports": [{"protocol": "TCP", "port": METRICS_PORT}],
            }
        )
    return {"podSelector": {"matchLabels": dict(pod_labels)}, "policyTypes": ["Ingress"], "ingress": ingress}
