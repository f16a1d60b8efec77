"""The ``finetune`` command: validate, explain and render jobs, list models, run jobs locally; the cluster verbs
(submit, get, list, describe, wait, logs, suspend, resume, delete) live in ``cli_cluster``.

The API commands need only pydantic. ``run`` and ``predict`` import the trainer (torch, Ray) on
demand, so the operator image, which has no torch, still answers every other subcommand; this
module is the one place the two packages meet (allowed explicitly in the import-linter contract).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from finetune_operator import __version__, cli_cluster
from finetune_operator.api import catalog
from finetune_operator.api.crd import render_crd_yaml
from finetune_operator.api.explain import ACCEPTED_PATHS, UnknownFieldError, explain
from finetune_operator.api.fields import quote
from finetune_operator.api.validate import iter_documents, read_manifest
from finetune_operator.api.versions import KIND


def cmd_validate(args: argparse.Namespace) -> int:
    # Imported here, like cmd_render: the operator's rules are pydantic-only, but the other subcommands need none of them.
    from finetune_operator.admission import cluster_problems, verdict
    from finetune_operator.settings import OperatorSettings, SettingsError

    try:
        settings = OperatorSettings.from_env() if args.cluster else None
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for path in args.files:
        try:
            data = read_manifest(path)
        except OSError as exc:
            print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
            failed += 1
            continue
        for result in iter_documents(data, path):
            # --cluster: the operator's verdict, the very lines its admission webhook answers at `kubectl apply`.
            errors = list(result.errors) if settings is None else verdict(result, settings)
            if errors:
                failed += 1
                print(f"{result.label}: invalid ({len(errors)} error{'s' if len(errors) > 1 else ''})")
                for line in errors:
                    print(f"  {line}")
            elif not args.quiet:
                local = [] if settings is not None or result.job is None else cluster_problems(result.job.spec)
                notes = "".join(f"{p.note}; " for p in local)
                print(f"{result.label}: valid" + (f" (local only: {notes}see --cluster)" if local else ""))
    return 1 if failed else 0


def cmd_render(args: argparse.Namespace) -> int:
    # Imported here: the other subcommands must not pay for (or need) the operator's modules.
    from finetune_operator.admission import AdmissionError
    from finetune_operator.api.validate import ManifestError, decode_manifest
    from finetune_operator.render import render_objects, to_json, to_yaml
    from finetune_operator.settings import OperatorSettings, SettingsError

    try:
        settings = OperatorSettings.from_env()
        text = decode_manifest(read_manifest(args.job), args.job)
        objects = render_objects(text, args.job, settings, namespace=args.namespace)
    except OSError as exc:
        print(f"{args.job}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ManifestError, AdmissionError) as exc:
        print(
            f"{getattr(exc, 'label', args.job)}: invalid ({len(exc.lines)} error{'s' if len(exc.lines) > 1 else ''})",
            file=sys.stderr,
        )
        for line in exc.lines:
            print(f"  {line}", file=sys.stderr)
        return 1
    sys.stdout.write(to_json(objects) if args.output == "json" else to_yaml(objects))
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    sys.stdout.write(render_crd_yaml())
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    # No FIELD.PATH explains the whole resource; an empty one (a shell variable that was unset) is a mistake, as kubectl
    # explain says of an empty type, not a way to ask for the whole.
    if args.field is not None and not args.field.strip():
        print(
            f"error: FIELD.PATH {quote(args.field)} names no field; {ACCEPTED_PATHS}, or no FIELD.PATH for the whole {KIND}",
            file=sys.stderr,
        )
        return 1
    try:
        sys.stdout.write(explain(args.field or ""))
    except UnknownFieldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cmd_models(args: argparse.Namespace) -> int:
    models = list(catalog.load_catalog().values())
    if args.family:
        families = sorted({m.family for m in models})
        models = [m for m in models if args.family.lower() in (m.family.lower(), m.family.lower().replace("_", ""))]
        if not models:
            print(f"error: --family {args.family!r} matches no model; families: {', '.join(families)}", file=sys.stderr)
            return 1
    if args.json:
        print(
            json.dumps([{"name": m.name, "family": m.family, "weights": [w.name for w in m.weights]} for m in models], indent=2)
        )
        return 0
    header = f"{'MODEL':<22} {'FAMILY':<18} {'WEIGHTS':<44} {'PARAMS(M)':>9} {'GFLOPS':>7} {'ACC@1':>6} {'INPUT':>5}"
    print(header)
    for m in models:
        rows = m.weights or ()
        if not rows:
            print(f"{m.name:<22} {m.family:<18} {'(none)':<44}")
        for i, w in enumerate(rows):
            name = w.name + (" *" if w.default else "")
            params = None if w.num_params is None else w.num_params / 1e6
            crop = w.crop_size[0] if w.crop_size else None
            print(
                f"{(m.name if i == 0 else ''):<22} {(m.family if i == 0 else ''):<18} {name:<44} "
                f"{_fmt(params, '.1f'):>9} {_fmt(w.gflops, '.2f'):>7} {_fmt(w.acc1, '.2f'):>6} {_fmt(crop, 'd'):>5}"
            )
    print(
        f"\n{len(models)} models; * = DEFAULT weights; ACC@1 on ImageNet-1K (torchvision {catalog.catalog_torchvision_version()})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Transfer learning on Kubernetes with FineTuneJobs.")
    parser.add_argument("--version", action="version", version=f"finetune-operator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="validate FineTuneJob manifests (exit 1 if any is invalid)")
    p.add_argument("files", nargs="+", metavar="FILE", help="YAML files, several documents each allowed; - reads stdin")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the invalid documents")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="also apply the operator's rules (outputs the Ray pods share, no relative paths, its FINETUNE_OPERATOR_* limits)",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "render",
        help="print the RayJob, ConfigMap, ServiceAccount, Role, RoleBinding and NetworkPolicy the operator would create",
    )
    p.add_argument("job", metavar="JOB.yaml", help="one FineTuneJob manifest; - reads stdin")
    p.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="output format (default: yaml)")
    p.add_argument("-n", "--namespace", help="namespace when the manifest names none (default: default)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("explain", help="document a field, e.g. spec.hyperparameters.learningRate")
    p.add_argument("field", nargs="?", metavar="FIELD.PATH")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("models", help="list the torchvision models and weights a job can name")
    p.add_argument("--family", help="only this family, e.g. resnet, efficientnet, vision_transformer")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    # The cluster verbs (submit, get, list, describe, wait, logs, suspend, resume, delete): kubernetes loads when one runs.
    cli_cluster.register(sub)
    _add_trainer_commands(sub)
    return parser


def _add_trainer_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Subcommands that need the trainer extra; registered here so that --help lists them everywhere."""
    try:
        from finetune_trainer import cli as trainer_cli
    except ImportError:
        return
    trainer_cli.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:  # every verb: the cluster ones say more themselves (cli_cluster._run)
        print("error: interrupted", file=sys.stderr)
        return cli_cluster.EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
