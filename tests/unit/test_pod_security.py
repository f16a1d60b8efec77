"""The "restricted" Pod Security checker (tests/support/pod_security.py) catches each control's violations.

Every row seeds one change into a pod that passes and names the controls that must fire, no more and no
fewer; a last test proves that every control of the checker has a row that fires it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.support import pod_security
from tests.support.pod_security import restricted_violations, template_violations

DELETE = object()

GOOD: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "seccompProfile": {"type": "RuntimeDefault"}},
    "initContainers": [
        {"name": "init", "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    ],
    "containers": [
        {
            "name": "main",
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            "ports": [{"containerPort": 8080}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
        }
    ],
    "ephemeralContainers": [
        {"name": "debug", "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    ],
    "volumes": [
        {"name": "tmp", "emptyDir": {}},
        {"name": "cfg", "configMap": {"name": "c"}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "d"}},
    ],
}


def pod(*changes: tuple[str, Any]) -> dict[str, Any]:
    """GOOD with each ``(dotted.path, value)`` set (``DELETE`` removes the key); list indexes are numbers."""
    out = copy.deepcopy(GOOD)
    for path, value in changes:
        *parents, last = path.split(".")
        node: Any = out
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return out


MAIN = "containers.0.securityContext"
NO_APE = ("allowPrivilegeEscalation", False)

CASES: list[Any] = [
    pytest.param(pod(), {}, set(), id="passes"),
    # ---- baseline
    pytest.param(pod(("securityContext.windowsOptions", {"hostProcess": True})), {}, {"hostProcess"}, id="pod-hostProcess"),
    pytest.param(pod((f"{MAIN}.windowsOptions", {"hostProcess": True})), {}, {"hostProcess"}, id="container-hostProcess"),
    pytest.param(pod(("hostNetwork", True)), {}, {"hostNamespaces"}, id="hostNetwork"),
    pytest.param(pod(("hostPID", True)), {}, {"hostNamespaces"}, id="hostPID"),
    pytest.param(pod(("hostIPC", True)), {}, {"hostNamespaces"}, id="hostIPC"),
    pytest.param(pod((f"{MAIN}.privileged", True)), {}, {"privileged"}, id="privileged"),
    pytest.param(pod(("initContainers.0.securityContext.privileged", True)), {}, {"privileged"}, id="privileged-init"),
    pytest.param(
        pod((f"{MAIN}.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]})),
        {},
        {"capabilities", "capabilitiesRestricted"},
        id="add-SYS_ADMIN",
    ),
    pytest.param(
        pod((f"{MAIN}.capabilities", {"drop": ["ALL"], "add": ["CHOWN"]})), {}, {"capabilitiesRestricted"}, id="add-CHOWN"
    ),
    pytest.param(pod((f"{MAIN}.capabilities", {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]})), {}, set(), id="add-bind"),
    pytest.param(
        pod(("volumes", [{"name": "h", "hostPath": {"path": "/"}}])), {}, {"hostPathVolumes", "volumeTypes"}, id="hostPath"
    ),
    pytest.param(pod(("containers.0.ports", [{"containerPort": 80, "hostPort": 80}])), {}, {"hostPorts"}, id="hostPort"),
    pytest.param(pod(("containers.0.ports", [{"containerPort": 80, "hostPort": 0}])), {}, set(), id="hostPort-0"),
    pytest.param(
        pod(("containers.0.livenessProbe.httpGet.host", "169.254.169.254")), {}, {"hostProbesAndLifecycle"}, id="probe-host"
    ),
    pytest.param(
        pod(("containers.0.lifecycle", {"preStop": {"tcpSocket": {"port": 22, "host": "10.0.0.1"}}})),
        {},
        {"hostProbesAndLifecycle"},
        id="lifecycle-host",
    ),
    pytest.param(pod((f"{MAIN}.appArmorProfile", {"type": "Unconfined"})), {}, {"appArmor"}, id="apparmor-unconfined"),
    pytest.param(pod(("securityContext.appArmorProfile", {"type": "RuntimeDefault"})), {}, set(), id="apparmor-default"),
    pytest.param(
        pod(), {"container.apparmor.security.beta.kubernetes.io/main": "unconfined"}, {"appArmor"}, id="apparmor-annotation"
    ),
    pytest.param(pod(), {"container.apparmor.security.beta.kubernetes.io/main": "runtime/default"}, set(), id="apparmor-ok"),
    pytest.param(pod(("securityContext.seLinuxOptions", {"type": "spc_t"})), {}, {"seLinux"}, id="selinux-spc_t"),
    pytest.param(pod((f"{MAIN}.seLinuxOptions", {"user": "system_u"})), {}, {"seLinux"}, id="selinux-user"),
    pytest.param(pod((f"{MAIN}.seLinuxOptions", {"role": "sysadm_r"})), {}, {"seLinux"}, id="selinux-role"),
    pytest.param(pod((f"{MAIN}.seLinuxOptions", {"type": "container_t", "level": "s0:c1"})), {}, set(), id="selinux-ok"),
    pytest.param(pod((f"{MAIN}.procMount", "Unmasked")), {}, {"procMount"}, id="procMount"),
    pytest.param(
        pod(("securityContext.seccompProfile", {"type": "Unconfined"})),
        {},
        {"seccomp", "seccompRestricted"},
        id="seccomp-unconfined",
    ),
    pytest.param(
        pod(("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}])), {}, {"sysctls"}, id="unsafe-sysctl"
    ),
    pytest.param(
        pod(("securityContext.sysctls", [{"name": "net.ipv4.tcp_syncookies", "value": "1"}])), {}, set(), id="safe-sysctl"
    ),
    # ---- restricted
    pytest.param(pod(("volumes", [{"name": "n", "nfs": {"server": "s", "path": "/"}}])), {}, {"volumeTypes"}, id="nfs"),
    pytest.param(pod(("volumes", [{"name": "g", "gitRepo": {"repository": "r"}}])), {}, {"volumeTypes"}, id="gitRepo"),
    pytest.param(
        pod(("volumes", [{"name": "p", "projected": {"sources": []}}, {"name": "i", "image": {"reference": "r"}}])),
        {},
        set(),
        id="projected-and-image",
    ),
    pytest.param(pod((f"{MAIN}.allowPrivilegeEscalation", DELETE)), {}, {"allowPrivilegeEscalation"}, id="ape-unset"),
    pytest.param(pod((f"{MAIN}.allowPrivilegeEscalation", True)), {}, {"allowPrivilegeEscalation"}, id="ape-true"),
    pytest.param(
        pod(("ephemeralContainers.0.securityContext.allowPrivilegeEscalation", DELETE)),
        {},
        {"allowPrivilegeEscalation"},
        id="ape-ephemeral",
    ),
    pytest.param(pod(("securityContext.runAsNonRoot", DELETE)), {}, {"runAsNonRoot"}, id="non-root-unset"),
    pytest.param(
        pod(
            ("securityContext.runAsNonRoot", DELETE),
            (f"{MAIN}.runAsNonRoot", True),
            ("initContainers.0.securityContext.runAsNonRoot", True),
            ("ephemeralContainers.0.securityContext.runAsNonRoot", True),
        ),
        {},
        set(),
        id="non-root-on-every-container",
    ),
    pytest.param(
        pod(("securityContext.runAsNonRoot", False), (f"{MAIN}.runAsNonRoot", True)),
        {},
        {"runAsNonRoot"},
        id="non-root-pod-false",
    ),
    pytest.param(pod((f"{MAIN}.runAsNonRoot", False)), {}, {"runAsNonRoot"}, id="non-root-container-false"),
    pytest.param(pod(("securityContext.runAsUser", 0)), {}, {"runAsUser"}, id="pod-uid-0"),
    pytest.param(pod((f"{MAIN}.runAsUser", 0)), {}, {"runAsUser"}, id="container-uid-0"),
    pytest.param(pod(("securityContext.seccompProfile", DELETE)), {}, {"seccompRestricted"}, id="seccomp-unset"),
    pytest.param(
        pod(
            ("securityContext.seccompProfile", DELETE),
            (f"{MAIN}.seccompProfile", {"type": "RuntimeDefault"}),
            ("initContainers.0.securityContext.seccompProfile", {"type": "Localhost", "localhostProfile": "p.json"}),
            ("ephemeralContainers.0.securityContext.seccompProfile", {"type": "RuntimeDefault"}),
        ),
        {},
        set(),
        id="seccomp-on-every-container",
    ),
    pytest.param(
        pod((f"{MAIN}.seccompProfile", {"type": "Unconfined"})), {}, {"seccomp", "seccompRestricted"}, id="seccomp-container"
    ),
    pytest.param(pod((f"{MAIN}.capabilities", {"drop": ["NET_RAW"]})), {}, {"capabilitiesRestricted"}, id="drop-without-ALL"),
    pytest.param(
        pod(("initContainers.0.securityContext.capabilities", DELETE)), {}, {"capabilitiesRestricted"}, id="no-drop-init"
    ),
]


def controls(violations: list[str]) -> set[str]:
    return {line.split(":", 1)[0] for line in violations}


@pytest.mark.parametrize(("spec", "annotations", "expected"), CASES)
def test_each_control_fires_on_its_violation_only(spec: dict[str, Any], annotations: dict[str, str], expected: set[str]) -> None:
    violations = restricted_violations(spec, annotations)
    assert controls(violations) == expected, violations


def test_every_control_has_a_case_that_fires_it() -> None:
    fired = set().union(*(case.values[2] for case in CASES))
    assert fired == set(pod_security.BASELINE) | set(pod_security.RESTRICTED)


def test_violations_name_the_container() -> None:
    violations = restricted_violations(pod(("initContainers.0.securityContext.privileged", True)))
    assert violations == ["privileged: container init: privileged must be unset or false"]


def test_a_template_is_checked_with_its_annotations() -> None:
    template = {
        "metadata": {"annotations": {"container.apparmor.security.beta.kubernetes.io/main": "unconfined"}},
        "spec": GOOD,
    }
    assert controls(template_violations(template)) == {"appArmor"}
    assert template_violations({"spec": GOOD}) == []
