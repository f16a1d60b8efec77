"""``FineTuneJobClient`` against the API emulator over HTTP, with the real operator (Kopf in a thread).

KubeRay is played by a thread that patches the RayJob's status as KubeRay's controller does, and the trainer
by its own status reporter (``KubernetesStatusSink``) writing the artifacts: the client sees exactly what it
would on a cluster. The Ray tier's stand-in (real Ray processes) is not needed for what the client reads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import yaml

import finetune_operator.handlers  # noqa: F401  (importing it registers the operator's handlers with Kopf)
from finetune_operator import naming
from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.v1alpha1 import Artifacts, Metrics, Progress
from finetune_operator.client import (
    AccessDenied,
    ApiError,
    FineTuneJobClient,
    Invalid,
    JobFailed,
    JobNotFound,
    LogsUnavailable,
    Timeout,
)
from finetune_trainer.status_reporter import KubernetesStatusSink
from tests.integration.test_operator import EXAMPLE, job
from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import PODS, KubeEmulator

pytestmark = pytest.mark.timeout(60)

TRAINER_ERROR = "error: spec.dataset.trainUri: s3://acme/flowers/train holds no class folders; expected one folder per class"


@pytest.fixture
def client(emu: KubeEmulator) -> FineTuneJobClient:
    return FineTuneJobClient(api_client=emu.kubernetes_client())


def play_kuberay(
    emu: KubeEmulator, name: str, *, succeed: bool, accuracy: float = 0.93, trained: bool | None = None, log: str = TRAINER_ERROR
) -> threading.Thread:
    """In a thread: once the operator created the RayJob, run it as KubeRay and the trainer would, then end it.

    ``trained``: the trainer wrote its metrics and artifacts (default: when it succeeds); ``log``: its last line on failure.
    """

    def run() -> None:
        rayjob = naming.rayjob_name(name)
        emu.wait_for_object("rayjobs", "default", rayjob, timeout=40)  # generous: the test machine may be loaded
        patch = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": f"{rayjob}-abcde"}
        emu.patch_status("rayjobs", "default", rayjob, patch)
        running = lambda o: (o.get("status") or {}).get("phase") == "Running"  # noqa: E731
        emu.wait_for_object("finetunejobs", "default", name, running, timeout=40)
        if succeed if trained is None else trained:
            cm = emu.get("configmaps", "default", f"{name}-trainer-config")
            sink = KubernetesStatusSink(
                TrainerConfig.model_validate_json(cm["data"]["trainer.json"]),
                api_client=emu.kubernetes_client(),
                throttle_seconds=0,
            )
            sink.update(Progress(epoch=4, total_epochs=4, percent=100, stage="fine-tune"), Metrics(best_val_accuracy=accuracy))
            model_uri = f"/mnt/finetune/finetune-runs/digits/default/{name}/model.pt"
            sink.finish(Artifacts(model_uri=model_uri, class_names=["0", "1"]))
        if succeed:
            emu.patch_status("rayjobs", "default", rayjob, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
        else:
            message = f"Job entrypoint command failed with exit code 2, last available logs:\nTraceback ...\n{log}\n"
            failed = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": message}
            emu.patch_status("rayjobs", "default", rayjob, failed)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_submit_wait_succeeded_and_read_artifacts(emu: KubeEmulator, operator: KopfRunner, client: FineTuneJobClient) -> None:
    created = client.create({**EXAMPLE, "metadata": {"name": "flowers"}})
    assert created.metadata.namespace == "default"
    assert emu.get("finetunejobs", "default", "flowers")["spec"]["hyperparameters"]["learningRate"] == 0.003
    play_kuberay(emu, "flowers", succeed=True)
    final = client.wait("flowers", timeout=30)
    assert final.status is not None and final.status.phase == "Succeeded"
    artifacts = client.artifacts("flowers")
    assert isinstance(artifacts, Artifacts)
    assert artifacts.model_uri == "/mnt/finetune/finetune-runs/digits/default/flowers/model.pt"
    assert artifacts.class_names == ["0", "1"]
    assert [j.metadata.name for j in client.list(phase="Succeeded")] == ["flowers"]
    assert [e.reason for e in client.events("flowers")][-1] == "PhaseSucceeded"


def test_failed_job_raises_job_failed_with_the_trainers_error_line(
    emu: KubeEmulator, operator: KopfRunner, client: FineTuneJobClient
) -> None:
    client.create(job("broken"))
    play_kuberay(emu, "broken", succeed=False)
    # A timeout far beyond the test's own (60 s): only raising on Failed, not timing out, lets this test pass.
    with pytest.raises(JobFailed) as failed:
        client.wait("broken", timeout=3600)
    assert failed.value.reason == "AppFailed"
    assert TRAINER_ERROR in failed.value.message
    assert failed.value.job.status is not None and failed.value.job.status.phase == "Failed"


def test_a_model_below_the_accuracy_gate_fails_the_job_and_keeps_its_artifacts(
    emu: KubeEmulator, operator: KopfRunner, client: FineTuneJobClient
) -> None:
    gated = job("gated", evaluation={"minAccuracy": 0.9})
    client.create(gated)
    assert emu.get("finetunejobs", "default", "gated")["spec"]["evaluation"] == {"minAccuracy": 0.9}
    gate_line = "error: BelowAccuracyGate: best validation accuracy 0.4200 (epoch 4) is below spec.evaluation.minAccuracy 0.9"
    play_kuberay(emu, "gated", succeed=False, trained=True, accuracy=0.42, log=gate_line)
    with pytest.raises(JobFailed) as failed:
        client.wait("gated", timeout=3600)
    assert failed.value.reason == "BelowAccuracyGate"
    assert "best validation accuracy 0.4200 (epoch 4) is below spec.evaluation.minAccuracy 0.9" in failed.value.message
    assert client.artifacts("gated").model_uri == "/mnt/finetune/finetune-runs/digits/default/gated/model.pt"


def test_a_watch_dropped_mid_wait_does_not_lose_the_result(emu: KubeEmulator, client: FineTuneJobClient) -> None:
    emu.create(job("dropped"))
    thread, box = in_thread(lambda: client.wait("dropped", timeout=30))
    emu.wait_until(lambda: emu.watch_count("finetunejobs") == 1, message="the client's watch")
    emu.store.close_watches()  # the API server (or a proxy) drops the connection
    emu.patch_status("finetunejobs", "default", "dropped", {"phase": "Succeeded"})
    thread.join(30)
    assert "error" not in box, box
    assert box["result"].status.phase == "Succeeded"


def test_a_watch_dropped_before_the_change_arrives_is_resumed(emu: KubeEmulator, client: FineTuneJobClient) -> None:
    """The transition lands while no watch is open; the re-read after the drop must see it."""
    emu.create(job("gap"))
    thread, box = in_thread(lambda: client.wait("gap", timeout=30))
    emu.wait_until(lambda: emu.watch_count("finetunejobs") == 1, message="the client's watch")
    with emu.store._lock:  # nothing commits or subscribes in between: the change falls in the gap
        emu.store.close_watches()
        emu.patch_status("finetunejobs", "default", "gap", {"phase": "Running"})
        emu.patch_status("finetunejobs", "default", "gap", {"phase": "Succeeded"})
    thread.join(30)
    assert "error" not in box, box
    assert box["result"].status.phase == "Succeeded"


def test_wait_times_out_and_reports_the_last_phase(emu: KubeEmulator, client: FineTuneJobClient) -> None:
    emu.create(job("slow"))
    emu.patch_status("finetunejobs", "default", "slow", {"phase": "Provisioning"})
    with pytest.raises(Timeout, match="still Provisioning after 1s") as timeout:
        client.wait("slow", timeout=1)
    assert timeout.value.job is not None and timeout.value.job.metadata.name == "slow"


def test_wait_for_a_missing_or_deleted_job(emu: KubeEmulator, client: FineTuneJobClient) -> None:
    with pytest.raises(JobNotFound):
        client.wait("nobody", timeout=5)
    emu.create(job("doomed"))
    thread, box = in_thread(lambda: client.wait("doomed", timeout=30))
    emu.wait_until(lambda: emu.watch_count("finetunejobs") == 1, message="the client's watch")
    emu.delete("finetunejobs", "default", "doomed")
    thread.join(30)
    assert isinstance(box.get("error"), JobNotFound)


FTJ = "/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs"


def refusal(code: int) -> dict[str, Any]:
    reason = "Unauthorized" if code == 401 else "Forbidden"
    message = "Unauthorized" if code == 401 else 'finetunejobs.finetune.dev is forbidden: User "ci" cannot get resource'
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}


@pytest.mark.parametrize("code", [401, 403])
def test_a_refused_read_ends_the_wait_at_once(emu: KubeEmulator, client: FineTuneJobClient, code: int) -> None:
    """Credentials or RBAC refused: retrying until the timeout cannot change the answer."""
    emu.create(job("guarded"))
    emu.kmock[f"get {FTJ}/guarded"] << code << refusal(code)
    with pytest.raises(AccessDenied, match=f"^get FineTuneJob default/guarded: HTTP {code} ") as denied:
        client.wait("guarded", timeout=10)
    assert "\n" not in str(denied.value) and "not retried" in str(denied.value)
    assert emu.request_counts("finetunejobs")["get"] == 1


def test_a_refused_watch_ends_the_wait_at_once(emu: KubeEmulator, client: FineTuneJobClient) -> None:
    emu.create(job("unwatched"))
    emu.kmock[f"get {FTJ}"] << 403 << refusal(403)  # the collection: the watch, not the read by name
    with pytest.raises(AccessDenied, match=r"^watch FineTuneJob default/unwatched: HTTP 403 Forbidden: .*cannot get"):
        client.wait("unwatched", timeout=10)
    assert emu.request_counts("finetunejobs")["watch"] == 1


def test_a_watch_that_fails_at_once_is_retried_after_a_back_off(emu: KubeEmulator, client: FineTuneJobClient) -> None:
    """A proxy answering every watch with 500: without a back-off, the client re-reads and re-watches in a tight loop."""
    emu.create(job("flaky-watch"))
    emu.kmock[f"get {FTJ}"] << 500
    with pytest.raises(Timeout):
        client.wait("flaky-watch", timeout=3)
    made = emu.request_counts("finetunejobs")
    # 0.25 s doubling (jittered to half at least): at most 0.125 + 0.25 + 0.5 + 1 + 2 s fit in 3 s, i.e. six tries.
    assert 1 <= made["watch"] <= 6 and made["get"] <= made["watch"] + 1, made  # a read before each watch, one last


def _pod(name: str, labels: dict[str, str], containers: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": c, "image": "trainer"} for c in containers]},
    }


def test_logs_come_from_the_submitter_pod_else_the_head(emu: KubeEmulator, client: FineTuneJobClient) -> None:
    emu.add_resource(PODS)
    emu.create(job("chatty"))
    rayjob = naming.rayjob_name("chatty")
    # Another job's Ray cluster named in the status (the trainer may write it): never read.
    other = emu.create(_pod("other-head", {"ray.io/cluster": "other-x", "ray.io/node-type": "head"}, ["ray-head"]))
    emu.set_pod_log("default", other["metadata"]["name"], "another job's output\n", container="ray-head")
    emu.patch_status("finetunejobs", "default", "chatty", {"phase": "Running", "rayJobName": rayjob, "rayClusterName": "other-x"})
    with pytest.raises(LogsUnavailable):
        list(client.logs("chatty"))
    cluster = f"{rayjob}-raycluster-c1a2b"  # KubeRay names a RayJob's cluster after it
    emu.patch_status("finetunejobs", "default", "chatty", {"rayClusterName": cluster})
    head = emu.create(_pod("c1-head", {"ray.io/cluster": cluster, "ray.io/node-type": "head"}, ["ray-head", "autoscaler"]))
    emu.set_pod_log("default", head["metadata"]["name"], "head says hi\n", container="ray-head")
    assert list(client.logs("chatty")) == ["head says hi"]  # HTTPMode: no submitter, the head's own log
    emu.create(_pod(f"{rayjob}-x1", {"batch.kubernetes.io/job-name": rayjob}, ["ray-job-submitter"]))
    emu.set_pod_log("default", f"{rayjob}-x1", "epoch 1/4 loss 0.9\nepoch 2/4 loss 0.5\n", container="ray-job-submitter")
    assert list(client.logs("chatty", follow=True)) == ["epoch 1/4 loss 0.9", "epoch 2/4 loss 0.5"]
    source = client.log_source("chatty")
    assert source is not None and source.role == "submitter" and source.kubectl().endswith(f"{rayjob}-x1 -c ray-job-submitter")


def test_logs_of_a_finished_job_whose_pods_are_gone_say_where_the_results_are(
    emu: KubeEmulator, client: FineTuneJobClient
) -> None:
    emu.add_resource(PODS)
    emu.create(job("over"))
    emu.patch_status(
        "finetunejobs", "default", "over", {"phase": "Succeeded", "artifacts": {"modelCardUri": "s3://b/over/model.json"}}
    )
    with pytest.raises(LogsUnavailable, match=r"Succeeded and KubeRay has deleted its Ray pods.*s3://b/over/model.json"):
        client.logs("over")


def test_apply_creates_then_updates_as_a_named_field_manager(emu: KubeEmulator, client: FineTuneJobClient) -> None:
    client.apply(job("applied"))
    client.apply(job("applied"), overrides=["spec.hyperparameters.epochs=9"])
    assert emu.get("finetunejobs", "default", "applied")["spec"]["hyperparameters"]["epochs"] == 9
    applies = [r for r in emu.kmock if r.method is not None and r.method.value.upper() == "PATCH"]
    assert {r.params.get("fieldManager") for r in applies} == {"finetune-client"}


def test_invalid_jobs_are_refused_before_any_request(emu: KubeEmulator, client: FineTuneJobClient) -> None:
    snake = job("snake")
    snake["spec"]["hyperparameters"] = {"learning_rate": 0.1}  # what model_dump() would send
    with pytest.raises(Invalid) as invalid:
        client.create(snake)
    assert any(line.startswith("spec.hyperparameters.learning_rate:") for line in invalid.value.lines)
    assert emu.list("finetunejobs") == []


def test_suspend_resume_delete(emu: KubeEmulator, client: FineTuneJobClient) -> None:
    emu.create(job("pausable"))
    client.suspend("pausable")
    assert emu.get("finetunejobs", "default", "pausable")["spec"]["runPolicy"]["suspend"] is True
    client.resume("pausable")
    assert emu.get("finetunejobs", "default", "pausable")["spec"]["runPolicy"]["suspend"] is False
    client.delete("pausable", wait=True, timeout=10)
    assert emu.find("finetunejobs", "default", "pausable") is None
    with pytest.raises(JobNotFound):
        client.get("pausable")


def test_an_admission_refusal_is_invalid_with_the_webhooks_words(emu: KubeEmulator, client: FineTuneJobClient) -> None:
    denied = (
        'admission webhook "validate.finetune.dev" denied the request: '
        "spec.resources.workers: 128 is above FINETUNE_OPERATOR_MAX_WORKERS (64)"
    )
    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": denied, "reason": "Forbidden", "code": 403}
    emu.kmock["post /apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs"] << 403 << status
    with pytest.raises(Invalid) as invalid:
        client.create(job("huge"))
    assert invalid.value.lines == [denied]
    assert str(invalid.value).startswith("create FineTuneJob default/huge: invalid: admission webhook")


def test_the_kubeconfig_context_picks_the_cluster_and_namespace(emu: KubeEmulator, tmp_path: Any) -> None:
    config = emu.kubeconfig(namespace="team-a")
    other = {"name": "elsewhere", "context": {"cluster": "nowhere", "user": "kube-emulator", "namespace": "team-z"}}
    config["clusters"].append({"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}})
    config["contexts"].append(other)
    config["current-context"] = "elsewhere"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    emu.add_namespace("team-a")
    emu.create(job("here", namespace="team-a"))
    chosen = FineTuneJobClient(context="kube-emulator", config_file=str(path))
    assert chosen.namespace == "team-a"
    assert [j.metadata.name for j in chosen.list()] == ["here"]
    current = FineTuneJobClient(config_file=str(path))
    assert current.namespace == "team-z"
    with pytest.raises(ApiError, match="cannot be reached"):
        current.list()
