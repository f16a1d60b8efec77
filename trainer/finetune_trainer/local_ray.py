"""The Ray that ``finetune run`` trains on: an embedded one started for the job (the default), or a
running one on this machine the user names with ``--address`` / ``FINETUNE_RAY_ADDRESS`` (opt-in).

Start-up is most of a short local run (bench/README.md, "Start-up of finetune run"), so the embedded
Ray starts only what a run uses: no dashboard, no prestarted workers, no preemption watcher, Ray's own
log lines at WARNING (and ``ray_compat.LocalTorchTrainer`` leaves out Ray Train's unused helper actors). Joining a running Ray
skips its start (GCS, raylet, agents: about 3 s here) but is never implicit: ``RAY_ADDRESS`` and the
last ``ray start`` are ignored unless the user says so, because a job that lands on somebody else's
cluster is worse than a slow start.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import math
import os
import re
from typing import Any, Final

from finetune_operator.api.contract import ENV_REPORT_POLL, REPORT_POLL_SECONDS, TrainerConfig
from finetune_operator.api.fields import quote
from finetune_trainer.errors import TrainerError, exception_line

__all__ = ["ADDRESS_ENV", "embedded_options", "ray_address", "start_ray"]

ADDRESS_ENV: Final = "FINETUNE_RAY_ADDRESS"
"""Opt-in address of a running Ray for ``finetune run`` (as ``--address``; the flag wins)."""

# The environment of the local Ray's processes (the controller reads both when it starts).
_LOCAL_ENV: Final = {
    # Ray Train's controller collects reports every 2 s and a worker holds only one pending report, so
    # any epoch shorter than that (a cached-feature linear probe: ~0.1 s) waited ~2 s in report().
    # The operator sets the same value in the RayJob's pods (contract.REPORT_POLL_SECONDS).
    ENV_REPORT_POLL: REPORT_POLL_SECONDS,
    # The preemption watcher (an actor: one more process importing Ray Train while the run starts) polls
    # for nodes being drained, which one machine never is. Kept on a cluster, where spot nodes are.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def ray_address(flag: str | None) -> str | None:
    """The running Ray to join (``--address``, else ``FINETUNE_RAY_ADDRESS``), or None for an embedded one.
    ``local`` (either way) asks for the embedded Ray explicitly. A value Ray cannot read is a TrainerError
    here, before Ray is imported: Ray itself says so only once it has loaded, or after a connect timeout."""
    value = (flag if flag is not None else os.environ.get(ADDRESS_ENV, "")).strip()
    if value in ("", "local"):
        return None
    scheme, sep, rest = value.partition("://")
    ok = _client_address(scheme, rest) if sep else value == "auto" or _host_port(value, port_required=True)
    if not ok:
        where = "--address" if flag is not None else ADDRESS_ENV
        why = "an HTTP address (the dashboard's?), " if scheme in ("http", "https") else ""
        raise TrainerError(f"{where}: {quote(value)}: {why}not a Ray address; {_ACCEPTED}")
    return value


# What Ray 2.60 reads as an address: ray.init takes "auto" and "local", sends `SCHEME://…` to Ray Client
# (ray.client_builder: `ray://` or a module holding a ClientBuilder), and reads the rest with
# services.canonicalize_bootstrap_address, whose parse_address takes HOST:PORT with an IPv6 host in brackets.
# parse_address takes any port text (and an empty host): those fail later, in the GCS client, and are refused here.
_ACCEPTED: Final = "accepted: auto, local, HOST:PORT ([IPv6]:PORT) or ray://HOST[:PORT]"
_HOST: Final = re.compile(r"[\w.-]+")  # a DNS name or an IPv4 address; `_` too, as in a container's name


def _host_port(text: str, *, port_required: bool) -> bool:
    """Whether ``text`` is HOST:PORT (or a bare HOST when not ``port_required``), an IPv6 HOST in brackets."""
    if text.startswith("["):
        host, closed, port = text[1:].partition("]")
        if not closed or not _is_ipv6(host) or (port and not port.startswith(":")):
            return False
        port = port[1:]
    else:
        host, colon, port = text.partition(":")
        if not _HOST.fullmatch(host) or (colon and not port):
            return False
    if not port:
        return not port_required
    return port.isascii() and port.isdigit() and 0 < int(port) < 65536


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _client_address(scheme: str, inner: str) -> bool:
    """Whether Ray Client can read ``SCHEME://INNER``: ``ray://HOST[:PORT]`` (gRPC's default port when left out),
    or another module's ClientBuilder, found here without importing it (never http://: Ray refuses that itself)."""
    if scheme == "ray":
        return _host_port(inner, port_required=False)
    if scheme in ("http", "https") or not all(part.isidentifier() for part in scheme.split(".")):
        return False
    try:
        return importlib.util.find_spec(scheme.split(".")[0]) is not None
    except (ImportError, ValueError):  # a module loaded without a spec (__main__ under a script): no ClientBuilder
        return False


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def embedded_options(cfg: TrainerConfig) -> dict[str, Any]:
    """``ray.init`` keywords of the embedded Ray: sized to the job (its workers must fit, or Train would
    wait for them forever) and to the machine, and nothing a local run does not use."""
    res = cfg.spec.resources
    return {
        # A new Ray of its own, always: without an address Ray joins the cluster named by RAY_ADDRESS or the
        # last `ray start` on this machine, which refuses num_cpus and is not what "runs on this laptop" means.
        "address": "local",
        # Logical CPUs: enough for every worker's reservation; threads are capped to the real cores in the loop.
        "num_cpus": max(_cores(), math.ceil(res.workers * res.cpus_per_worker)),
        "num_gpus": res.workers * res.gpus_per_worker or None,
        # The dashboard is a second web server and its agents (~1 s of CPU at start); nothing local reads it.
        "include_dashboard": False,
        # Workers' output is the job's console (our progress sink prints from rank 0).
        "log_to_driver": True,
        "logging_level": logging.WARNING,
        # Ray prestarts one worker per CPU for the driver's runtime env, which no Ray Train process uses:
        # the controller has a runtime env of its own and its actors and the training workers inherit it,
        # so each gets a new process anyway. On a small machine the unused ones start (import Ray) while
        # the controller and the worker do, and slow them down.
        "_system_config": {"prestart_worker_first_driver": False},
    }


