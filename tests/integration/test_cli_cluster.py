"""The ``finetune`` cluster verbs (``finetune_operator.cli_cluster``) against the API emulator: output and exit codes.

Each verb runs in-process through ``cli.main`` with ``KUBECONFIG`` pointing at the emulator, as a pipeline would
run it; ``submit --wait`` runs against the real operator with KubeRay played by a thread (``test_client``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import finetune_operator.handlers  # noqa: F401  (importing it registers the operator's handlers with Kopf)
from finetune_operator import naming
from finetune_operator.cli import main
from tests.integration.test_client import TRAINER_ERROR, play_kuberay
from tests.integration.test_operator import EXAMPLE, job, start_operator, stop_operator
from tests.support.kopf_runner import KopfRunner
from tests.support.kube_emulator import PODS, KubeEmulator, wait_for
from tests.support.schemas import REPO

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def kube(emu: KubeEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KubeEmulator:
    monkeypatch.setenv("KUBECONFIG", str(emu.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # never the in-cluster credentials of a CI pod
    return emu


@pytest.fixture
def operator(kube: KubeEmulator) -> Iterator[KopfRunner]:
    runner = start_operator(kube)
    try:
        yield runner
    finally:
        stop_operator(kube, runner)


def manifest(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**EXAMPLE, "metadata": {"name": name}}))
    return path


def test_submit_wait_exits_0_on_success_and_1_on_failure(
    kube: KubeEmulator, operator: KopfRunner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    play_kuberay(kube, "good", succeed=True)
    assert main(["submit", str(manifest(tmp_path, "good")), "--wait", "--timeout", "30s"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["finetunejob.finetune.dev/good created", "finetunejob.finetune.dev/good Succeeded"]

    play_kuberay(kube, "bad", succeed=False)
    assert main(["submit", str(manifest(tmp_path, "bad")), "--wait", "--timeout", "30s"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: FineTuneJob default/bad failed (AppFailed):") and TRAINER_ERROR in err


def test_submit_refuses_invalid_jobs_and_overrides_with_exit_2(
    kube: KubeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = manifest(tmp_path, "sweep")
    assert main(["submit", str(path), "--set", "spec.hyperparameters.learningRate=-1"]) == 2
    err = capsys.readouterr().err
    assert "spec.hyperparameters.learningRate: -1" in err
    assert main(["submit", str(path), "--set", "spec.hyperparameters.learningrate=0.1"]) == 2
    assert "spec.hyperparameters.learningrate" in capsys.readouterr().err
    assert kube.list("finetunejobs") == []
    assert main(["submit", str(path), "--set", "spec.hyperparameters.learningRate=0.01", "-o", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["spec"]["hyperparameters"]["learningRate"] == 0.01
    assert kube.get("finetunejobs", "default", "sweep")["spec"]["hyperparameters"]["learningRate"] == 0.01
    with pytest.raises(SystemExit) as usage:
        main(["wait", "sweep", "--timeout", "soon"])
    assert usage.value.code == 2


def test_wait_exits_3_on_timeout(kube: KubeEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    kube.create(job("stuck"))
    kube.patch_status("finetunejobs", "default", "stuck", {"phase": "Pending"})
    assert main(["wait", "stuck", "--timeout", "1"]) == 3
    assert "stuck: still Pending after 1s" in capsys.readouterr().err
    assert main(["wait", "stuck", "--for", "Pending"]) == 0
    assert capsys.readouterr().out == "finetunejob.finetune.dev/stuck Pending\n"


def test_get_list_describe_and_missing_jobs(kube: KubeEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    kube.add_namespace("team-b")
    kube.create(job("one"))
    kube.create(job("two", namespace="team-b"))
    status = {
        "phase": "Running",
        "message": "training on the Ray cluster",
        "progress": {"epoch": 2, "totalEpochs": 4, "percent": 50, "stage": "fine-tune"},
        "metrics": {"bestValAccuracy": 0.875},
        "conditions": [{"type": "Training", "status": "True", "reason": "JobRunning", "message": "training"}],
    }
    kube.patch_status("finetunejobs", "default", "one", status)

    assert main(["get", "one"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "PHASE", "MODEL", "EPOCH", "BEST-VAL-ACC", "AGE"]
    assert row.split()[:5] == ["one", "Running", "resnet18", "2/4", "0.8750"]
    assert main(["get", "one", "-o", "wide"]) == 0
    assert "training on the Ray cluster" in capsys.readouterr().out
    assert main(["get", "one", "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["metadata"]["name"] == "one"

    assert main(["list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["NAME", "one"]
    assert main(["list", "-A", "-o", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    names = [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in listed["items"]]
    assert names == [("default", "one"), ("team-b", "two")]
    assert main(["list", "-n", "team-b", "--phase", "Running"]) == 0
    assert "No resources found." in capsys.readouterr().err

    assert main(["describe", "one"]) == 0
    described = capsys.readouterr().out
    for expected in ("Phase:       Running", "epoch 2/4", "Training     True    JobRunning", "Artifacts:", "Logs:", "Events:"):
        assert expected in described

    assert main(["get", "nobody"]) == 4
    assert "not found" in capsys.readouterr().err


def running_with_submitter(kube: KubeEmulator, name: str) -> str:
    """Job ``name`` Running, its RayJob's submitter pod there (no log yet); the pod's name."""
    kube.add_resource(PODS)
    kube.create(job(name))
    rayjob = naming.rayjob_name(name)
    kube.patch_status("finetunejobs", "default", name, {"phase": "Running", "rayJobName": rayjob})
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{rayjob}-p", "labels": {"batch.kubernetes.io/job-name": rayjob}},
        "spec": {"containers": [{"name": "ray-job-submitter", "image": "trainer"}]},
    }
    kube.create(pod)
    return f"{rayjob}-p"


def test_logs_suspend_resume_delete(kube: KubeEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    running_with_submitter(kube, "talk")
    rayjob = naming.rayjob_name("talk")
    kube.set_pod_log("default", f"{rayjob}-p", "epoch 1/4 val_acc 0.91\n")
    assert main(["logs", "talk", "-f"]) == 0
    assert capsys.readouterr().out == "epoch 1/4 val_acc 0.91\n"
    assert main(["describe", "talk"]) == 0
    assert f"kubectl logs -n default {rayjob}-p -c ray-job-submitter" in capsys.readouterr().out

    assert main(["suspend", "talk"]) == 0
    assert kube.get("finetunejobs", "default", "talk")["spec"]["runPolicy"]["suspend"] is True
    assert main(["resume", "talk"]) == 0
    assert kube.get("finetunejobs", "default", "talk")["spec"]["runPolicy"]["suspend"] is False
    said = capsys.readouterr().out.splitlines()
    assert said == ["finetunejob.finetune.dev/talk suspended", "finetunejob.finetune.dev/talk resumed"]

    kube.delete("pods", "default", f"{rayjob}-p")
    kube.patch_status("finetunejobs", "default", "talk", {"phase": "Failed"})
    assert main(["logs", "talk"]) == 4
    assert "KubeRay has deleted its Ray pods" in capsys.readouterr().err

    assert main(["delete", "talk", "--wait", "--timeout", "10s"]) == 0
    assert capsys.readouterr().out == 'finetunejob.finetune.dev "talk" deleted\n'
    assert kube.find("finetunejobs", "default", "talk") is None


def test_submit_follow_streams_the_trainers_output_then_waits(
    kube: KubeEmulator, operator: KopfRunner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kube.add_resource(PODS)
    rayjob = naming.rayjob_name("followed")
    labels = {"batch.kubernetes.io/job-name": rayjob}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{rayjob}-s", "labels": labels}}
    kube.create({**pod, "spec": {"containers": [{"name": "ray-job-submitter", "image": "trainer"}]}})
    kube.set_pod_log("default", f"{rayjob}-s", "epoch 4/4 val_acc 0.93\nfollowed: best 0.93\n")
    play_kuberay(kube, "followed", succeed=True)
    assert main(["submit", str(manifest(tmp_path, "followed")), "--follow", "--timeout", "30s"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "finetunejob.finetune.dev/followed created",
        "epoch 4/4 val_acc 0.93",
        "followed: best 0.93",
        "finetunejob.finetune.dev/followed Succeeded",
    ]


def test_submit_wait_follows_the_job_into_the_manifests_namespace(
    kube: KubeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kube.add_namespace("team-b")
    path = tmp_path / "elsewhere.yaml"
    path.write_text(yaml.safe_dump({**EXAMPLE, "metadata": {"name": "elsewhere", "namespace": "team-b"}}))

    def finish() -> None:
        kube.wait_for_object("finetunejobs", "team-b", "elsewhere", timeout=45)  # the CLI's start may be slow on a loaded machine
        kube.patch_status("finetunejobs", "team-b", "elsewhere", {"phase": "Succeeded"})

    threading.Thread(target=finish, daemon=True).start()
    assert main(["submit", str(path), "--wait", "--timeout", "45s"]) == 0  # no -n: the kubeconfig says default
    assert capsys.readouterr().out.splitlines()[-1] == "finetunejob.finetune.dev/elsewhere Succeeded"


def interrupted(kube: KubeEmulator, args: list[str], started: object) -> subprocess.CompletedProcess[str]:
    """``finetune ARGS`` in a process of its own, sent SIGINT (Ctrl-C) once ``started()`` holds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer")])}
    # A shell's background job ignores SIGINT, and a child inherits that: give it the terminal's default back.
    preexec = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    command = [sys.executable, "-m", "finetune_operator.cli", *args]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
    try:
        wait_for(started, 30, message=f"finetune {' '.join(args)} waiting")  # type: ignore[arg-type]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_ctrl_c_in_wait_exits_130_with_one_line(kube: KubeEmulator) -> None:
    kube.create(job("long"))
    done = interrupted(kube, ["wait", "long", "--timeout", "10m"], lambda: kube.watch_count("finetunejobs") >= 1)
    assert (done.returncode, done.stderr) == (130, "error: interrupted; wait stopped (the job itself goes on)\n")


