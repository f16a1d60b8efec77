"""``spec.runtime.pod``: what a platform team adds to every Ray pod of a job (head, workers, KubeRay's submitter).

The same model is the operator-wide default (``FINETUNE_OPERATOR_POD_DEFAULTS``, the chart's ``podDefaults``);
``merged`` combines the two by the rule docs/platform.md states. What these fields may never do, because the
operator relies on it: change the labels it finds its pods by (job, uid, ownership; KubeRay's ``ray.io/``),
shadow its own volumes and mounts (trainer configuration, ``/dev/shm``, ``pvc://`` claims), or loosen the
"restricted" Pod Security profile (no hostPath or other node volumes, no privilege, no escalation). Each is
refused with one line naming the field, the value and what is accepted.

Volume sources and affinity terms are Kubernetes' own core/v1 objects, passed on as they are (the API server
checks them against its schema when the RayJob is created); only which volume sources are allowed is judged
here: the restricted profile's list.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import Field, field_validator, model_validator

from finetune_operator.api.base import WireModel
from finetune_operator.api.fields import DNS1123_LABEL, DNS1123_SUBDOMAIN, Problems, fail, quote
from finetune_operator.api.kube_fields import unknown_fields
from finetune_operator.api.scheduling import LabelKey, LabelValue, Toleration

# The restricted profile's volume types (Pod Security Standards, "Volume Types"); hostPath and the node's other
# volumes are what it forbids.
ALLOWED_VOLUME_SOURCES: Final = (
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "image",
    "persistentVolumeClaim",
    "projected",
    "secret",
)
# The operator's own pod volumes (rayjob._pod_template) and mount paths; "pvc-" names and /mnt/finetune are its
# pvc:// claims (contract.PVC_MOUNT_ROOT, naming.pvc_volume_name).
OPERATOR_VOLUMES: Final = ("trainer-config", "dshm")
OPERATOR_VOLUME_PREFIX: Final = "pvc-"
OPERATOR_MOUNT_PATHS: Final = ("/etc/finetune", "/dev/shm", "/mnt/finetune")
# Label keys the operator, KubeRay and Kueue select pods by; annotations KubeRay acts on (ray.io/overwrite-container-cmd)
# and the legacy ones that would set seccomp or AppArmor profiles around the securityContext.
RESERVED_LABEL_PREFIXES: Final = ("finetune.dev/", "ray.io/", "kueue.x-k8s.io/", "app.kubernetes.io/managed-by")
RESERVED_ANNOTATION_PREFIXES: Final = (
    "finetune.dev/",
    "ray.io/",
    "kueue.x-k8s.io/",
    "seccomp.security.alpha.kubernetes.io/",
    "container.seccomp.security.alpha.kubernetes.io/",
    "container.apparmor.security.beta.kubernetes.io/",
)


def _preserved(schema: dict[str, Any]) -> None:
    # A Kubernetes object kept as written: the CRD's structural form of a free object (no `additionalProperties: true`).
    schema.pop("additionalProperties", None)
    schema["x-kubernetes-preserve-unknown-fields"] = True


KubeObject = Annotated[dict[str, Any], Field(json_schema_extra=_preserved)]


def declared_only(model: WireModel, kind: str) -> None:
    """Every key of ``model``'s pass-through objects is one core/v1 declares (``kube_fields``): one it does not would be
    pruned from the RayJob by the API server, silently."""
    problems = Problems()
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value is not None and name != "name":
            for path, message in unknown_fields(kind, field.alias or name, value):
                problems.add(path, message)
    problems.raise_any(model)


def reserved(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p) for p in prefixes)


class PullSecret(WireModel):
    """A Secret of type kubernetes.io/dockerconfigjson in the job's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
    """Name of the Secret."""


