"""The trainer's subcommands of `finetune`: `run` (local mode), `predict` and `verify`.

Registered by `finetune_operator.cli`; this module imports nothing heavy at import time so that
`finetune --help` stays instant and works in the operator image, which has no torch or Ray.
"""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from finetune_trainer.local import run_command

    return run_command(args)


def _predict(args: argparse.Namespace) -> int:
    from finetune_trainer.predict import predict_command

    return predict_command(args)


def _verify(args: argparse.Namespace) -> int:
    from finetune_trainer.verify_cli import verify_command

    return verify_command(args)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run a FineTuneJob on this machine (embedded local Ray)")
    p.add_argument("job", metavar="JOB.yaml", help="the FineTuneJob manifest")
    p.add_argument("--workers", type=int, help="override spec.resources.workers")
    p.add_argument("--output", metavar="DIR", help="override spec.output.uri")
    p.add_argument("--json-status", metavar="FILE", help="also write progress as JSON to FILE")
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="join a running Ray (HOST:PORT, [IPv6]:PORT, ray://HOST[:PORT], or auto: the Ray named by RAY_ADDRESS, "
        "else the one started on this machine) instead of starting one: saves Ray's start-up; local: an embedded Ray; "
        "default FINETUNE_RAY_ADDRESS, else an embedded Ray (RAY_ADDRESS is followed only with auto)",
    )
    p.set_defaults(func=_run)

    p = sub.add_parser("predict", help="classify images with a fine-tuned model's artifact directory")
    p.add_argument("--model", required=True, metavar="DIR", help="artifact directory holding model.json and model.pt")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--require-signed", action="store_true", help="refuse an unsigned model (as FINETUNE_REQUIRE_SIGNED=true)")
    p.add_argument(
        "--format",
        choices=["state_dict", "safetensors"],
        default="state_dict",
        help="weights to load: model.pt (state_dict) or model.safetensors (needs exports: [safetensors])",
    )
    p.set_defaults(func=_predict)

    p = sub.add_parser("verify", help="check an artifact directory: signature, sha256 of every file, decryption")
    p.add_argument("model", metavar="DIR|URI", help="artifact directory holding model.json")
    p.add_argument("--require-signed", action="store_true", help="refuse an unsigned card (as FINETUNE_REQUIRE_SIGNED=true)")
    p.set_defaults(func=_verify)
