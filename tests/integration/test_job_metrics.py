"""The job-level series on the operator's /metrics, scraped over real HTTP while the operator runs against the emulator.

The endpoint is prometheus_client's HTTP server on the operator's registry (``metrics.REGISTRY``), in plain HTTP as
``metrics_server.serve`` starts it with FINETUNE_OPERATOR_METRICS_AUTH=false (its HTTPS and token reviews:
tests/unit/test_metrics_server.py, test_operator.py); the text is parsed with prometheus_client's parser, as Prometheus
reads it.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

import finetune_operator.handlers  # noqa: F401  (importing it registers the operator's handlers with Kopf)
from finetune_operator import metrics, naming
from tests.integration.test_operator import job, kuberay, wait_phase
from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import KubeEmulator

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def endpoint() -> Iterator[str]:
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=metrics.REGISTRY)
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        thread.join(5)
        metrics.step_down()  # the jobs of this test's emulator are gone with it
        metrics.take_over()


def job_series(url: str, name: str) -> dict[str, float]:
    """The series of job ``default/name`` on ``url``: family (with the phase, for the phase family) → value."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("namespace") == "default" and sample.labels.get("name") == name:
                phase = sample.labels.get("phase")
                found[f"{sample.name}:{phase}" if phase else sample.name] = sample.value
    return found


def test_a_jobs_series_follow_its_status_and_go_with_it(emu: KubeEmulator, operator: KopfRunner, endpoint: str) -> None:
    emu.create(job("watched", resources={"workers": 2}))
    emu.create(job("neighbour"))
    rayjob = naming.rayjob_name("watched")
    wait_phase(operator, emu, "watched", "Provisioning")
    kuberay(emu, rayjob, jobDeploymentStatus="Running", jobStatus="RUNNING")
    wait_phase(operator, emu, "watched", "Running")
    emu.patch_status("finetunejobs", "default", "watched", {"metrics": {"bestValAccuracy": 0.75, "imagesPerSecond": 120.0}})

    def running() -> dict[str, float] | None:
        found = job_series(endpoint, "watched")
        return found if found.get("finetune_job_best_val_accuracy") == 0.75 else None

    series = operator.wait_for(running, timeout=30, message="the trainer's metrics on /metrics")
    assert series["finetune_job_status_phase:Running"] == 1.0
    assert series["finetune_job_status_phase:Provisioning"] == 0.0
    assert series["finetune_job_images_per_second"] == 120.0
    assert series["finetune_job_gpus"] == 0.0  # the CPU example: 2 workers without GPUs
    assert "finetune_job_duration_seconds" in series and "finetune_job_queued_seconds" in series

    emu.delete("finetunejobs", "default", "watched")
    operator.wait_for(lambda: job_series(endpoint, "watched") == {}, timeout=30, message="the deleted job's series gone")
    assert job_series(endpoint, "neighbour")["finetune_job_status_phase:Provisioning"] == 1.0
