"""The ``finetune`` verbs that talk to a cluster: submit, get, list, describe, wait, logs, suspend, resume, delete.

Each verb is a thin layer over ``FineTuneJobClient`` (imported when a verb runs: the kubernetes client is in the
operator extra, and ``finetune validate`` must work without it). Exit codes a pipeline can branch on (``EXIT_*``):
0 done (a waited-for job Succeeded), 1 the job Failed, 2 usage or an invalid job, 3 timeout, 4 the job or the API
server cannot be reached (or refused the credentials or the request), 130 interrupted (Ctrl-C, as shells count
it). Output follows kubectl: ``-o table|wide|json|yaml``, ``-n``, ``-A``, ``--context``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Final

import yaml

from finetune_operator.api.job_status import Phase
from finetune_operator.client_errors import at, mapping_at

if TYPE_CHECKING:
    from finetune_operator.client import FineTuneJobClient

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_TIMEOUT: Final = 3
EXIT_UNREACHABLE: Final = 4
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C
PHASES: Final = tuple(phase.value for phase in Phase)
_DURATION: Final = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)?$")
_UNIT: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION: Final = 365 * 86400.0
EXIT_CODES: Final = (
    "exit codes: 0 done (with --wait: the job Succeeded), 1 the job Failed, 2 usage error or invalid job, "
    "3 timeout, 4 job not found, API server unreachable or access denied, 130 interrupted (Ctrl-C)"
)


def duration(text: str) -> float:
    """Seconds of ``90``, ``30s``, ``10m``, ``6h``, ``1d`` (argparse type: a bad value is a one-line usage error)."""
    match = _DURATION.match(text.strip()[:64])
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text[:64]!r} is not a duration; use seconds or a number with s, m, h or d, e.g. 30m")
    seconds = float(match[1]) * _UNIT[match[2] or "s"]
    if seconds > MAX_DURATION:
        raise argparse.ArgumentTypeError(f"{text[:64]!r} is longer than a year; give at most 365d")
    return seconds


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _client(args: argparse.Namespace) -> FineTuneJobClient:
    from finetune_operator.client import FineTuneJobClient

    return FineTuneJobClient(getattr(args, "namespace", None), context=args.context, config_file=args.kubeconfig)


def _run(verb: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map the client's typed errors to exit codes and one line on stderr (never a traceback)."""

    def run(args: argparse.Namespace) -> int:
        from finetune_operator import client as c

        try:
            return verb(args)
        except c.Invalid as exc:
            print(f"{exc.label}: invalid ({len(exc.lines)} error{'s' if len(exc.lines) > 1 else ''})", file=sys.stderr)
            for line in exc.lines:
                print(f"  {line}", file=sys.stderr)
            return EXIT_USAGE
        except c.JobFailed as exc:
            _err(str(exc))
            return EXIT_FAILED
        except c.Timeout as exc:
            _err(str(exc))
            return EXIT_TIMEOUT
        except c.ClientError as exc:  # not found, API refused or unreachable, logs gone, no credentials
            _err(str(exc))
            return EXIT_UNREACHABLE
        except KeyboardInterrupt:  # Ctrl-C in `logs -f` or `wait`: the user's choice, not a crash to show a traceback of
            _err(f"interrupted; {args.command} stopped (the job itself goes on)")
            return EXIT_INTERRUPTED

    return run


# ---- output


def _age(obj: Mapping[str, Any], now: datetime) -> str:
    created = str(at(obj, "metadata", "creationTimestamp") or "")
    try:
        seconds = int((now - datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)).total_seconds())
    except ValueError:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{max(0, seconds)}s"


