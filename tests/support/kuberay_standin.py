"""A KubeRay v1.7.0 stand-in for the one-machine end-to-end test: RayJobs on the emulator become real processes here.

This module owns :class:`KubeRayStandIn` (test support, not product code). It watches RayJobs on a
:class:`~tests.support.kube_emulator.KubeEmulator` over HTTP, as KubeRay's controller watches the API
server, and for each one plays KubeRay, the kubelet and Ray's job supervisor on this machine:

======================================  ==========================================================================
KubeRay / Kubernetes does               the stand-in does
======================================  ==========================================================================
``initRayJobStatusIfNeed``              ``jobDeploymentStatus: Initializing``, ``jobStatus: PENDING``, a generated
                                        ``jobId`` and ``rayClusterName`` (``<rayjob>-<5 random>``), ``startTime``
creates the RayCluster (owned by the    creates that RayCluster object (owner reference, ``ray.io/originated-from-*``
RayJob) and its head/worker pods        labels, the RayJob's ``rayClusterSpec``) and starts ONE local Ray node,
                                        ``ray start --head --block``, sized like the worker groups (``num-cpus`` from
                                        ``rayStartParams`` or the containers' CPU limits × replicas, custom
                                        ``resources`` summed alike), with the (training) worker container's
                                        environment: Ray Train workers inherit it, as in the pods
cluster ready → dashboard URL,          RayCluster ``status.state: ready``; RayJob ``dashboardURL`` (KubeRay's
submitter Job → ``Running``             ``<cluster>-head-svc.<ns>.svc.cluster.local:8265`` form) and
                                        ``jobDeploymentStatus: Running`` with ``jobStatus`` still PENDING
Ray's job supervisor runs the           runs ``spec.entrypoint`` as a subprocess with the head container's
entrypoint on the head                  environment and ``RAY_ADDRESS`` of the local node → ``jobStatus: RUNNING``,
                                        ``rayJobInfo.startTime``
the job ends                            exit 0: ``jobStatus: SUCCEEDED``, then ``Complete`` with ``endTime`` and
                                        ``succeeded: 1``; else ``FAILED``, then ``Failed`` with ``reason: AppFailed``,
                                        ``failed: 1`` and Ray's own message ("Job entrypoint command failed with
                                        exit code N, last available logs …" plus the output's tail)
``shutdownAfterJobFinishes``            the local Ray node is always stopped; the RayCluster object is deleted
                                        when ``ttlSecondsAfterFinished`` is 0 (no TTL timers here)
RayJob created with ``suspend: true``   ``jobDeploymentStatus: Suspended`` and nothing started
RayJob deleted                          its processes are stopped (the RayCluster goes by owner-reference GC)
======================================  ==========================================================================

The pod's filesystem is emulated by *path translation*, because nothing can be mounted at the pod's
paths on a shared machine: every ``volumeMount`` of the head and worker containers maps its
``mountPath`` to a directory here — a ``configMap`` volume to a directory holding its items (so
``/etc/finetune/trainer.json`` exists, read from the RayJob's own ConfigMap), a
``persistentVolumeClaim`` to ``<pvc_root>/<claimName>`` (head and workers share it, as pods share a
RWX claim), an ``emptyDir`` to a private directory. Pod paths under a mount are rewritten to their
directory here in the entrypoint's arguments, in environment values, and in string values of mounted
``.json`` files. That last rewrite is the one place the stand-in reaches into content: the operator
resolves ``pvc://CLAIM/P`` into ``outputRoot: /mnt/finetune/CLAIM/P`` (``finetune_operator.api.contract.PVC_MOUNT_ROOT``)
when it renders ``trainer.json``, so no environment variable could redirect it later; rewriting a
resolved pod path in the mounted file is what a bind mount would have done, with the trainer untouched.
What the trainer reports back (``status.artifacts`` URIs) therefore names paths on this machine;
:meth:`KubeRayStandIn.pod_path` maps them back to what a pod would have said.

Environment: the container's ``env`` (``value``; ``valueFrom.fieldRef`` for ``metadata.namespace`` and
``metadata.name``, as the downward API), on top of this process's environment (the "image"), without
in-cluster variables, plus ``KUBECONFIG`` of the emulator so that the trainer's status reporter reaches it.
Ray token authentication as KubeRay sets it up: with ``rayClusterSpec.authOptions.mode: token`` a random token
per RayCluster in ``RAY_AUTH_TOKEN`` and ``RAY_AUTH_MODE=token`` for the Ray node and the entrypoint (a
container ``env`` entry of the same name wins, as in KubeRay); otherwise ``RAY_AUTH_MODE=disabled`` as in a pod
without a token (Ray 2.60's ``ray start`` turns token auth on when ``~/.ray/auth_token`` exists, as it may on a
developer's machine).

Not emulated (the real-cluster e2e tier covers KubeRay itself): pods, services and scheduling;
``envFrom``, ``secretKeyRef``/``configMapKeyRef`` and secret volumes (the RayJob then fails with a
message saying so); ``pvc://`` URIs the trainer resolves itself at run time (inputs on a claim: only
already-resolved paths in the mounted config are translated); ``backoffLimit`` retries (a failure is
final), ``activeDeadlineSeconds``, suspending a running RayJob or resuming a suspended one, TTL timers;
GPUs; ``submissionMode`` other than running the entrypoint once; ``runtimeEnvYAML``.

Processes: each Ray node and entrypoint runs in its own session and is stopped through its own pid
(SIGTERM, then SIGKILL of whatever is left in its session, found in /proc while the leader is not yet
reaped, so that the session id is surely still ours): never ``ray stop``, which would kill every Ray on
the machine. Ray workers leave their parent's process group but not its session. Each node gets a
private ``--temp-dir``, so its ``ray_current_cluster`` file never makes another test's ``ray.init()``
join it, and free dashboard ports, so concurrent runs do not collide.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import kubernetes.client
import kubernetes.watch
import urllib3
from kubernetes.client.exceptions import ApiException

from tests.support.kube_emulator import KubeEmulator

__all__ = ["KubeRayStandIn", "StandInError"]

log = logging.getLogger(__name__)

GROUP: Final = "ray.io"
VERSION: Final = "v1"
RAYJOBS: Final = "rayjobs"
RAYCLUSTERS: Final = "rayclusters"
MERGE_PATCH: Final = "application/merge-patch+json"
RAY_LOG_TAIL: Final = 20_000  # Ray's job supervisor quotes this much of the entrypoint's output on failure
HEAD_START_TIMEOUT: Final = 90.0
STOP_GRACE: Final = 5.0  # then SIGKILL: a Ray node drains running tasks for up to 30 s on SIGTERM
REQUEST_TIMEOUT: Final = (5.0, 30.0)  # connect, read: a run must not hang on a dead emulator
WATCH_SECONDS: Final = 1  # server-side watch timeout: how soon the watch thread notices stop()
_TERMINAL: Final = frozenset({"Complete", "Failed", "ValidationFailed"})
# In-cluster credentials would win over KUBECONFIG in the trainer's client; a pod here has none.
_DROPPED_ENV: Final = ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "RAY_ADDRESS")


class StandInError(Exception):
    """The stand-in cannot emulate what this RayJob asks for; the RayJob fails with this message."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpus(quantity: Any) -> int:
    """A CPU quantity as whole Ray CPUs, rounded up as KubeRay does (``Quantity.Value()``)."""
    text = str(quantity)
    return math.ceil(int(text[:-1]) / 1000) if text.endswith("m") else math.ceil(float(text))


