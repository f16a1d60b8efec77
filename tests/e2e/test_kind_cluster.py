"""End-to-end on a real cluster: our chart on kind with KubeRay, the CPU example trained to Succeeded.

Skipped unless `--kube-config` is given (see README.md here); refuses contexts not named `kind-*`.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.schemas import REPO

pytestmark = pytest.mark.e2e
NAMESPACE = "finetune-e2e"
BIN = REPO / ".venv" / "bin"


def _kubectl(kubeconfig: str, *args: str, input_text: str | None = None, timeout: int = 120) -> str:
    out = subprocess.run(
        [str(BIN / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return out.stdout


@pytest.fixture(scope="module")
def kubeconfig(request: pytest.FixtureRequest) -> str:
    path = str(request.config.getoption("--kube-config"))
    context = _kubectl(path, "config", "current-context").strip()
    if not context.startswith("kind-"):
        pytest.fail(f"refusing to run e2e against context {context!r}: use a disposable kind-* cluster")
    return path


@pytest.fixture(scope="module")
def installed(kubeconfig: str) -> Iterator[None]:
    helm = [str(BIN / "helm"), f"--kubeconfig={kubeconfig}"]
    subprocess.run(
        [
            *helm,
            "upgrade",
            "--install",
            "finetune-operator",
            str(REPO / "charts" / "finetune-operator"),
            "--namespace",
            "finetune-system",
            "--create-namespace",
            "--set",
            "image.tag=e2e",
            "--set",
            "settings.trainerImage=ghcr.io/finetune-operator/trainer:e2e",
            "--wait",
        ],
        check=True,
        timeout=300,
    )
    _kubectl(
        kubeconfig,
        "apply",
        "-f",
        "-",
        input_text=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )
    yield
    _kubectl(kubeconfig, "delete", "namespace", NAMESPACE, "--wait=false")


def _job(kubeconfig: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_kubectl(kubeconfig, "-n", NAMESPACE, "get", "ftj", name, "-o", "json"))
    return result


def test_digits_job_succeeds_on_kind(kubeconfig: str, installed: None, tmp_path: Path) -> None:
    job = yaml.safe_load((REPO / "manifests/examples/digits-cpu.yaml").read_text())
    job["metadata"]["namespace"] = NAMESPACE
    # Ray Train's storage must be shared by every Ray pod: on a one-node kind cluster a RWO claim is.
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "finetune-runs", "namespace": NAMESPACE},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    _kubectl(kubeconfig, "apply", "-f", "-", input_text=yaml.safe_dump(pvc))
    job["spec"]["runtime"] = {"image": "ghcr.io/finetune-operator/trainer:e2e"}
    _kubectl(kubeconfig, "apply", "-f", "-", input_text=yaml.safe_dump(job))
    _kubectl(kubeconfig, "-n", NAMESPACE, "wait", "--for=condition=Succeeded", "ftj/digits-cpu", "--timeout=1200s", timeout=1260)
    status = _job(kubeconfig, "digits-cpu")["status"]
    assert status["phase"] == "Succeeded"
    assert status["metrics"]["valAccuracy"] > 0.5
    assert len(status["artifacts"]["sha256"]) == 64
    ray_job = status["rayJobName"]
    _kubectl(kubeconfig, "-n", NAMESPACE, "delete", "ftj", "digits-cpu", "--wait=true", timeout=300)
    left = _kubectl(
        kubeconfig,
        "-n",
        NAMESPACE,
        "get",
        "rayjobs,configmaps,roles,rolebindings",
        "-l",
        "finetune.dev/job=digits-cpu",
        "-o",
        "name",
    )
    assert left.strip() == "", f"left behind after deleting the job (RayJob {ray_job}): {left}"
