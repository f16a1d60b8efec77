"""`finetune verify DIR|URI`: check an artifact directory before anyone serves it, and say what was checked.

Prints one line per check (the signature, each file's sha256 and decryption) and ``verified`` at the
end; a refusal is one line on stderr naming the file, exit status 1 (2 for a usage error). No torch
needed: a serving system's admission step can run it on the artifacts alone (docs/platform.md).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from finetune_trainer import storage
from finetune_trainer.errors import ArtifactError, TrainerError

__all__ = ["verify_command"]


def verify_command(args: argparse.Namespace | Any) -> int:
    from finetune_trainer.verify import verify_artifacts

    try:
        verified = verify_artifacts(args.model, require_signed=True if args.require_signed else None)
    except (ArtifactError, TrainerError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in verified.checks:
        print(line)
    protection = verified.card.protection
    encrypted = "encrypted" if protection is not None and protection.encrypted else "not encrypted"
    signed = f"signed by {verified.signed_by}" if verified.signed_by else "unsigned"
    print(f"verified: {args.model} ({len(verified.card.files)} files, {encrypted}, {signed})")
    return 0
