"""The Python client end to end on one machine: ``FineTuneJobClient`` → API emulator → our operator → the KubeRay
stand-in running the real trainer on a local Ray node. What it proves beyond the integration tier: the trainer's
evaluation gate (``spec.evaluation.minAccuracy``) fails a finished run with reason ``BelowAccuracyGate``, through
Ray's own failure message, and the model it trained is kept.
"""

from __future__ import annotations

from pathlib import Path

import kopf
import pytest

import finetune_operator.handlers  # noqa: F401  (registers the operator's Kopf handlers)
from finetune_operator.client import FineTuneJobClient, JobFailed
from finetune_operator.k8s import Kube
from finetune_operator.settings import OperatorSettings
from tests.slow.test_one_machine_e2e import NAME, NAMESPACE, digits_job, emu  # noqa: F401  (emu: the fixture)
from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import KubeEmulator
from tests.support.kuberay_standin import KubeRayStandIn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_model_below_the_gate_fails_the_job_and_is_kept(emu: KubeEmulator, tmp_path: Path) -> None:  # noqa: F811
    body = digits_job()
    # As small as a run gets (three classes, 30 images each, one epoch) and one that cannot learn (a learning rate
    # of 1e-7 from random weights): its accuracy stays near chance, far below the gate.
    body["spec"]["dataset"].update({"classes": [0, 1, 2], "maxPerClass": 30})
    body["spec"]["hyperparameters"].update({"epochs": 1, "batchSize": 16, "learningRate": 1e-7})
    body["spec"]["evaluation"] = {"minAccuracy": 0.99}
    settings = OperatorSettings(metrics_port=0, webhook_port=0, status_throttle_seconds=0)
    memo = kopf.Memo(settings=settings, kube=Kube(emu.kubernetes_client()))
    client = FineTuneJobClient(NAMESPACE, api_client=emu.kubernetes_client())
    with KopfRunner(emu, memo=memo), KubeRayStandIn(emu, tmp_path / "kuberay", pvc_root=tmp_path / "pvc") as kuberay:
        client.create(body)
        with pytest.raises(JobFailed) as failed:
            client.wait(NAME, timeout=540)  # for a wedged run, not a performance bound (2 cores shared with others)
        output = kuberay.output(NAMESPACE, failed.value.job.status.ray_job_name or "") if failed.value.job.status else ""
    assert failed.value.reason == "BelowAccuracyGate", f"{failed.value}\n{output[-3000:]}"
    assert "is below spec.evaluation.minAccuracy 0.99" in failed.value.message
    model = client.artifacts(NAME).model_uri
    assert model is not None and Path(model).is_file()  # the model the gate refused is kept for inspection