def test_ctrl_c_in_logs_follow_exits_130_with_one_line(kube: KubeEmulator) -> None:
    pod = running_with_submitter(kube, "chatty")

    async def still_training() -> str:  # a log that streams on: the trainer has not ended
        await asyncio.sleep(5)
        return ""

    kube.kmock[f"get /api/v1/namespaces/default/pods/{pod}/log"] << still_training
    reading = lambda: kube.request_counts("pods", subresource="log")["get"] >= 1  # noqa: E731
    done = interrupted(kube, ["logs", "chatty", "-f"], reading)
    assert (done.returncode, done.stderr) == (130, "error: interrupted; logs stopped (the job itself goes on)\n")


def test_logs_never_show_another_jobs_pods(kube: KubeEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    """The review's case: status.rayJobName (the job's trainer may write its status) named another job's RayJob, and
    `finetune logs` printed that job's output. The client reads the pods of the job's own RayJob only."""
    running_with_submitter(kube, "victim")
    kube.set_pod_log("default", f"{naming.rayjob_name('victim')}-p", "victim's own output\n")
    kube.create(job("mine"))
    kube.patch_status("finetunejobs", "default", "mine", {"phase": "Running", "rayJobName": naming.rayjob_name("victim")})
    main(["logs", "mine"])
    assert "victim's own output" not in capsys.readouterr().out


def test_wait_for_a_phase_that_does_not_exist_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["wait", "w", "--for", "Sucseeded", "--timeout", "2s"])
    assert exited.value.code == 2 and "--for: invalid choice: 'Sucseeded'" in capsys.readouterr().err
