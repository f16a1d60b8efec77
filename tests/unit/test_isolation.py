"""How a job's Ray cluster is kept to itself (``finetune_operator.security``): KubeRay's submitter pod, who mounts
a ServiceAccount token, and the settings that steer them. (Every pod passing the "restricted" profile: tests/unit/test_rayjob.py.)
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from finetune_operator.admission import admit
from finetune_operator.rayjob import Children, build_children, job_labels
from finetune_operator.security import SUBMITTER_RESOURCES, container_security_context
from finetune_operator.settings import OperatorSettings
from tests.support.pod_security import template_violations
from tests.support.schemas import REPO

EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text())
SETTINGS = OperatorSettings()


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
