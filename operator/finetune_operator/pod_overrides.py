"""The platform's pod defaults and a job's ``spec.runtime.pod``, merged, and rendered into the RayJob's pod templates.

Pure (plain dicts and the API models). The merge rule (docs/platform.md, "Pod overrides"):
- labels, annotations and nodeSelector: merged key by key, the job's value winning; the operator's own labels
  cannot be given by either (``api.pods`` refuses them), so they always win;
- imagePullSecrets, tolerations, volumes and volumeMounts: the union, the platform's first. A job's volume or
  mount that reuses a platform volume's name or mount path is refused: silently replacing a platform's CA
  bundle or cache would be the wrong guess either way;
- affinity: per kind (node, pod, anti), the job's replacing the platform's;
- securityContext: the stricter of the two; a job's setting that is looser than the platform's (a writable root
  filesystem where the platform said read-only, another seccomp or AppArmor profile) is refused.
"""

from __future__ import annotations

from typing import Any, Final

from finetune_operator.api.fields import quote
from finetune_operator.api.pods import PodOverrides, SecurityTightening

FIELD: Final = "spec.runtime.pod"
DEFAULTS_VARIABLE: Final = "FINETUNE_OPERATOR_POD_DEFAULTS"


def merge_errors(defaults: PodOverrides, job: PodOverrides) -> list[str]:
    """Why ``job`` cannot be merged with the platform's ``defaults``: one line per clash."""
    errors: list[str] = []
    platform_volumes = {volume.name for volume in defaults.volumes}
    for index, volume in enumerate(job.volumes):
        if volume.name in platform_volumes:
            errors.append(
                f"{FIELD}.volumes[{index}].name: {quote(volume.name)} is a volume of the platform's pod defaults "
                f"({DEFAULTS_VARIABLE}); choose another name or mount the platform's volume as it is"
            )
    platform_paths = {mount.mount_path.rstrip("/") for mount in defaults.volume_mounts}
    for index, mount in enumerate(job.volume_mounts):
        if mount.mount_path.rstrip("/") in platform_paths:
            errors.append(
                f"{FIELD}.volumeMounts[{index}].mountPath: {quote(mount.mount_path)} is mounted by the platform's pod "
                f"defaults ({DEFAULTS_VARIABLE}); mount elsewhere"
            )
    known = platform_volumes | {volume.name for volume in job.volumes}
    for index, mount in enumerate(job.volume_mounts):
        if mount.name not in known:
            errors.append(
                f"{FIELD}.volumeMounts[{index}].name: {quote(mount.name)} names no volume of {FIELD}.volumes or of the "
                f"platform's pod defaults; accepted: {', '.join(sorted(known)) or 'none defined'}"
            )
    errors += _security_errors(defaults.security_context, job.security_context)
    return errors


def _security_errors(platform: SecurityTightening | None, job: SecurityTightening | None) -> list[str]:
    if platform is None or job is None:
        return []
    errors = []
    if platform.read_only_root_filesystem and job.read_only_root_filesystem is False:
        errors.append(
            f"{FIELD}.securityContext.readOnlyRootFilesystem: false would loosen the platform's pod defaults "
            f"({DEFAULTS_VARIABLE}: true); only true is accepted"
        )
    for field, ours, theirs in (
        ("seccompProfile", platform.seccomp_profile, job.seccomp_profile),
        ("appArmorProfile", platform.app_armor_profile, job.app_armor_profile),
    ):
        if ours is not None and theirs is not None and ours != theirs:
            errors.append(
                f"{FIELD}.securityContext.{field}: {quote(theirs.to_wire())} differs from the platform's pod defaults "
                f"({DEFAULTS_VARIABLE}: {quote(ours.to_wire())}); remove it"
            )
    return errors


def merged(defaults: PodOverrides, job: PodOverrides) -> PodOverrides:
    """The two combined by the module's rule; call ``merge_errors`` first (admission does)."""
    secrets = {s.name: s for s in [*defaults.image_pull_secrets, *job.image_pull_secrets]}
    tolerations = [*defaults.tolerations, *(t for t in job.tolerations if t not in defaults.tolerations)]
    affinity = None
    if defaults.affinity or job.affinity:
        kinds = {**_set(defaults.affinity), **_set(job.affinity)}
        affinity = (job.affinity or defaults.affinity).model_copy(update=kinds)  # type: ignore[union-attr]
    security = None
    if defaults.security_context or job.security_context:
        security = (defaults.security_context or SecurityTightening()).model_copy(update=_set(job.security_context))
        if defaults.security_context and defaults.security_context.read_only_root_filesystem:
            security = security.model_copy(update={"read_only_root_filesystem": True})
    return PodOverrides.model_construct(
        image_pull_secrets=list(secrets.values()),
        labels={**defaults.labels, **job.labels},
        annotations={**defaults.annotations, **job.annotations},
        volumes=[*defaults.volumes, *job.volumes],
        volume_mounts=[*defaults.volume_mounts, *job.volume_mounts],
        affinity=affinity,
        node_selector={**defaults.node_selector, **job.node_selector},
        tolerations=tolerations,
        security_context=security,
    )


def _set(model: Any) -> dict[str, Any]:
    """The fields a model was given (not None), by Python name."""
    if model is None:
        return {}
    return {name: getattr(model, name) for name in type(model).model_fields if getattr(model, name) is not None}


def apply(template: dict[str, Any], overrides: PodOverrides) -> dict[str, Any]:
    """``template`` (a pod template the operator built) with ``overrides`` added; the operator's settings win.

    nodeSelector and tolerations the template has already (the workers', from ``spec.resources``) stay and win.
    """
    metadata, pod = template.setdefault("metadata", {}), template["spec"]
    if overrides.labels:
        metadata["labels"] = {**overrides.labels, **metadata.get("labels", {})}
    if overrides.annotations:
        metadata["annotations"] = {**overrides.annotations, **metadata.get("annotations", {})}
    if overrides.image_pull_secrets:
        pod["imagePullSecrets"] = [secret.to_wire() for secret in overrides.image_pull_secrets]
    if overrides.volumes:
        pod["volumes"] = [*pod.get("volumes", []), *(volume.to_wire() for volume in overrides.volumes)]
    if overrides.volume_mounts:
        container = pod["containers"][0]
        container["volumeMounts"] = [*container.get("volumeMounts", []), *(m.to_wire() for m in overrides.volume_mounts)]
    if overrides.affinity is not None and overrides.affinity.to_wire():
        pod["affinity"] = overrides.affinity.to_wire()
    if overrides.node_selector:
        pod["nodeSelector"] = {**overrides.node_selector, **pod.get("nodeSelector", {})}
    if overrides.tolerations:
        own = pod.get("tolerations", [])
        pod["tolerations"] = [*(t for t in (x.to_wire() for x in overrides.tolerations) if t not in own), *own]
    security = overrides.security_context
    if security is not None:
        if security.seccomp_profile is not None:
            pod["securityContext"]["seccompProfile"] = security.seccomp_profile.to_wire()
        if security.app_armor_profile is not None:
            pod["securityContext"]["appArmorProfile"] = security.app_armor_profile.to_wire()
        if security.read_only_root_filesystem:
            for container in pod["containers"]:
                container["securityContext"]["readOnlyRootFilesystem"] = True
    return template
