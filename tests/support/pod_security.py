"""The Pod Security Standards "restricted" profile (which includes "baseline"), checked on a pod spec in tests.

A transcription of the Pod Security admission checks at Kubernetes v1.35
(https://kubernetes.io/docs/concepts/security/pod-security-standards/; the reference implementation is
k8s.io/pod-security-admission/policy/check_*.go), one function per control, so that a test can say which
control a pod breaks. It is deliberately a little stricter than the admission plugin: the relaxations for
Windows pods (``spec.os.name: windows``) and for pods in a user namespace (``hostUsers: false``) are not
applied, because none of our pods relies on them.

``restricted_violations(pod_spec, annotations)`` returns one line per violation ([] when the pod passes);
``tests/unit/test_pod_security.py`` seeds each violation once and checks that it is caught.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

Pod = Mapping[str, Any]

# baseline: sysctls (v1.32 set; v1.37 adds more), SELinux types (v1.31), capabilities a container may add.
SAFE_SYSCTLS: Final = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
    }
)
SELINUX_TYPES: Final = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
BASELINE_CAPABILITIES: Final = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
# restricted: the only volume sources allowed, and the only capability a container may add.
RESTRICTED_VOLUME_TYPES: Final = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim", "projected", "secret"}
)
RESTRICTED_CAPABILITIES: Final = frozenset({"NET_BIND_SERVICE"})
PROFILE_TYPES: Final = frozenset({"RuntimeDefault", "Localhost"})  # seccomp and AppArmor alike
APPARMOR_ANNOTATION: Final = "container.apparmor.security.beta.kubernetes.io/"


def containers(pod: Pod) -> Iterator[Mapping[str, Any]]:
    """Init, regular and ephemeral containers: every check visits all three, as the admission plugin does."""
    for field in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(field) or []


def _sc(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("securityContext") or {}


def _setters(pod: Pod, test: Callable[[Mapping[str, Any]], bool]) -> list[str]:
    """'pod' and 'container NAME' for each securityContext that ``test`` flags."""
    found = ["pod"] if test(_sc(pod)) else []
    return found + [f"container {c['name']}" for c in containers(pod) if test(_sc(c))]


# ------------------------------------------------------------------------------------------- baseline
def host_process(pod: Pod, _: Mapping[str, str]) -> list[str]:
    return [f"{who}: windowsOptions.hostProcess must be unset or false" for who in _setters(pod, _host_process)]


def _host_process(sc: Mapping[str, Any]) -> bool:
    return bool((sc.get("windowsOptions") or {}).get("hostProcess"))


def host_namespaces(pod: Pod, _: Mapping[str, str]) -> list[str]:
    return [f"spec.{field} must be unset or false" for field in ("hostNetwork", "hostPID", "hostIPC") if pod.get(field)]


def privileged(pod: Pod, _: Mapping[str, str]) -> list[str]:
    return [f"container {c['name']}: privileged must be unset or false" for c in containers(pod) if _sc(c).get("privileged")]


def capabilities_baseline(pod: Pod, _: Mapping[str, str]) -> list[str]:
    found = []
    for c in containers(pod):
        added = set((_sc(c).get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if added:
            found.append(f"container {c['name']}: capabilities.add {sorted(added)} is beyond the default set")
    return found


def host_path_volumes(pod: Pod, _: Mapping[str, str]) -> list[str]:
    return [f"volume {v['name']}: hostPath volumes are forbidden" for v in pod.get("volumes") or [] if "hostPath" in v]


def host_ports(pod: Pod, _: Mapping[str, str]) -> list[str]:
    found = []
    for c in containers(pod):
        ports = sorted(p["hostPort"] for p in c.get("ports") or [] if p.get("hostPort"))
        if ports:
            found.append(f"container {c['name']}: hostPort {ports} must be unset or 0")
    return found


def host_probes_and_lifecycle(pod: Pod, _: Mapping[str, str]) -> list[str]:
    """v1.34: probes and lifecycle hooks may not aim at another host (the node, or anything the node reaches)."""
    found = []
    for c in containers(pod):
        handlers = {name: c.get(name) for name in ("livenessProbe", "readinessProbe", "startupProbe")}
        handlers |= {f"lifecycle.{name}": (c.get("lifecycle") or {}).get(name) for name in ("postStart", "preStop")}
        for where, handler in handlers.items():
            for action in ("httpGet", "tcpSocket"):
                if ((handler or {}).get(action) or {}).get("host"):
                    found.append(f"container {c['name']}: {where}.{action}.host must be unset")
    return found


def _bad_profile(sc: Mapping[str, Any], field: str) -> bool:
    """``field`` (seccompProfile, appArmorProfile) is set to something other than RuntimeDefault or Localhost."""
    return field in sc and (sc[field] or {}).get("type") not in PROFILE_TYPES


def app_armor(pod: Pod, annotations: Mapping[str, str]) -> list[str]:
    bad = _setters(pod, lambda sc: _bad_profile(sc, "appArmorProfile"))
    found = [f"{who}: appArmorProfile.type must be RuntimeDefault or Localhost" for who in bad]
    for key, value in sorted(annotations.items()):
        if key.startswith(APPARMOR_ANNOTATION) and value and value != "runtime/default" and not value.startswith("localhost/"):
            found.append(f"annotation {key}: AppArmor profile {value!r} is not allowed")
    return found


def se_linux(pod: Pod, _: Mapping[str, str]) -> list[str]:
    def bad(sc: Mapping[str, Any]) -> bool:
        options = sc.get("seLinuxOptions")
        return options is not None and (
            options.get("type", "") not in SELINUX_TYPES or bool(options.get("user")) or bool(options.get("role"))
        )

    return [f"{who}: seLinuxOptions may only set an allowed type, no user or role" for who in _setters(pod, bad)]


def proc_mount(pod: Pod, _: Mapping[str, str]) -> list[str]:
    return [
        f"container {c['name']}: procMount must be Default"
        for c in containers(pod)
        if _sc(c).get("procMount", "Default") != "Default"
    ]


def seccomp_baseline(pod: Pod, _: Mapping[str, str]) -> list[str]:
    return [
        f"{who}: seccompProfile.type must not be Unconfined"
        for who in _setters(pod, lambda sc: (sc.get("seccompProfile") or {}).get("type") == "Unconfined")
    ]


def sysctls(pod: Pod, _: Mapping[str, str]) -> list[str]:
    return [
        f"spec.securityContext.sysctls: {s['name']} is not a safe sysctl"
        for s in _sc(pod).get("sysctls") or []
        if s["name"] not in SAFE_SYSCTLS
    ]


# ----------------------------------------------------------------------------------------- restricted
def volume_types(pod: Pod, _: Mapping[str, str]) -> list[str]:
    found = []
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUME_TYPES)} is not an allowed volume type")
    return found


def privilege_escalation(pod: Pod, _: Mapping[str, str]) -> list[str]:
    return [
        f"container {c['name']}: allowPrivilegeEscalation must be false"
        for c in containers(pod)
        if _sc(c).get("allowPrivilegeEscalation") is not False
    ]


def run_as_non_root(pod: Pod, _: Mapping[str, str]) -> list[str]:
    """True on the pod or on every container, and false nowhere (a pod-level false fails even if containers say true)."""
    found = [f"{who}: runAsNonRoot must not be false" for who in _setters(pod, lambda sc: sc.get("runAsNonRoot") is False)]
    pod_says = _sc(pod).get("runAsNonRoot") is True
    for c in containers(pod):
        if _sc(c).get("runAsNonRoot") is None and not pod_says:
            found.append(f"container {c['name']}: runAsNonRoot must be true on the pod or the container")
    return found


def run_as_user(pod: Pod, _: Mapping[str, str]) -> list[str]:
    return [f"{who}: runAsUser must not be 0" for who in _setters(pod, lambda sc: sc.get("runAsUser") == 0)]


def seccomp_restricted(pod: Pod, _: Mapping[str, str]) -> list[str]:
    """RuntimeDefault or Localhost, on the pod or on every container; an explicit other value fails anywhere."""
    bad = _setters(pod, lambda sc: _bad_profile(sc, "seccompProfile"))
    found = [f"{who}: seccompProfile.type must be RuntimeDefault or Localhost" for who in bad]
    pod_says = (_sc(pod).get("seccompProfile") or {}).get("type") in PROFILE_TYPES
    for c in containers(pod):
        if "seccompProfile" not in _sc(c) and not pod_says:
            found.append(f"container {c['name']}: seccompProfile.type must be set on the pod or the container")
    return found


def capabilities_restricted(pod: Pod, _: Mapping[str, str]) -> list[str]:
    found = []
    for c in containers(pod):
        capabilities = _sc(c).get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"container {c['name']}: capabilities.drop must include ALL")
        added = set(capabilities.get("add") or []) - RESTRICTED_CAPABILITIES
        if added:
            found.append(f"container {c['name']}: capabilities.add may only hold NET_BIND_SERVICE, not {sorted(added)}")
    return found


Check = Callable[[Pod, Mapping[str, str]], list[str]]
# Where the restricted version of a control replaces the baseline one (the admission plugin's OverrideCheckIDs),
# both still run here: the stricter one reports anything the other would.
BASELINE: Final[dict[str, Check]] = {
    "hostProcess": host_process,
    "hostNamespaces": host_namespaces,
    "privileged": privileged,
    "capabilities": capabilities_baseline,
    "hostPathVolumes": host_path_volumes,
    "hostPorts": host_ports,
    "hostProbesAndLifecycle": host_probes_and_lifecycle,
    "appArmor": app_armor,
    "seLinux": se_linux,
    "procMount": proc_mount,
    "seccomp": seccomp_baseline,
    "sysctls": sysctls,
}
RESTRICTED: Final[dict[str, Check]] = {
    "volumeTypes": volume_types,
    "allowPrivilegeEscalation": privilege_escalation,
    "runAsNonRoot": run_as_non_root,
    "runAsUser": run_as_user,
    "seccompRestricted": seccomp_restricted,
    "capabilitiesRestricted": capabilities_restricted,
}


def restricted_violations(pod: Pod, annotations: Mapping[str, str] | None = None) -> list[str]:
    """Every way ``pod`` (a PodSpec) breaks the "restricted" profile, each line prefixed by its control; []: it meets it."""
    found = []
    for control, check in {**BASELINE, **RESTRICTED}.items():
        found += [f"{control}: {line}" for line in check(pod, annotations or {})]
    return found


def template_violations(template: Mapping[str, Any]) -> list[str]:
    """``restricted_violations`` of a pod template (``metadata`` + ``spec``), annotations included."""
    return restricted_violations(template["spec"], (template.get("metadata") or {}).get("annotations"))
