"""Runs a Kopf operator in its own thread and event loop against a :class:`KubeEmulator` (tests/support).

This module owns :class:`KopfRunner` — start, wait until Kopf watches its resources, poll for
outcomes, stop cleanly and re-raise the operator's own failure — and re-exports the polling helper.

Why a thread with its own loop: stopping Kopf cancels every task of the loop it runs in, which would
include the test's own tasks; a thread also keeps Kopf's blocking sync handlers away from the test.
It is stopped through ``stop_flag`` only: Kopf schedules a SIGKILL of the whole process if it exits
for any other reason (``settings.process.ultimate_exiting_timeout``), which the runner also disables.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

import kopf

# Kopf exports no way to hand credentials to an embedded operator except login handlers registered in
# the registry under test; a pre-populated vault (Kopf 1.45 is pinned) leaves that registry untouched.
from kopf._cogs.structs.credentials import Vault
from kopf._cogs.structs.references import match_namespace  # Kopf's own globs & exclusions for namespaces=

from tests.support.kube_emulator import ALL_VERBS, KubeEmulator, ResourceSpec, wait_for

__all__ = ["KopfRunner", "kopf_test_settings", "wait_for"]

T = TypeVar("T")


def kopf_test_settings(settings: kopf.OperatorSettings | None = None) -> kopf.OperatorSettings:
    """Kopf settings for tests: the operator's persistence choices, no process-killing safety net."""
    settings = settings if settings is not None else kopf.OperatorSettings()
    settings.persistence.finalizer = "finetune.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="finetune.dev", key="last-handled-configuration"
    )
    return settings