def _exited(proc: subprocess.Popen[Any]) -> bool:
    """Whether ``proc`` has exited, WITHOUT reaping it: an unreaped leader keeps its pid, the id of its group
    and session, ours."""
    if proc.returncode is not None:
        return True
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _session_members(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (from /proc: Ray workers change their process group,
    not their session, so the session is what holds everything a Ray node started)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _reap(proc: subprocess.Popen[Any]) -> int:
    """SIGKILL what is left of ``proc``'s session (Ray workers, a hung child), then reap ``proc``.

    ``proc`` leads its own session, so the session id is its pid, which only stays ours while ``proc`` is
    unreaped (running or a zombie); callers make sure of that (``_exited`` does not reap).
    """
    if proc.returncode is None:
        for pid in _session_members(proc.pid):
            if pid != proc.pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
    return proc.wait()


def _stop_process(proc: subprocess.Popen[Any] | None, *, leader_only: bool) -> None:
    """SIGTERM ``proc`` (the leader of its own session) or its whole process group; SIGKILL the rest; reap."""
    if proc is None or proc.returncode is not None:
        return
    if not _exited(proc):
        with contextlib.suppress(ProcessLookupError):
            if leader_only:
                # `ray start --block` tears its node down on SIGTERM; signalling the group would kill the
                # children under it and leave it waiting for them.
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while not _exited(proc) and time.monotonic() < deadline:
            time.sleep(0.1)  # waitid has no timeout; a grace period is a poll
    _reap(proc)


@dataclass
class _Mounts:
    """One container's view: pod mount path → directory on this machine (longest path first)."""

    table: list[tuple[str, Path]] = field(default_factory=list)

    def add(self, mount_path: str, directory: Path) -> None:
        self.table.append((mount_path.rstrip("/") or "/", directory))
        self.table.sort(key=lambda item: len(item[0]), reverse=True)

    def translate(self, value: str) -> str:
        for mount_path, directory in self.table:
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(directory) + value[len(mount_path) :]
        return value

    def translate_json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.translate(value)
        if isinstance(value, list):
            return [self.translate_json(v) for v in value]
        if isinstance(value, dict):
            return {k: self.translate_json(v) for k, v in value.items()}
        return value

    def pod_path(self, local: str) -> str:
        for mount_path, directory in self.table:
            root = str(directory)
            if local == root or local.startswith(root + "/"):
                return mount_path + local[len(root) :]
        return local


class _Run:
    """One RayJob attempt: its Ray node, its entrypoint, and the status it writes (a thread of its own)."""

    def __init__(self, standin: KubeRayStandIn, rayjob: Mapping[str, Any]) -> None:
        meta = rayjob["metadata"]
        self.standin = standin
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.rayjob = dict(rayjob)
        self.workdir: Path = standin.workdir / self.namespace / f"{self.name}-{self.uid[:8]}"
        self.log_path: Path = self.workdir / "entrypoint.log"
        self.head_mounts = _Mounts()
        self.worker_mounts = _Mounts()
        self.stopping = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.returncode: int | None = None
        self.ray_auth_mode: str | None = None  # RAY_AUTH_MODE the Ray node and the entrypoint ran with
        self._ray: subprocess.Popen[bytes] | None = None
        self._entrypoint: subprocess.Popen[bytes] | None = None
        self._ray_temp: str | None = None
        self._thread = threading.Thread(target=self._main, name=f"kuberay-{self.name}", daemon=True)

    # ---- lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(3 * STOP_GRACE + 5)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _main(self) -> None:
        try:
            self._run()
        except _Gone:
            log.info("RayJob %s/%s was deleted or the stand-in stopped; its processes are stopped", self.namespace, self.name)
        except BaseException as exc:
            self.error = exc
            log.exception("the KubeRay stand-in failed on RayJob %s/%s", self.namespace, self.name)
            with contextlib.suppress(Exception):
                reason = "SubmissionFailed" if isinstance(exc, StandInError) else "StandInError"
                self._patch_status(
                    {"jobDeploymentStatus": "Failed", "reason": reason, "message": f"kuberay stand-in: {exc}", "endTime": _now()}
                )
        finally:
            _stop_process(self._entrypoint, leader_only=False)
            _stop_process(self._ray, leader_only=True)
            if self._ray_temp is not None:
                shutil.rmtree(self._ray_temp, ignore_errors=True)
            self.done.set()

    # ---- the KubeRay state machine, one attempt

    def _run(self) -> None:
        spec = self.rayjob.get("spec") or {}
        if spec.get("suspend"):
            # KubeRay never creates a cluster for a RayJob that starts suspended (e.g. held by Kueue).
            self._patch_status({"jobDeploymentStatus": "Suspended"})
            return
        cluster_spec = spec.get("rayClusterSpec")
        if not cluster_spec:
            raise StandInError("spec.rayClusterSpec is missing (clusterSelector is not emulated)")
        cluster_name = f"{self.name}-{secrets.token_hex(3)[:5]}"
        job_id = f"{self.name}-{secrets.token_hex(3)[:5]}"
        self._patch_status(
            {
                "jobDeploymentStatus": "Initializing",
                "jobStatus": "PENDING",
                "jobId": job_id,
                "rayClusterName": cluster_name,
                "startTime": _now(),
            }
        )
        self._create_cluster(cluster_name, cluster_spec)

        self.workdir.mkdir(parents=True, exist_ok=True)
        head_pod = cluster_spec["headGroupSpec"]["template"]
        groups = cluster_spec.get("workerGroupSpecs") or []
        worker_pod = groups[0]["template"] if groups else head_pod
        head_container = self._materialise(head_pod, "head", self.head_mounts)
        worker_container = self._materialise(worker_pod, "worker", self.worker_mounts)
        auth = _auth_env(cluster_spec)
        head_env = self._env(head_container, self.head_mounts, f"{cluster_name}-head", auth)
        group_name = groups[0].get("groupName", "workers") if groups else "head"
        worker_env = self._env(worker_container, self.worker_mounts, f"{cluster_name}-{group_name}-worker-0", auth)
        self.ray_auth_mode = worker_env["RAY_AUTH_MODE"]

        address = self._start_ray(cluster_spec, worker_env)
        self._check_alive()
        self.standin.patch_cluster_status(self.namespace, cluster_name, {"state": "ready"})
        dashboard = f"{cluster_name}-head-svc.{self.namespace}.svc.cluster.local:8265"
        self._patch_status({"dashboardURL": dashboard, "jobDeploymentStatus": "Running"})

        argv = self._entrypoint_argv(str(spec.get("entrypoint") or ""))
        with self.log_path.open("wb") as out:
            self._entrypoint = subprocess.Popen(
                argv,
                env={**head_env, "RAY_ADDRESS": address},
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._patch_status({"jobStatus": "RUNNING", "rayJobInfo": {"startTime": _now()}})
        while not _exited(self._entrypoint):
            if self.stopping.wait(0.2):
                raise _Gone()
        self.returncode = _reap(self._entrypoint)
        ended = _now()
        if self.returncode == 0:
            # Ray reports the job done first; KubeRay completes the RayJob on its next reconcile.
            self._patch_status({"jobStatus": "SUCCEEDED", "rayJobInfo": {"endTime": ended}})
            self._patch_status({"jobDeploymentStatus": "Complete", "endTime": _now(), "succeeded": 1, "failed": 0})
        else:
            tail = self.output()[-RAY_LOG_TAIL:]
            message = (
                f"Job entrypoint command failed with exit code {self.returncode}, "
                f"last available logs (truncated to {RAY_LOG_TAIL:,} chars):\n{tail}"
            )
            self._patch_status({"jobStatus": "FAILED", "message": message, "rayJobInfo": {"endTime": ended}})
            self._patch_status(
                {"jobDeploymentStatus": "Failed", "reason": "AppFailed", "endTime": _now(), "succeeded": 0, "failed": 1}
            )
        if spec.get("shutdownAfterJobFinishes") and not spec.get("ttlSecondsAfterFinished"):
            self.standin.delete_cluster(self.namespace, cluster_name)

    def _check_alive(self) -> None:
        if self.stopping.is_set():
            raise _Gone()

    def _patch_status(self, status: Mapping[str, Any]) -> None:
        try:
            self.standin.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.namespace,
                RAYJOBS,
                self.name,
                {"status": dict(status)},
                _content_type=MERGE_PATCH,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 404:
                raise _Gone() from None
            raise

    def _create_cluster(self, cluster_name: str, cluster_spec: Mapping[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RayCluster",
            "metadata": {
                "name": cluster_name,
                "namespace": self.namespace,
                "labels": {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": self.name},
                "ownerReferences": [
                    {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": "RayJob",
                        "name": self.name,
                        "uid": self.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": dict(cluster_spec),
        }
        self.standin.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, RAYCLUSTERS, body, _request_timeout=REQUEST_TIMEOUT
        )

    # ---- the pod, emulated

    def _materialise(self, pod: Mapping[str, Any], role: str, mounts: _Mounts) -> dict[str, Any]:
        """Create the container's volumes here and fill ``mounts``; return the (first) container."""
        pod_spec = pod.get("spec") or {}
        containers = pod_spec.get("containers") or []
        if not containers:
            raise StandInError(f"the {role} pod template has no container")
        container = dict(containers[0])
        if container.get("envFrom"):
            raise StandInError(f"{role} container: envFrom is not emulated")
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise StandInError(f"{role} container mounts volume {mount['name']!r}, which the pod does not declare")
            mounts.add(mount["mountPath"], self._volume_dir(volume, role))
        # Translate the mounted JSON files only now that the container's whole mount table is known.
        for _mount_path, directory in mounts.table:
            if directory.parent == self.workdir / "configmaps":
                for path in directory.glob("*.json"):
                    path.write_text(json.dumps(mounts.translate_json(json.loads(path.read_text())), indent=2))
        return container

    def _volume_dir(self, volume: Mapping[str, Any], role: str) -> Path:
        if "persistentVolumeClaim" in volume:
            directory = self.standin.pvc_root / str(volume["persistentVolumeClaim"]["claimName"])
        elif "configMap" in volume:
            directory = self.workdir / "configmaps" / f"{role}-{volume['name']}"
            self._write_config_map(volume["configMap"], directory)
        elif "emptyDir" in volume:
            directory = self.workdir / "emptydirs" / f"{role}-{volume['name']}"
        else:
            kinds = sorted(set(volume) - {"name"})
            raise StandInError(f"volume {volume['name']!r}: {', '.join(kinds)} volumes are not emulated")
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def _write_config_map(self, source: Mapping[str, Any], directory: Path) -> None:
        try:
            data = (
                self.standin.core.read_namespaced_config_map(
                    source["name"], self.namespace, _request_timeout=REQUEST_TIMEOUT
                ).data
                or {}
            )
        except ApiException as exc:
            if exc.status == 404 and not source.get("optional"):
                # The kubelet would keep the pod in ContainerCreating; here the RayJob fails instead.
                raise StandInError(f"ConfigMap {self.namespace}/{source['name']} not found") from None
            raise
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        directory.mkdir(parents=True, exist_ok=True)
        for item in items:
            if item["key"] not in data:
                raise StandInError(f"ConfigMap {self.namespace}/{source['name']} has no key {item['key']!r}")
            target = directory / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[item["key"]])

    def _env(self, container: Mapping[str, Any], mounts: _Mounts, pod_name: str, auth: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        env.update(self.standin.extra_env)
        env["KUBECONFIG"] = str(self.standin.kubeconfig)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(auth)
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = mounts.translate(str(item["value"]))
                continue
            field_path = ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if field_path == "metadata.namespace":
                env[name] = self.namespace
            elif field_path == "metadata.name":
                env[name] = pod_name
            else:
                raise StandInError(f"env {name}: {json.dumps(item.get('valueFrom'))} is not emulated")
        return env

    def _entrypoint_argv(self, entrypoint: str) -> list[str]:
        argv = [self.head_mounts.translate(arg) for arg in shlex.split(entrypoint)]
        if not argv:
            raise StandInError("spec.entrypoint is empty")
        if argv[0] in ("python", "python3"):
            argv[0] = self.standin.python  # the image's interpreter
        return argv

    # ---- the Ray node

    def _start_ray(self, cluster_spec: Mapping[str, Any], env: Mapping[str, str]) -> str:
        """Start one local Ray node for the whole cluster; return its GCS address (RAY_ADDRESS)."""
        cpus = 0
        custom: dict[str, float] = {}
        groups = [(cluster_spec["headGroupSpec"], 1)]
        groups += [(g, int(g.get("replicas", g.get("minReplicas", 1)))) for g in cluster_spec.get("workerGroupSpecs") or []]
        for group, replicas in groups:
            params = group.get("rayStartParams") or {}
            # Custom resources as KubeRay reads them (common/pod.go getResourcesMap: quotes trimmed, then JSON).
            for name, amount in json.loads(str(params.get("resources") or "{}").strip("'\"` ")).items():
                custom[name] = custom.get(name, 0.0) + replicas * float(amount)
            if "num-cpus" in params:
                cpus += replicas * _cpus(params["num-cpus"])
            else:
                limits = (group["template"]["spec"]["containers"][0].get("resources") or {}).get("limits") or {}
                cpus += replicas * _cpus(limits.get("cpu", 1))
        # AF_UNIX socket paths must stay under ~107 bytes: a short private directory, not the test's tmp_path.
        self._ray_temp = tempfile.mkdtemp(prefix="kuberay-")
        command = [
            str(Path(self.standin.python).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--port=0",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            *([f"--resources={json.dumps(custom)}"] if custom else []),
            # The dashboard's dependencies are not installed here, so no state API either: Ray Train's
            # PlacementGroupCleaner logs "Failed to query Ray Train Controller actor state" every few seconds.
            "--include-dashboard=false",
            f"--dashboard-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--temp-dir={self._ray_temp}",
            "--disable-usage-stats",
        ]
        with (self.workdir / "ray-start.log").open("wb") as out:
            self._ray = subprocess.Popen(
                command, env=dict(env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        address_file = Path(self._ray_temp) / "ray_current_cluster"
        deadline = time.monotonic() + HEAD_START_TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                address = address_file.read_text().strip()
                if address:
                    return address
            if _exited(self._ray):
                raise StandInError(f"ray start exited with {_reap(self._ray)}: {self._tail('ray-start.log')}")
            if time.monotonic() > deadline:
                raise StandInError(f"the Ray head did not start within {HEAD_START_TIMEOUT:.0f} s: {self._tail('ray-start.log')}")
            self._check_alive()
            time.sleep(0.1)  # polling a file another process writes; there is nothing to wait on

    def _tail(self, name: str, size: int = 2000) -> str:
        try:
            return (self.workdir / name).read_text(errors="replace")[-size:]
        except OSError:
            return ""


def _auth_env(cluster_spec: Mapping[str, Any]) -> dict[str, str]:
    """What KubeRay gives every Ray container for ``authOptions`` (common/pod.go SetContainerTokenAuthEnvVars).

    Without token auth a fresh pod has no ~/.ray/auth_token, so Ray runs without it; here `ray start` would
    switch it on because a developer's home may hold a token that the driver does not send: pin the pod's
    behaviour with ``disabled``."""
    if (cluster_spec.get("authOptions") or {}).get("mode") == "token":
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    return {"RAY_AUTH_MODE": "disabled"}


class _Gone(Exception):
    """The RayJob was deleted, or the stand-in is stopping: end this run quietly."""


class KubeRayStandIn:
    """Plays KubeRay v1.7.0 for RayJobs on ``emulator``; a context manager (see the module docstring).

    ``workdir`` holds per-RayJob volumes and logs; ``pvc_root`` the claims (``<pvc_root>/<claimName>``,
    default ``<workdir>/pvc``); ``python`` the interpreter that plays the image's ``python``;
    ``extra_env`` is added to every container's environment (before the container's own ``env``).
    """

    def __init__(
        self,
        emulator: KubeEmulator,
        workdir: Path,
        *,
        pvc_root: Path | None = None,
        python: str = sys.executable,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.emulator = emulator
        self.workdir = Path(workdir)
        self.pvc_root = Path(pvc_root) if pvc_root is not None else self.workdir / "pvc"
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.kubeconfig = self.workdir / "kubeconfig"
        # Over HTTP, as KubeRay talks to the API server (the emulator must be started already).
        self._client: Any = emulator.kubernetes_client()  # the kubernetes package is untyped
        self.custom: Any = kubernetes.client.CustomObjectsApi(self._client)
        self.core: Any = kubernetes.client.CoreV1Api(self._client)
        self._runs: dict[str, _Run] = {}  # by RayJob uid
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._watch_error: BaseException | None = None

    # ---- lifecycle

    def start(self) -> KubeRayStandIn:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pvc_root.mkdir(parents=True, exist_ok=True)
        self.emulator.write_kubeconfig(self.kubeconfig)
        listed = self.custom.list_cluster_custom_object(GROUP, VERSION, RAYJOBS, _request_timeout=REQUEST_TIMEOUT)
        for item in listed.get("items") or []:
            self._observe("ADDED", item)
        self._watcher = threading.Thread(
            target=self._watch, args=(listed["metadata"]["resourceVersion"],), name="kuberay-watch", daemon=True
        )
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(WATCH_SECONDS + 10)
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.stop()
        self._client.close()

    def __enter__(self) -> KubeRayStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def check(self) -> None:
        """Raise if the stand-in itself broke (not a RayJob failing: that is a status, not an error)."""
        if self._watch_error is not None:
            raise RuntimeError("the KubeRay stand-in's watch failed") from self._watch_error
        with self._lock:
            errors = [run.error for run in self._runs.values() if run.error is not None]
        if errors:
            raise RuntimeError("the KubeRay stand-in failed on a RayJob") from errors[0]

    # ---- what tests look at

    def runs(self, namespace: str, name: str) -> list[_Run]:
        with self._lock:
            return [r for r in self._runs.values() if (r.namespace, r.name) == (namespace, name)]

    def output(self, namespace: str, name: str) -> str:
        """The entrypoint's output (stdout and stderr) of every attempt of RayJob ``namespace/name``."""
        return "\n".join(run.output() for run in self.runs(namespace, name))

    def ray_auth_modes(self, namespace: str, name: str) -> list[str | None]:
        """``RAY_AUTH_MODE`` of each attempt of RayJob ``namespace/name``: ``token`` when Ray demanded the token."""
        return [run.ray_auth_mode for run in self.runs(namespace, name)]

    def pod_path(self, namespace: str, name: str, local: str) -> str:
        """A path on this machine as the RayJob's head pod would have named it (``/mnt/finetune/...``)."""
        for run in self.runs(namespace, name):
            translated = run.head_mounts.pod_path(local)
            if translated != local:
                return translated
        return local

    # ---- used by runs

    def patch_cluster_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        with contextlib.suppress(ApiException):  # the RayCluster is informational; the RayJob is what counts
            self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                RAYCLUSTERS,
                name,
                {"status": dict(status)},
                _content_type=MERGE_PATCH,
                _request_timeout=REQUEST_TIMEOUT,
            )

    def delete_cluster(self, namespace: str, name: str) -> None:
        with contextlib.suppress(ApiException):
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, RAYCLUSTERS, name, _request_timeout=REQUEST_TIMEOUT
            )

    # ---- the watch

    def _watch(self, resource_version: str) -> None:
        rv: str | None = resource_version
        try:
            while not self._stop.is_set():
                try:
                    if rv is None:  # 410 Gone or a broken stream: list again, as an informer does
                        listed = self.custom.list_cluster_custom_object(GROUP, VERSION, RAYJOBS, _request_timeout=REQUEST_TIMEOUT)
                        for item in listed.get("items") or []:
                            self._observe("MODIFIED", item)
                        rv = listed["metadata"]["resourceVersion"]
                    for event in self._events(rv):
                        rv = event["object"]["metadata"].get("resourceVersion", rv)
                        self._observe(event["type"], event["object"])
                except ApiException as exc:
                    if exc.status != 410:
                        raise
                    rv = None
                except (urllib3.exceptions.HTTPError, OSError):
                    if self._stop.is_set():
                        return
                    rv = None
                    self._stop.wait(0.5)  # back off before listing again
        except BaseException as exc:
            self._watch_error = exc
            log.exception("the KubeRay stand-in's watch failed")

    def _events(self, resource_version: str) -> Iterator[dict[str, Any]]:
        watch_module: Any = kubernetes.watch  # untyped
        watch = watch_module.Watch()
        stream = watch.stream(
            self.custom.list_cluster_custom_object,
            GROUP,
            VERSION,
            RAYJOBS,
            resource_version=resource_version,
            timeout_seconds=WATCH_SECONDS,
            _request_timeout=(5, WATCH_SECONDS + 5),
        )
        for event in stream:
            if event["type"] == "ERROR":
                code = (event.get("raw_object") or {}).get("code")
                raise ApiException(status=code or 500, reason="watch error")
            yield {"type": event["type"], "object": event["raw_object"]}
            if self._stop.is_set():
                watch.stop()
                return

    def _observe(self, event_type: str, rayjob: Mapping[str, Any]) -> None:
        meta = rayjob.get("metadata") or {}
        uid = meta.get("uid")
        if not uid:
            return
        with self._lock:
            run = self._runs.get(uid)
            if event_type == "DELETED":
                if run is not None:
                    run.stopping.set()  # its thread stops its processes; stop() joins it
                return
            if run is not None or self._stop.is_set():
                return  # one attempt per RayJob: retries, suspend and resume are not emulated
            status = rayjob.get("status") or {}
            if status.get("jobDeploymentStatus") in _TERMINAL:
                return  # finished before this stand-in started
            run = _Run(self, rayjob)
            self._runs[uid] = run
        run.start()