def start_ray(cfg: TrainerConfig, address: str | None = None) -> bool:
    """Connect this process to Ray: the running one at ``address``, else an embedded one; False if Ray was
    already initialised here (a test, a notebook). Ray's own start-up failures are one line, not a traceback."""
    import ray

    if ray.is_initialized():
        return False
    for key, value in _LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    try:
        if address is None:
            ray.init(**embedded_options(cfg))
        else:
            # The running Ray's processes do not see this environment: the job's runtime env carries it to
            # the controller and the workers.
            ray.init(
                address=address,
                runtime_env={"env_vars": {k: os.environ[k] for k in _LOCAL_ENV}},
                log_to_driver=True,
                logging_level=logging.WARNING,
            )
    except Exception as e:
        # A raylet or GCS that did not come up in time on an overloaded machine, no free ports, /tmp full, no
        # Ray at the address: not the job's fault and not worth a traceback.
        if address is None:
            raise TrainerError(
                f"the local Ray did not start: {exception_line(e)}; retry when the machine is less busy, or see /tmp/ray/"
            ) from None
        # Ray 2.60 starts local clusters with token authentication; a client finds the token in ~/.ray only
        # when told to look (Ray's own switch, left to the user).
        hint = "" if os.environ.get("RAY_AUTH_MODE") else " (a Ray with token authentication: set RAY_AUTH_MODE=token)"
        raise TrainerError(f"--address: {address}: cannot join a running Ray: {exception_line(e)}{hint}") from None
    if address is not None:
        _check_fits(ray, cfg, address)
    return True


def _check_fits(ray: Any, cfg: TrainerConfig, address: str) -> None:
    """A joined Ray too small for the job would leave Ray Train waiting for its workers forever."""
    res = cfg.spec.resources
    total = ray.cluster_resources()
    need = {"CPU": res.workers * res.cpus_per_worker, "GPU": float(res.workers * res.gpus_per_worker)}
    for name, amount in need.items():
        if amount > float(total.get(name, 0.0)):
            ray.shutdown()
            raise TrainerError(
                f"--address: {address}: the job needs {amount:g} {name} (resources.workers × "
                f"{'cpusPerWorker' if name == 'CPU' else 'gpusPerWorker'}), the running Ray has {float(total.get(name, 0.0)):g}"
            )
