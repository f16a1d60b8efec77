"""The operator (``finetune_operator.handlers``) in threads against a :class:`KubeEmulator`, for the integration tier.

This module owns the one way the tier starts and stops the operator: ``start_operator`` / ``stop_operator`` (one
Kopf, as ``kopf run --standalone``), ``settle``, and :class:`Replica` — one replica under leader election, wired by
``handlers.leader_elector`` exactly as ``handlers.main`` wires it, with its reconciling Kopf pointed at the emulator.
Each replica's requests carry a bearer token of its own (``KubeEmulator.requests_with_token``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import kopf
import kubernetes.client
from kopf._cogs.structs.credentials import Vault  # see tests/support/kopf_runner.py: Kopf 1.45 is pinned

import finetune_operator.handlers  # noqa: F401  (importing it registers the operator's handlers with Kopf)
from finetune_operator.handlers import leader_elector
from finetune_operator.k8s import Kube
from finetune_operator.leadership import LeaderElector
from finetune_operator.settings import OperatorSettings
from tests.support.kopf_runner import KopfRunner, kopf_test_settings
from tests.support.kube_emulator import KubeEmulator, wait_for

SETTINGS = OperatorSettings(metrics_port=0, webhook_port=0)  # the webhook: tests/integration/test_webhook.py


def start_operator(emu: KubeEmulator, settings: OperatorSettings = SETTINGS) -> KopfRunner:
    return KopfRunner(emu, memo=kopf.Memo(settings=settings, kube=Kube(emu.kubernetes_client()))).start()


def settle(emu: KubeEmulator, quiet: float = 0.3, timeout: float = 10.0) -> None:
    """Wait until nothing has changed for ``quiet`` seconds: Kopf has seen its own last patch.

    Stopping Kopf right after a handler's patch leaves its worker waiting for that resourceVersion on a
    watch that is gone (``persistence.consistency_timeout``, 5 s) and makes every teardown slow.
    """
    deadline = time.monotonic() + timeout
    last, since = emu.resource_version, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if emu.resource_version != last:
            last, since = emu.resource_version, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def stop_operator(emu: KubeEmulator, runner: KopfRunner) -> None:
    settle(emu)
    runner.stop()


class Replica:
    """One operator replica under leader election: its campaign thread, and Kopf while it leads.

    ``stop()`` stops it as SIGTERM does (steps down, releases the Lease); ``terms`` lists (started, stopped)
    monotonic times of each time it led, ``stopped`` None while it still leads.
    """

    def __init__(self, emu: KubeEmulator, identity: str, settings: OperatorSettings) -> None:
        self.emu, self.identity = emu, identity
        configuration = emu.kubernetes_configuration()
        configuration.api_key = {"authorization": identity}  # the emulator counts requests by token
        self.kube = Kube(kubernetes.client.ApiClient(configuration))
        self.terms: list[list[float | None]] = []
        self.kopf_failures: list[BaseException] = []
        self.on_lead: list[Callable[[], None]] = []  # called as its Kopf starts
        self._running = 0
        self._lock = threading.Lock()
        self.elector: LeaderElector = leader_elector(settings, self.kube, identity, self._run_kopf)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.elector.run, args=(self._stop,), name=f"campaign-{identity}", daemon=True)

    def _run_kopf(self, memo: kopf.Memo, stop: threading.Event) -> None:
        vault = Vault({"emulator": kopf.ConnectionInfo(server=self.emu.url, default_namespace="default", token=self.identity)})
        settings = kopf_test_settings()
        settings.process.ultimate_exiting_timeout = None  # never SIGKILL pytest
        for hook in self.on_lead:
            hook()
        with self._lock:
            self._running += 1
            self.terms.append([time.monotonic(), None])
        try:
            asyncio.run(
                kopf.operator(settings=settings, clusterwide=True, standalone=True, memo=memo, vault=vault, stop_flag=stop)
            )
        except BaseException as exc:
            self.kopf_failures.append(exc)
            raise
        finally:
            with self._lock:
                self._running -= 1
                self.terms[-1][1] = time.monotonic()

    @property
    def kopf_running(self) -> bool:
        with self._lock:
            return self._running > 0

    def start(self) -> Replica:
        self._thread.start()
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """As on SIGTERM: step down (Kopf stops), release the Lease; then wait for Kopf's thread to end."""
        self._stop.set()
        self._thread.join(timeout)
        wait_for(lambda: not self.kopf_running, timeout, message=f"{self.identity}'s Kopf stopped")
