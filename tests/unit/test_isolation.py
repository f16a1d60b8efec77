"""How a job's Ray cluster is kept to itself (``finetune_operator.security``): KubeRay's submitter pod, who mounts
a ServiceAccount token, Ray token authentication and what admission refuses for it, and the settings that steer
them. (Every pod passing the "restricted" profile: tests/unit/test_rayjob.py.)
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from finetune_operator.admission import AdmissionError, admit
from finetune_operator.rayjob import Children, build_children, job_labels
from finetune_operator.security import SUBMITTER_RESOURCES, container_security_context
from finetune_operator.settings import OperatorSettings
from tests.support.pod_security import template_violations
from tests.support.schemas import REPO

EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
SETTINGS = OperatorSettings()
AUTH_OFF = OperatorSettings(ray_auth_mode="disabled")


def manifest(name: str = "iso", uid: str | None = "uid-9", **runtime: Any) -> dict[str, Any]:
    """The shipped CPU example as the API server hands it over, with ``spec.runtime`` fields added."""
    body: dict[str, Any] = copy.deepcopy(EXAMPLE)
    body["metadata"] = {"name": name, "namespace": "team", **({"uid": uid} if uid else {})}
    body["spec"]["runtime"] = {**body["spec"].get("runtime", {}), **runtime}
    return body


def children(body: dict[str, Any] | None = None, settings: OperatorSettings = SETTINGS) -> Children:
    return build_children(admit(body or manifest(), settings), settings)


def templates(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    (worker,) = cluster["workerGroupSpecs"]
    return {
        "head": cluster["headGroupSpec"]["template"],
        "worker": worker["template"],
        "submitter": rayjob["spec"]["submitterPodTemplate"],
    }


# ------------------------------------------------------------------------------------------ submitter
def test_submitter_is_kuberays_default_submitter_made_restricted() -> None:
    rayjob = children(manifest(image="registry.local/trainer:7")).rayjob
    pods = templates(rayjob)
    submitter = pods["submitter"]
    assert submitter["metadata"]["labels"] == job_labels(admit(manifest(), SETTINGS).job)
    spec = submitter["spec"]
    # A Job's pods must not restart in place; KubeRay only sets Never in the template it makes itself.
    assert spec["restartPolicy"] == "Never"
    assert spec["serviceAccountName"] == pods["head"]["spec"]["serviceAccountName"]  # its imagePullSecrets
    (container,) = spec["containers"]
    assert container == {
        "name": "ray-job-submitter",
        "image": "registry.local/trainer:7",
        "resources": SUBMITTER_RESOURCES,
        "securityContext": container_security_context(),
    }
    # No command, args or env: KubeRay writes `ray job submit ...`, the dashboard address, the submission id and
    # the auth token into them (rayjob_controller.go configureSubmitterContainer).
    assert spec["securityContext"] == pods["head"]["spec"]["securityContext"]
    assert rayjob["spec"]["submissionMode"] == "K8sJobMode"


@pytest.mark.parametrize(("role", "mounted"), [("head", False), ("worker", True), ("submitter", False)])
def test_only_workers_mount_a_service_account_token(role: str, mounted: bool) -> None:
    """Rank 0 of Ray Train (a worker) patches the job's status; the driver on the head and the submitter never
    call the API server, so a process there that gets compromised finds no token."""
    assert templates(children().rayjob)[role]["spec"]["automountServiceAccountToken"] is mounted


@pytest.mark.parametrize(("uid", "gid"), [(1000, 100), (1000680000, 0)])
def test_pods_run_as_the_configured_user_and_group(uid: int, gid: int) -> None:
    settings = OperatorSettings(trainer_uid=uid, trainer_gid=gid)
    for role, template in templates(children(settings=settings).rayjob).items():
        context = template["spec"]["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (uid, gid, gid), role
        assert context["fsGroupChangePolicy"] == "OnRootMismatch"
        assert template_violations(template) == [], role


# ------------------------------------------------------------------------------------------ Ray auth
@pytest.mark.parametrize(("settings", "mode"), [(SETTINGS, "token"), (AUTH_OFF, "disabled")])
def test_ray_token_auth_is_on_unless_turned_off(settings: OperatorSettings, mode: str) -> None:
    cluster = children(settings=settings).rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": mode}
    # KubeRay injects the token; nothing of ours may name it (a user entry would win over KubeRay's).
    for template in templates(children(settings=settings).rayjob).values():
        names = {e["name"] for c in template["spec"]["containers"] for e in c.get("env", [])}
        assert not {n for n in names if n.startswith("RAY_AUTH")}


AUTH_REFUSALS = [
    pytest.param(
        {"rayVersion": "2.51.9"},
        "spec.runtime.rayVersion: '2.51.9' has no Ray token authentication, which this operator requires "
        "(FINETUNE_OPERATOR_RAY_AUTH_MODE=token); use Ray 2.52.0 or later",
        id="old-ray",
    ),
    pytest.param({"rayVersion": "1.100.0"}, "spec.runtime.rayVersion: '1.100.0' has no Ray token authentication", id="old-major"),
    pytest.param(
        {"env": [{"name": "A", "value": "1"}, {"name": "RAY_AUTH_MODE", "value": "disabled"}]},
        "spec.runtime.env[1].name: 'RAY_AUTH_MODE' is set by KubeRay for Ray token authentication "
        "(FINETUNE_OPERATOR_RAY_AUTH_MODE=token); remove it",
        id="env-switches-auth-off",
    ),
]


@pytest.mark.parametrize(("runtime", "line"), AUTH_REFUSALS)
def test_admission_refuses_what_would_leave_ray_without_auth(runtime: dict[str, Any], line: str) -> None:
    with pytest.raises(AdmissionError) as info:
        admit(manifest(**runtime), SETTINGS)
    assert [entry for entry in info.value.lines if entry.startswith(line)] != [], info.value.lines
    assert all("\n" not in entry for entry in info.value.lines)
    admit(manifest(**runtime), AUTH_OFF)  # the same job is fine once the platform has turned auth off


@pytest.mark.parametrize("version", ["2.52.0", "2.60.0", "2.100.0", "3.0.0"])
def test_rays_with_token_auth_are_admitted(version: str) -> None:
    """Compared as numbers: "2.100.0" sorts before "2.52.0" as text."""
    cluster = children(manifest(rayVersion=version)).rayjob["spec"]["rayClusterSpec"]
    assert (cluster["rayVersion"], cluster["authOptions"]) == (version, {"mode": "token"})