def _row(obj: Mapping[str, Any], wide: bool, with_ns: bool, now: datetime) -> list[str]:
    # Every field through ``at``: a field of the wrong type (a string where an object belongs) shows as it is or "-".
    progress, metrics = mapping_at(obj, "status", "progress"), mapping_at(obj, "status", "metrics")
    acc = metrics.get("bestValAccuracy", metrics.get("valAccuracy"))
    row = [
        str(at(obj, "metadata", "name") or "-"),
        str(at(obj, "status", "phase") or "-"),
        str(at(obj, "spec", "model", "name") or "-"),
        f"{progress['epoch']}/{progress.get('totalEpochs', '?')}" if progress.get("epoch") is not None else "-",
        f"{acc:.4f}" if isinstance(acc, (int, float)) else "-",
        _age(obj, now),
    ]
    if with_ns:
        row.insert(0, str(at(obj, "metadata", "namespace") or ""))
    if wide:
        method = at(obj, "spec", "strategy", "method") or "lp-ft"
        workers = at(obj, "spec", "resources", "workers") or 1
        row += [str(method), str(workers), str(at(obj, "status", "rayJobName") or "-"), str(at(obj, "status", "message") or "")]
    return row


def print_objects(objects: list[dict[str, Any]], output: str, *, with_ns: bool = False, single: bool = False) -> None:
    """kubectl's ``-o``: a table (``wide`` adds columns), or the objects as JSON/YAML (a List when several)."""
    if output in ("json", "yaml"):
        doc: Any = objects[0] if single and objects else {"apiVersion": "v1", "kind": "List", "items": objects}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n" if output == "json" else yaml.safe_dump(doc, sort_keys=False))
        return
    if not objects:
        print("No resources found.", file=sys.stderr)
        return
    wide, now = output == "wide", datetime.now(timezone.utc)
    header = ["NAME", "PHASE", "MODEL", "EPOCH", "BEST-VAL-ACC", "AGE"]
    header = (["NAMESPACE"] if with_ns else []) + header + (["METHOD", "WORKERS", "RAYJOB", "MESSAGE"] if wide else [])
    rows = [header] + [_row(obj, wide, with_ns, now) for obj in objects]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        print("   ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=False)) + "   " + r[-1])


# ---- verbs


def _finish(client: FineTuneJobClient, args: argparse.Namespace, name: str, namespace: str | None) -> int:
    job = client.wait(name, args.timeout, namespace=namespace)
    phase = job.status.phase.value if job.status and job.status.phase else "?"
    print(f"finetunejob.finetune.dev/{name} {phase}")
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from finetune_operator import client as c

    # The manifest before the credentials: its errors (exit 2) are there to fix whatever cluster it goes to. Read
    # once (a manifest on stdin can be read only once); send validates the result again, which costs nothing.
    document = c.job_body(args.job, overrides=args.set or ())
    client = _client(args)
    send = client.apply if args.server_side else client.create
    job = send(document, namespace=args.namespace)
    name = job.metadata.name
    if args.output in ("json", "yaml"):
        print_objects([client.get_object(name, job.metadata.namespace)], args.output, single=True)
    else:
        print(f"finetunejob.finetune.dev/{name} {'serverside-applied' if args.server_side else 'created'}")
    if args.follow:
        running = ("Running", "Succeeded", "Failed")
        client.wait(name, args.timeout, running, namespace=job.metadata.namespace)
        try:
            for line in client.logs(name, follow=True, namespace=job.metadata.namespace):
                print(line, flush=True)
        except c.LogsUnavailable as exc:
            print(f"note: {exc}", file=sys.stderr)
    if args.wait or args.follow:
        return _finish(client, args, name, job.metadata.namespace)  # the manifest's namespace when -n is not given
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    client = _client(args)
    objects = [client.get_object(name) for name in args.names]
    print_objects(objects, args.output, single=len(objects) == 1)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    client = _client(args)
    objects = client.list_objects(all_namespaces=args.all_namespaces, label_selector=args.selector, phase=args.phase)
    print_objects(objects, args.output, with_ns=args.all_namespaces)
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.wait(args.name, timeout=args.timeout, for_phases=tuple(args.phases or ("Succeeded", "Failed")))
    phase = job.status.phase.value if job.status and job.status.phase else "?"
    print(f"finetunejob.finetune.dev/{args.name} {phase}")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    for line in client.logs(args.name, follow=args.follow):
        print(line, flush=args.follow)
    return EXIT_OK


def cmd_suspend(args: argparse.Namespace) -> int:
    client = _client(args)
    (client.suspend if args.command == "suspend" else client.resume)(args.name)
    print(f"finetunejob.finetune.dev/{args.name} {'suspended' if args.command == 'suspend' else 'resumed'}")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    client = _client(args)
    client.delete(args.name, wait=args.wait, timeout=args.timeout)
    print(f'finetunejob.finetune.dev "{args.name}" deleted')
    return EXIT_OK


def protection_line(protection: Any) -> str | None:
    """``status.artifacts.protection`` in words: encrypted or not, signed or not, with the key ids."""
    if not isinstance(protection, dict):
        return None
    words = [f"encrypted (key {protection.get('encryptionKeyId')})" if protection.get("encrypted") else "not encrypted"]
    if protection.get("serverSideEncryption"):
        words.append(f"store-encrypted ({protection['serverSideEncryption']}, {protection.get('serverSideKey')})")
    words.append(f"signed (key {protection.get('signingKeyId')})" if protection.get("signed") else "unsigned")
    return ", ".join(words)


def describe(client: FineTuneJobClient, name: str) -> str:
    """``kubectl describe`` for a job: what it is, where it stands, why, what it produced, where its logs are."""
    from finetune_operator import client as c

    obj = client.get_object(name)
    # Every field through ``at``: a field of the wrong type (a string where an object belongs) shows as it is or "-".
    meta, status = mapping_at(obj, "metadata"), mapping_at(obj, "status")
    lines = [f"Name:        {meta.get('name')}", f"Namespace:   {meta.get('namespace')}"]
    lines.append(f"Created:     {meta.get('creationTimestamp')}")
    model = mapping_at(obj, "spec", "model")
    lines.append(f"Model:       {model.get('name')} ({model.get('weights') or model.get('weightsUri') or 'random init'})")
    lines.append(f"Phase:       {status.get('phase') or '-'}")
    lines.append(f"Message:     {status.get('message') or '-'}")
    if progress := mapping_at(status, "progress"):
        epoch, total, stage, percent = (progress.get(k) for k in ("epoch", "totalEpochs", "stage", "percent"))
        shown_percent = f"{percent:g}" if isinstance(percent, (int, float)) else str(percent or 0)
        lines.append(f"Progress:    epoch {epoch}/{total}, {shown_percent}% ({stage})")
    if metrics := mapping_at(status, "metrics"):
        shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        lines.append("Metrics:     " + ", ".join(shown))
    lines.append("Conditions:")
    lines.append(f"  {'TYPE':<13}{'STATUS':<8}{'REASON':<26}MESSAGE")
    conditions = status.get("conditions")
    for cond in conditions if isinstance(conditions, list) else []:
        kind, state, reason, said = (str(at(cond, k) or "") for k in ("type", "status", "reason", "message"))
        lines.append(f"  {kind:<13}{state:<8}{reason:<26}{said}")
    lines.append("Artifacts:")
    artifacts = mapping_at(status, "artifacts")
    for key in ("modelUri", "modelCardUri", "checkpointUri"):
        if artifacts.get(key):
            lines.append(f"  {key}: {artifacts[key]}")
    for fmt, uri in mapping_at(artifacts, "exports").items():
        lines.append(f"  exports.{fmt}: {uri}")
    if (protection := protection_line(artifacts.get("protection"))) is not None:
        lines.append(f"  protection: {protection}")
    if not artifacts:
        lines.append("  (none yet)")
    try:
        source = client.log_source(name)
    except c.ClientError as exc:  # e.g. RBAC that lets this user read jobs but not pods: describe the rest
        source, lines = None, [*lines, f"Logs:        cannot look for the Ray pods: {exc}"]
    if source is not None:
        where = f"{source.kubectl()}, KubeRay's {source.role}"
        lines.append(f"Logs:        finetune logs {name} -n {meta.get('namespace')}  (= {where})")
    elif not lines[-1].startswith("Logs:"):
        lines.append(f"Logs:        {c.logs_gone_reason(obj)}")
    lines.append("Events:")
    events = client.events(name)[-10:]
    lines.append(f"  {'TYPE':<9}{'REASON':<22}{'AGE/TIME':<22}MESSAGE" if events else "  <none>")
    for event in events:
        count = f" (x{event.count})" if event.count > 1 else ""
        lines.append(f"  {event.type:<9}{event.reason:<22}{event.time:<22}{event.message}{count}")
    return "\n".join(lines) + "\n"


def cmd_describe(args: argparse.Namespace) -> int:
    sys.stdout.write(describe(_client(args), args.name))
    return EXIT_OK


# ---- parser


def _common(p: argparse.ArgumentParser, *, output: bool = False) -> None:
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, or the pod's own)")
    p.add_argument("--context", help="kubeconfig context (default: the current one; in a pod: the pod's service account)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    if output:
        p.add_argument("-o", "--output", choices=("table", "wide", "json", "yaml"), default="table", help="output format")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the cluster verbs to the ``finetune`` parser."""
    timeout_help = "how long to wait: seconds, or 30s, 10m, 6h, 1d (default: 24h); exit 3 when it runs out"
    p = sub.add_parser("submit", help="create a FineTuneJob on the cluster", epilog=EXIT_CODES)
    p.add_argument("job", metavar="JOB.yaml", help="one FineTuneJob manifest; - reads stdin")
    p.add_argument("--set", action="append", metavar="PATH=VALUE", help="override a field, e.g. spec.epochs=5")
    p.add_argument("--wait", action="store_true", help="wait until the job ends: exit 0 Succeeded, 1 Failed, 3 timeout")
    p.add_argument("-f", "--follow", action="store_true", help="stream the trainer's output, then wait as --wait")
    p.add_argument("--server-side", action="store_true", help="server-side apply (field manager finetune-client), not create")
    p.add_argument("--timeout", type=duration, default=86400.0, help=timeout_help)
    _common(p, output=True)
    p.set_defaults(func=_run(cmd_submit))

    p = sub.add_parser("get", help="show FineTuneJobs by name")
    p.add_argument("names", nargs="+", metavar="NAME")
    _common(p, output=True)
    p.set_defaults(func=_run(cmd_get))

    p = sub.add_parser("list", help="list FineTuneJobs")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="in every namespace")
    p.add_argument("-l", "--selector", help="label selector, e.g. team=vision")
    p.add_argument("--phase", choices=("Pending", "Provisioning", "Running", "Succeeded", "Failed", "Suspended"))
    _common(p, output=True)
    p.set_defaults(func=_run(cmd_list))

    p = sub.add_parser("describe", help="status, conditions, artifacts, where the logs are, recent Events")
    p.add_argument("name", metavar="NAME")
    _common(p)
    p.set_defaults(func=_run(cmd_describe))

    p = sub.add_parser("wait", help="wait until a job ends (exit 0 Succeeded, 1 Failed, 3 timeout)", epilog=EXIT_CODES)
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--for",
        dest="phases",
        action="append",
        metavar="PHASE",
        choices=PHASES,
        help=f"phase to wait for (repeatable): {', '.join(PHASES)}",
    )
    p.add_argument("--timeout", type=duration, default=86400.0, help=timeout_help)
    _common(p)
    p.set_defaults(func=_run(cmd_wait))

    p = sub.add_parser("logs", help="the trainer's output (from KubeRay's submitter pod, else the Ray head)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming until the trainer ends")
    _common(p)
    p.set_defaults(func=_run(cmd_logs))

    for verb, text in (("suspend", "suspend a job (its Ray cluster goes)"), ("resume", "resume a suspended job")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("name", metavar="NAME")
        _common(p)
        p.set_defaults(func=_run(cmd_suspend))

    p = sub.add_parser("delete", help="delete a job (its RayJob and other children go with it)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--wait", action="store_true", help="until it is gone")
    p.add_argument("--timeout", type=duration, default=300.0, help="with --wait (default: 5m)")
    _common(p)
    p.set_defaults(func=_run(cmd_delete))
