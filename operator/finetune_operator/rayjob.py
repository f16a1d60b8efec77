"""FineTuneJob → the Kubernetes objects that run it: RayJob, trainer ConfigMap, ServiceAccount, Role, RoleBinding,
NetworkPolicy.

Pure: plain dicts out, no API calls, so the create handler, ``finetune render`` and the golden tests
share one function (``build_children``) and a reviewer sees exactly what the operator would apply.

Choices that are not obvious from the output:
- The trainer's configuration travels as a ConfigMap (``trainer.json``) mounted at ``/etc/finetune``,
  not on the entrypoint command line: no quoting problems and no size limit on the entrypoint.
- The Ray head runs the driver only (``num-cpus: "0"``); training lands on the training worker group (``workers``),
  sized exactly (``replicas = minReplicas = maxReplicas``, no autoscaling) with Guaranteed resources.
- Worker scheduling (``nodeSelector``, ``tolerations``) applies to workers only: the head needs no GPU node.
  The platform's pod defaults and ``spec.runtime.pod`` (``pod_overrides``) go on every pod, the operator's
  own labels, volumes and restricted securityContext always winning.
- ``resources.dataWorkers`` adds a second, CPU-only group (``data``): the same pod as a worker's (image, env,
  volumes, labels, so the NetworkPolicy covers it) minus the accelerator, scheduling and token. The training
  group then offers ``TRAIN_RESOURCE``, which only Ray Train's workers ask for: training never lands on a
  data pod, Ray Data's tasks land anywhere.
- ``pvc://CLAIM/...`` URIs become a volume mounted at ``PVC_MOUNT_ROOT/CLAIM`` on head and workers,
  read-only unless the claim holds the output or the cache.
- Owner references are set here from the job's uid (when it has one), so the golden files show them.
- Every pod (head, workers, KubeRay's submitter) meets the "restricted" Pod Security profile, Ray demands a
  token (``authOptions``), and a NetworkPolicy keeps other pods out (``security`` says how and why). Only the
  workers mount a ServiceAccount token: rank 0 of Ray Train, on a worker, patches the job's status; the
  driver on the head and the submitter never call the API server.
- The ConfigMap is immutable: the trainer's configuration is fixed at creation, like the RayJob's spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from finetune_operator import naming, pod_overrides, security
from finetune_operator.admission import AdmittedJob
from finetune_operator.api.contract import (
    CONFIG_DIR,
    CONFIG_KEY,
    CONFIG_PATH,
    ENTRYPOINT,
    ENV_CONFIG,
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_REPORT_POLL,
    ENV_THROTTLE,
    REPORT_POLL_SECONDS,
    TRAIN_RESOURCE,
    TrainerConfig,
    pvc_mount_path,
    resolve_uri,
)
from finetune_operator.api.dataworkers import data_replicas
from finetune_operator.api.fields import uri_scheme
from finetune_operator.api.pods import PodOverrides
from finetune_operator.api.protection import ENV_REQUIRE_SIGNED, ENV_VERIFY_KEYS
from finetune_operator.api.v1alpha1 import FineTuneJob, FineTuneJobSpec
from finetune_operator.api.versions import API_VERSION, GROUP, KIND, PLURAL, RAYJOB_API_VERSION, RAYJOB_KIND
from finetune_operator.settings import OperatorSettings

WORKER_GROUP: Final = "workers"
DATA_GROUP: Final = "data"
TRAINER_VERBS: Final = ("patch",)
"""What the trainer's reporter calls on its job's status (``status_reporter``: a merge patch, never a read)."""


@dataclass(frozen=True)
class Children:
    """Everything one FineTuneJob needs, in the order it is created (the RayJob last: its needs exist first)."""

    rayjob: dict[str, Any]
    config_map: dict[str, Any]
    role: dict[str, Any]
    role_binding: dict[str, Any]
    service_account: dict[str, Any] | None = None
    network_policy: dict[str, Any] | None = None

    def all(self) -> list[dict[str, Any]]:
        head = [self.service_account] if self.service_account else []
        # The NetworkPolicy before the RayJob: no Ray pod ever runs unprotected.
        isolation = [self.network_policy] if self.network_policy else []
        return [*head, self.role, self.role_binding, self.config_map, *isolation, self.rayjob]


def build_children(admitted: AdmittedJob, settings: OperatorSettings) -> Children:
    """All child objects of an admitted job (``admission.admit``). Requires a namespace."""
    job = admitted.job
    meta = job.metadata
    if not meta.namespace:
        raise ValueError(f"{KIND} {meta.name} has no namespace; children are namespaced")
    runtime = job.spec.runtime
    sa_name = runtime.service_account_name or naming.service_account_name(meta.name)
    service_account = None if runtime.service_account_name else _object("v1", "ServiceAccount", sa_name, job)
    role = _object("rbac.authorization.k8s.io/v1", "Role", naming.role_name(meta.name), job)
    role["rules"] = [
        {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "resourceNames": [meta.name], "verbs": list(TRAINER_VERBS)}
    ]
    binding = _object("rbac.authorization.k8s.io/v1", "RoleBinding", naming.role_name(meta.name), job)
    binding["roleRef"] = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    binding["subjects"] = [{"kind": "ServiceAccount", "name": sa_name, "namespace": meta.namespace}]
    config_map = _object("v1", "ConfigMap", naming.config_map_name(meta.name), job)
    config_map["data"] = {CONFIG_KEY: render_trainer_config(job)}
    config_map["immutable"] = True
    network_policy = None
    if settings.job_network_policy:
        network_policy = _object("networking.k8s.io/v1", "NetworkPolicy", security.network_policy_name(meta.name), job)
        network_policy["spec"] = security.network_policy_spec(job_labels(job), settings)
    return Children(
        rayjob=build_rayjob(job, settings, service_account=sa_name, config_map=config_map["metadata"]["name"]),
        config_map=config_map,
        role=role,
        role_binding=binding,
        service_account=service_account,
        network_policy=network_policy,
    )


def render_trainer_config(job: FineTuneJob) -> str:
    """The ``trainer.json`` the entrypoint reads: the spec plus identity, with the Kubernetes progress sink on.

    The run directory is ``<output.uri>/<namespace>/<job name>/``: two tenants writing to one bucket under the
    same job name must never resume each other's run. Re-creating a job in its namespace under its name
    with the same spec still resumes its checkpoints (the run is named after the job).
    """
    output_root = f"{resolve_uri(job.spec.output.uri).rstrip('/')}/{job.metadata.namespace}"
    config = TrainerConfig.from_job(job, output_root=output_root, sinks=["console", "kubernetes"])
    return json.dumps(config.model_dump(by_alias=True, mode="json", exclude_none=True), indent=2, sort_keys=True) + "\n"


def job_labels(job: FineTuneJob) -> dict[str, str]:
    labels = {naming.LABEL_JOB: naming.label_value(job.metadata.name), naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
    if job.metadata.uid:
        labels[naming.LABEL_JOB_UID] = job.metadata.uid
    return labels


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _object(api_version: str, kind: str, name: str, job: FineTuneJob) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": job.metadata.namespace, "labels": job_labels(job)}
    if job.metadata.uid:
        metadata["ownerReferences"] = [owner_reference(job)]
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata}


def build_rayjob(job: FineTuneJob, settings: OperatorSettings, *, service_account: str, config_map: str) -> dict[str, Any]:
    """The KubeRay v1 RayJob (validated against KubeRay v1.7.0's CRD schema by the tests)."""
    spec, policy = job.spec, job.spec.run_policy
    rayjob = _object(RAYJOB_API_VERSION, RAYJOB_KIND, naming.rayjob_name(job.metadata.name), job)
    if spec.runtime.queue_name:
        rayjob["metadata"]["labels"][naming.LABEL_KUEUE_QUEUE] = spec.runtime.queue_name
    # No default in the CRD: the platform's default applies whenever the job names no TTL, runPolicy given or not.
    ttl = policy.ttl_seconds_after_finished
    if ttl is None:
        ttl = settings.default_ttl_seconds
    body: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        # KubeRay refuses to suspend a RayJob that does not shut down, and the TTL needs it too.
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": ttl,
        "backoffLimit": policy.backoff_limit,
        "suspend": policy.suspend,
    }
    if policy.active_deadline_seconds is not None:
        body["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if settings.pre_running_deadline_seconds:
        # A Ray cluster that never starts (quota, image pull, unschedulable GPUs) fails the job with KubeRay's
        # PreRunningDeadlineExceeded instead of hanging in Provisioning for ever.
        body["preRunningDeadlineSeconds"] = settings.pre_running_deadline_seconds
    image = spec.runtime.image or settings.trainer_image
    pod = pod_overrides.merged(settings.pod_defaults, spec.runtime.pod)
    submitter = security.submitter_template(job_labels(job), image, service_account, settings)
    body["submitterPodTemplate"] = _finish_pod(submitter, job, settings, pod)
    body["rayClusterSpec"] = {
        "rayVersion": spec.runtime.ray_version or settings.ray_version,
        "authOptions": security.auth_options(settings),
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {
            # No CPUs for Ray on the head: Ray Train workers land on the worker group only.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _finish_pod(_pod_template(job, settings, "head", service_account, config_map), job, settings, pod),
        },
        "workerGroupSpecs": [
            _worker_group(job, settings, service_account, config_map, pod),
            *_data_group(job, settings, service_account, config_map, pod),
        ],
    }
    rayjob["spec"] = body
    return rayjob


def _finish_pod(template: dict[str, Any], job: FineTuneJob, settings: OperatorSettings, pod: PodOverrides) -> dict[str, Any]:
    """The platform's and the job's pod overrides (``pod_overrides``) and the PriorityClass, on one of the three pods."""
    priority = job.spec.runtime.priority_class_name or settings.default_priority_class_name
    if priority:
        template["spec"]["priorityClassName"] = priority
    return pod_overrides.apply(template, pod)


def _worker_group(
    job: FineTuneJob, settings: OperatorSettings, service_account: str, config_map: str, pod: PodOverrides
) -> dict[str, Any]:
    res = job.spec.resources
    start: dict[str, str] = {}
    if res.gpus_per_worker:
        # KubeRay infers num-gpus only for names ending in "gpu"; the trainer asks Ray for "GPU" whatever the vendor.
        start["num-gpus"] = str(res.gpus_per_worker)
    if data_replicas(res.data_workers):
        # One unit per Ray Train worker the pod holds (one per GPU, one on CPU), as `ray start --resources` reads it
        # (the quoting KubeRay itself writes when it adds accelerators to this parameter).
        start["resources"] = "'" + json.dumps({TRAIN_RESOURCE: max(1, res.gpus_per_worker)}) + "'"
    return {
        "groupName": WORKER_GROUP,
        "replicas": res.workers,
        "minReplicas": res.workers,
        "maxReplicas": res.workers,
        "rayStartParams": start,
        "template": _finish_pod(_pod_template(job, settings, "worker", service_account, config_map), job, settings, pod),
    }


def _data_group(
    job: FineTuneJob, settings: OperatorSettings, service_account: str, config_map: str, pod: PodOverrides
) -> list[dict[str, Any]]:
    """The CPU-only group of ``resources.dataWorkers`` (none when absent or 0 replicas); Ray's CPUs are the pod's."""
    replicas = data_replicas(job.spec.resources.data_workers)
    if not replicas:
        return []
    template = _pod_template(job, settings, "data", service_account, config_map)
    return [
        {
            "groupName": DATA_GROUP,
            "replicas": replicas,
            "minReplicas": replicas,
            "maxReplicas": replicas,
            "rayStartParams": {},
            "template": _finish_pod(template, job, settings, pod),
        }
    ]


def _cpu(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def _pod_template(
    job: FineTuneJob, settings: OperatorSettings, role: str, service_account: str, config_map: str
) -> dict[str, Any]:
    spec = job.spec
    runtime, res = spec.runtime, spec.resources
    data = res.data_workers
    if role == "head":
        resources: dict[str, Any] = {"cpu": settings.head_cpu, "memory": settings.head_memory}
    elif role == "data" and data is not None:
        resources = {"cpu": _cpu(data.cpus_per_worker), "memory": data.memory_per_worker}
    else:
        resources = {"cpu": _cpu(res.cpus_per_worker), "memory": res.memory_per_worker}
        if res.gpus_per_worker:
            resources[res.accelerator] = res.gpus_per_worker
    mounts = [{"name": "trainer-config", "mountPath": CONFIG_DIR, "readOnly": True}, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": "trainer-config", "configMap": {"name": config_map, "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
        # PyTorch DataLoader workers and Ray's object store need more than the default 64Mi of /dev/shm.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    for claim, read_only in pvc_claims(spec).items():
        volume = naming.pvc_volume_name(claim)
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": volume, "mountPath": pvc_mount_path(claim), "readOnly": read_only})
    container: dict[str, Any] = {
        "name": "ray-head" if role == "head" else "ray-worker",
        "image": runtime.image or settings.trainer_image,
        "resources": {"limits": dict(resources), "requests": dict(resources)},
        "env": [*_ray_env(job), *(e.to_wire() for e in runtime.env), *_operator_env(job, settings)],
        "volumeMounts": mounts,
        "securityContext": security.container_security_context(),
    }
    if runtime.env_from:
        container["envFrom"] = [e.to_wire() for e in runtime.env_from]
    if role == "head":
        container["ports"] = [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
        ]
    pod: dict[str, Any] = {
        "serviceAccountName": service_account,
        # Rank 0 of Ray Train runs on a worker and patches the job's status; nothing on the head or a data pod calls the API.
        "automountServiceAccountToken": role == "worker",
        "securityContext": security.pod_security_context(settings),
        "containers": [container],
        "volumes": volumes,
    }
    if role == "worker" and res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if role == "worker" and res.tolerations:
        pod["tolerations"] = [t.to_wire() for t in res.tolerations]
    return {"metadata": {"labels": job_labels(job)}, "spec": pod}


def _operator_env(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Identity and reporting settings for the trainer's Kubernetes sink (after the user's, so they win)."""
    return [
        {"name": ENV_JOB_NAME, "value": job.metadata.name},
        # The downward API cannot disagree with where the pod actually runs.
        {"name": ENV_JOB_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": ENV_CONFIG, "value": CONFIG_PATH},
        {"name": ENV_THROTTLE, "value": f"{settings.status_throttle_seconds:g}"},
        # The platform's trust: which keys sign models, and whether unsigned ones are refused (weightsUri).
        *([{"name": ENV_VERIFY_KEYS, "value": settings.verify_keys}] if settings.verify_keys else []),
        *([{"name": ENV_REQUIRE_SIGNED, "value": "true"}] if settings.require_protected_artifacts else []),
    ]


def _ray_env(job: FineTuneJob) -> list[dict[str, Any]]:
    """Ray Train's report poll (``contract.REPORT_POLL_SECONDS``), before the user's variables and left out when the
    job sets its own: the driver on the head reads it and Ray Train hands it on to its controller."""
    if any(e.name == ENV_REPORT_POLL for e in job.spec.runtime.env):
        return []
    return [{"name": ENV_REPORT_POLL, "value": REPORT_POLL_SECONDS}]


def pvc_claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """Claims named by ``pvc://`` URIs → read-only? (False when the job writes there: output or cache)."""
    written = [spec.output.uri, spec.dataset.cache_dir]
    read = [spec.dataset.train_uri, spec.dataset.validation_uri, spec.model.weights_uri]
    claims: dict[str, bool] = {}
    for uri, read_only in [*((u, False) for u in written), *((u, True) for u in read)]:
        if uri is None or uri_scheme(uri) != "pvc":
            continue
        claim = uri[len("pvc://") :].split("/", 1)[0]
        claims[claim] = claims.get(claim, True) and read_only
    return dict(sorted(claims.items()))