class KopfRunner:
    """A Kopf operator running against an emulator; a context manager.

    ``registry`` defaults to Kopf's global registry (what ``@kopf.on...`` without ``registry=`` fills).
    ``settings`` defaults to :func:`kopf_test_settings`; ``configure(settings)`` may adjust them before start.
    ``wait_watching`` (default True) makes ``start()`` return only once Kopf watches every emulator
    resource that the registry's handlers select; pass resource names to wait for those instead.
    """

    def __init__(
        self,
        emulator: KubeEmulator,
        *,
        registry: kopf.OperatorRegistry | None = None,
        settings: kopf.OperatorSettings | None = None,
        configure: Callable[[kopf.OperatorSettings], None] | None = None,
        clusterwide: bool = True,
        namespaces: Collection[str] = (),
        memo: object | None = None,
        wait_watching: bool | Iterable[str] = True,
        startup_timeout: float = 15.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.emulator = emulator
        self.registry = registry if registry is not None else kopf.get_default_registry()
        self.settings = settings if settings is not None else kopf_test_settings()
        # Kopf's watchdog SIGKILLs the process (pytest included) if the operator exits without stop_flag.
        self.settings.process.ultimate_exiting_timeout = None
        if configure is not None:
            configure(self.settings)
        self._clusterwide = clusterwide and not namespaces
        self._namespaces = tuple(namespaces)
        self._memo = memo
        self._wait_watching = wait_watching
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._stop_requested = False
        self._stop_flag: asyncio.Event | None = None  # created in (and set through) the operator's loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready_flag = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # ---- lifecycle

    def start(self) -> KopfRunner:
        if self._thread is not None:
            raise RuntimeError("the operator is already started")
        self._thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)
        self._thread.start()
        try:
            wait_for(lambda: self._ready_flag.is_set() or self._check(), self._startup_timeout, message="Kopf startup")
            watched = self._resources_to_watch()
            # One watch per resource cluster-wide, else one per served namespace (none yet for a glob
            # that matches no namespace: Kopf starts watching when one appears).
            streams = 1 if self._clusterwide else len(self._served_namespaces())
            if watched and streams:
                self.wait_for(
                    lambda: all(self.emulator.watch_count(spec) >= streams for spec in watched),
                    self._startup_timeout,
                    message=f"Kopf watching {[spec.key for spec in watched]}",
                )
        except BaseException:
            self._request_stop()
            self._thread.join(self._stop_timeout)
            self._thread = None
            raise
        return self

    def _request_stop(self) -> None:
        # Ordered against _operate(): either the loop is known here, or _operate() sees the request.
        self._stop_requested = True
        loop, flag = self._loop, self._stop_flag
        if loop is not None and flag is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the operator is gone already
                loop.call_soon_threadsafe(flag.set)

    def stop(self) -> None:
        """Stop the operator; re-raise its failure if it crashed."""
        if self._thread is None:
            return
        self._request_stop()
        self._thread.join(self._stop_timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the Kopf operator did not stop within {self._stop_timeout} s")
        self._thread = None
        self._check()

    def __enter__(self) -> KopfRunner:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            asyncio.run(self._operate())
        except BaseException as e:  # re-raised in the test thread by start()/wait_for()/stop()
            self._failure = self._failure or e

    async def _operate(self) -> None:
        # An asyncio.Event, not a threading.Event: Kopf waits for the latter in an executor thread, which
        # holds up its own exit for 5 s whenever the operator stops for any reason but the flag.
        self._stop_flag = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stop_requested:
            self._stop_flag.set()
        vault = Vault({"kube-emulator": kopf.ConnectionInfo(server=self.emulator.url, default_namespace="default")})
        releaser = asyncio.create_task(self._release_stop_waiter(self._stop_flag))  # before Kopf: not its task
        try:
            await kopf.operator(
                registry=self.registry,
                settings=self.settings,
                clusterwide=self._clusterwide,
                namespaces=self._namespaces,
                standalone=True,  # no KopfPeering resources in the emulator
                memo=self._memo,
                vault=vault,
                stop_flag=self._stop_flag,
                ready_flag=self._ready_flag,
            )
        except BaseException as e:
            self._failure = e
            raise
        finally:
            releaser.cancel()

    @staticmethod
    async def _release_stop_waiter(stop_flag: asyncio.Event) -> None:
        # When the operator stops on its own (a failure), Kopf's "stop-flag checker" leaves its flag-waiting
        # sub-task behind and then waits 5 s for it as a hung task; setting the flag releases it at once.
        while not stop_flag.is_set():
            await asyncio.sleep(0.05)
            pending = {task.get_name() for task in asyncio.all_tasks()}  # the waiter exists only under the checker
            if "stop-flag waiter" in pending and "stop-flag checker" not in pending:
                stop_flag.set()

    def _check(self) -> bool:
        if self._failure is not None:
            raise RuntimeError("the Kopf operator failed") from self._failure
        if self._thread is not None and not self._thread.is_alive() and not self._stop_requested:
            raise RuntimeError("the Kopf operator exited unexpectedly")
        return False

    def check(self) -> None:
        """Raise if the operator crashed or exited on its own."""
        self._check()

    # ---- waiting

    def wait_for(self, predicate: Callable[[], T | None], timeout: float = 10.0, *, message: str = "") -> T:
        """Wait until ``predicate()`` is truthy, re-checking on every emulator change; fail fast if Kopf dies."""

        def check() -> T | None:
            self._check()
            return predicate()

        return self.emulator.wait_until(check, timeout, message=message)

    def _served_namespaces(self) -> list[str]:
        names = [ns["metadata"]["name"] for ns in self.emulator.list("namespaces")]
        return [name for name in names if any(match_namespace(name, pattern) for pattern in self._namespaces)]

    def _resources_to_watch(self) -> list[ResourceSpec]:
        if self._wait_watching is False:
            return []
        if self._wait_watching is not True:
            return [self.emulator.resource(name) for name in self._wait_watching]
        selectors: set[Any] = set()
        for sub_registry in (self.registry._changing, self.registry._watching, self.registry._spawning, self.registry._indexing):
            selectors |= set(sub_registry.get_all_selectors())
        watched = []
        for spec in self.emulator.store.resources:
            resource = kopf.Resource(
                group=spec.group,
                version=spec.version,
                plural=spec.plural,
                kind=spec.kind,
                singular=spec.singular or spec.kind.lower(),
                shortcuts=frozenset(spec.short_names),
                namespaced=spec.namespaced,
                subresources=frozenset(spec.subresources),
                verbs=frozenset(ALL_VERBS),
                preferred=True,
            )
            if any(selector.check(resource) for selector in selectors):
                watched.append(spec)
        return watched
