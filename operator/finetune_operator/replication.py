"""How replicas share the work under leader election: the Lease election of one replica (``leader_elector``), which
runs the leader's own Kopf with every handler while the Lease is held, and that Kopf's settings
(``reconciling_settings``).

``handlers.main`` wires it to ``kopf.run`` beside the Kopf that every replica runs (the webhook, probes, metrics);
the election itself (terms, renewals, fencing) lives in ``leadership``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import kopf

from finetune_operator import metrics
from finetune_operator.k8s import Kube
from finetune_operator.leadership import Fenced, LeaderElector, LeaderWork, Timing
from finetune_operator.settings import OperatorSettings


def leader_elector(
    settings: OperatorSettings, kube: Kube, identity: str, run_kopf: Callable[[kopf.Memo, threading.Event], None]
) -> LeaderElector:
    """The election of one replica: while it holds the Lease, ``run_kopf(memo, stop)`` (Kopf with every handler, its
    webhook and metrics off) runs in a thread of its own until ``stop`` is set."""
    timing = Timing(settings.lease_duration_seconds, settings.renew_deadline_seconds, settings.retry_period_seconds)

    def reconcile(stop: threading.Event) -> None:
        # Kopf may take a moment to stop: the resync thread asks ``leading`` before every round, and writes are fenced.
        term = elector.term  # started by on_started: this run belongs to the term that just began
        leading = functools.partial(elector.leads, term)
        fenced = Fenced(kube, leading, functools.partial(elector.remaining, term))  # writes land within the lease
        run_kopf(kopf.Memo(settings=reconciling_settings(settings), kube=fenced, leading=leading), stop)

    def started() -> None:
        metrics.take_over()
        work.start()

    def stopped() -> None:  # the jobs are the next leader's to export; late handlers of ours add none back
        work.stop()
        metrics.step_down()

    # Stopping must end before the others may take over: what the renew deadline leaves of the lease duration.
    work = LeaderWork(reconcile, stop_timeout=timing.lease_duration - timing.renew_deadline)
    elector = LeaderElector(
        kube,
        settings.leader_election_namespace,
        settings.leader_election_lease,
        identity,
        timing=timing,
        on_started=started,
        on_stopped=stopped,
        healthy=lambda: work.alive,
    )
    return elector


def reconciling_settings(settings: OperatorSettings) -> OperatorSettings:
    """The leader's second Kopf: no webhook and no metrics server, which the replica's first Kopf serves."""
    return settings.replace(webhook_port=0, metrics_port=0)