class Volume(WireModel):
    """A pod volume (core/v1 Volume) of a type the restricted profile allows; give exactly one source."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS1123_LABEL)]
    """Volume name, a DNS-1123 label; not one of the operator's (`trainer-config`, `dshm`, `pvc-*`)."""

    config_map: KubeObject | None = None
    """A ConfigMap's keys as files (core/v1 ConfigMapVolumeSource)."""

    secret: KubeObject | None = None
    """A Secret's keys as files (core/v1 SecretVolumeSource), e.g. a CA bundle."""

    empty_dir: KubeObject | None = None
    """Scratch space for the pod's lifetime (core/v1 EmptyDirVolumeSource)."""

    persistent_volume_claim: KubeObject | None = None
    """A PersistentVolumeClaim in the job's namespace (core/v1 PersistentVolumeClaimVolumeSource)."""

    csi: KubeObject | None = None
    """An inline CSI volume (core/v1 CSIVolumeSource), e.g. a secrets-store driver."""

    ephemeral: KubeObject | None = None
    """A claim created and deleted with the pod (core/v1 EphemeralVolumeSource)."""

    projected: KubeObject | None = None
    """Several sources in one directory (core/v1 ProjectedVolumeSource)."""

    downward_api: Annotated[KubeObject | None, Field(alias="downwardAPI")] = None
    """Pod fields as files (core/v1 DownwardAPIVolumeSource)."""

    image: KubeObject | None = None
    """An OCI image's content, read-only (core/v1 ImageVolumeSource)."""

    @model_validator(mode="before")
    @classmethod
    def _allowed_source(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key != "name" and key not in ALLOWED_VOLUME_SOURCES:
                    fail(
                        key,
                        f"{quote(key)} is refused: the restricted Pod Security profile the Ray pods keep allows only the "
                        f"volume sources {', '.join(ALLOWED_VOLUME_SOURCES)} (no hostPath); e.g. use a persistentVolumeClaim",
                    )
        return data

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        given = [name for name in type(self).model_fields if name != "name" and getattr(self, name) is not None]
        if len(given) != 1:
            fail(None, f"{quote(self.name)} gives {len(given)} sources; give exactly one of {', '.join(ALLOWED_VOLUME_SOURCES)}")
        declared_only(self, "volume")
        return self

    @field_validator("name")
    @classmethod
    def _not_the_operators(cls, value: str) -> str:
        if value in OPERATOR_VOLUMES or value.startswith(OPERATOR_VOLUME_PREFIX):
            fail(None, f"{quote(value)} is the operator's own volume name ({', '.join(OPERATOR_VOLUMES)}, pvc-*); choose another")
        return value


class VolumeMount(WireModel):
    """Where a volume (the job's or the platform's) appears in the Ray containers and the submitter."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS1123_LABEL)]
    """Name of a volume in `volumes` (the job's or the platform's default)."""

    mount_path: Annotated[str, Field(min_length=2, max_length=1024, pattern=r"^/[^:]*$")]
    """Absolute path in the container; not under the operator's /etc/finetune, /dev/shm or /mnt/finetune."""

    read_only: bool | None = None
    """Mount read-only."""

    sub_path: Annotated[str | None, Field(max_length=1024, pattern=r"^[^/]([^.]|\.[^.]|\.$)*$")] = None
    """A path inside the volume to mount instead of its root (relative, no `..`)."""

    @field_validator("mount_path")
    @classmethod
    def _not_the_operators(cls, value: str) -> str:
        for path in OPERATOR_MOUNT_PATHS:
            if value.rstrip("/") == path or value.startswith(path + "/") or path.startswith(value.rstrip("/") + "/"):
                fail(None, f"{quote(value)} overlaps the operator's own mount {path}; mount elsewhere, e.g. /mnt/platform")
        return value


class Affinity(WireModel):
    """Pod affinity (core/v1 Affinity), passed on as written."""

    node_affinity: KubeObject | None = None
    """Which nodes the pods may or prefer to run on (core/v1 NodeAffinity)."""

    pod_affinity: KubeObject | None = None
    """Pods to run near (core/v1 PodAffinity)."""

    pod_anti_affinity: KubeObject | None = None
    """Pods to keep away from (core/v1 PodAntiAffinity)."""

    @model_validator(mode="after")
    def _declared_only(self) -> Affinity:
        declared_only(self, "affinity")
        return self


class Profile(WireModel):
    """A seccomp or AppArmor profile: the runtime's default or one loaded on the node."""

    type: Literal["RuntimeDefault", "Localhost"]
    """`RuntimeDefault` or `Localhost` (Unconfined would leave the restricted profile)."""

    localhost_profile: Annotated[str | None, Field(min_length=1, max_length=512)] = None
    """With `Localhost`: the profile's path or name on the node."""

    @model_validator(mode="after")
    def _localhost_names_one(self) -> Profile:
        if (self.type == "Localhost") != (self.localhost_profile is not None):
            fail("localhostProfile", f"{quote(self.localhost_profile)}: give it with type Localhost, and only then")
        return self


class SecurityTightening(WireModel):
    """Settings that can only make the Ray pods' securityContext stricter than the restricted profile the operator sets."""

    read_only_root_filesystem: bool | None = None
    """`true`: the containers' root filesystem is read-only (Ray then needs a writable volume mounted at /tmp)."""

    seccomp_profile: Profile | None = None
    """The pods' seccomp profile instead of RuntimeDefault: a Localhost one."""

    app_armor_profile: Profile | None = None
    """The pods' AppArmor profile."""

    allow_privilege_escalation: bool | None = None
    """Only `false` (the operator's setting) is accepted."""

    run_as_non_root: bool | None = None
    """Only `true` (the operator's setting) is accepted."""

    privileged: bool | None = None
    """Only `false` is accepted."""

    @model_validator(mode="after")
    def _never_looser(self) -> SecurityTightening:
        problems = Problems()
        for field, strict in (("allowPrivilegeEscalation", False), ("runAsNonRoot", True), ("privileged", False)):
            value = getattr(self, _snake(field))
            if value is not None and value != strict:
                problems.add(
                    field,
                    f"{str(value).lower()} would loosen the restricted Pod Security profile the Ray pods keep; "
                    f"only {str(strict).lower()} is accepted",
                )
        problems.raise_any(self)
        return self


class PodOverrides(WireModel):
    """What a platform adds to every Ray pod (head, workers and KubeRay's submitter); the operator's own settings win."""

    image_pull_secrets: Annotated[list[PullSecret], Field(max_length=16)] = Field(default_factory=list)
    """Secrets for pulling the trainer image from a private registry."""

    labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=64)] = Field(default_factory=dict)
    """Pod labels; not the operator's, KubeRay's or Kueue's own (finetune.dev/, ray.io/, kueue.x-k8s.io/,
    app.kubernetes.io/managed-by)."""

    annotations: Annotated[dict[LabelKey, Annotated[str, Field(max_length=16_384)]], Field(max_length=64)] = Field(
        default_factory=dict
    )
    """Pod annotations (e.g. a service mesh's or a cost tracker's); not finetune.dev/, ray.io/, kueue.x-k8s.io/ or the
    legacy seccomp and AppArmor ones."""

    volumes: Annotated[list[Volume], Field(max_length=32)] = Field(default_factory=list)
    """Extra pod volumes of a type the restricted profile allows (no hostPath)."""

    volume_mounts: Annotated[list[VolumeMount], Field(max_length=32)] = Field(default_factory=list)
    """Where extra volumes appear in the Ray containers and the submitter."""

    affinity: Affinity | None = None
    """Pod affinity of every Ray pod."""

    node_selector: Annotated[dict[LabelKey, LabelValue], Field(max_length=64)] = Field(default_factory=dict)
    """Node labels every Ray pod must match (head and submitter too; `resources.nodeSelector` adds to the workers')."""

    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=list)
    """Taints every Ray pod tolerates (`resources.tolerations` adds to the workers')."""

    security_context: SecurityTightening | None = None
    """Ways to make the pods stricter than the restricted profile; nothing here can loosen it."""

    @model_validator(mode="after")
    def _nothing_of_ours(self) -> PodOverrides:
        problems = Problems()
        for key, value in self.labels.items():
            if reserved(key, RESERVED_LABEL_PREFIXES):
                problems.add(
                    f"labels[{quote(key)}]",
                    f"{quote(value)}: the key is the operator's, KubeRay's or Kueue's own label, which they select pods by; "
                    "use another key",
                )
        for key, value in self.annotations.items():
            if reserved(key, RESERVED_ANNOTATION_PREFIXES):
                problems.add(
                    f"annotations[{quote(key)}]",
                    f"{quote(value, 40)}: the key is reserved to the operator, KubeRay, Kueue or the securityContext; "
                    "use another key",
                )
        names = [volume.name for volume in self.volumes]
        for index, name in enumerate(names):
            if name in names[:index]:
                problems.add(f"volumes[{index}].name", f"{quote(name)} is given twice; name each volume once")
        paths = [mount.mount_path.rstrip("/") for mount in self.volume_mounts]
        for index, path in enumerate(paths):
            if path in paths[:index]:
                problems.add(f"volumeMounts[{index}].mountPath", f"{quote(path)} is mounted twice; mount each path once")
        problems.raise_any(self)
        return self


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
