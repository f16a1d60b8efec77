"""``finetune render``: the objects the operator would create for a FineTuneJob manifest, as YAML or JSON.

Uses the operator's own pure builder (``rayjob.build_children``) and settings (``FINETUNE_OPERATOR_*``),
so a GitOps review or a dry run shows exactly what a live operator applies. A manifest read from disk has
no uid, so the output carries no ownerReferences (the operator adds them; they need the live object's uid).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from finetune_operator.admission import admit
from finetune_operator.api.validate import load_job
from finetune_operator.rayjob import build_children
from finetune_operator.settings import OperatorSettings

DEFAULT_NAMESPACE = "default"
HEADER = (
    "# Rendered by `finetune render`: what finetune-operator creates for FineTuneJob {ns}/{name}.\n"
    "# The operator also sets ownerReferences to the FineTuneJob (they need its uid), so deleting the job deletes these.\n"
)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the trainer.json) as literal blocks, so they read as the file they are."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def render_objects(text: str, source: str, settings: OperatorSettings, namespace: str | None = None) -> list[dict[str, Any]]:
    """Children of the one FineTuneJob in ``text``; raises ManifestError or AdmissionError when it is invalid."""
    job = load_job(text, source)
    job.metadata.namespace = job.metadata.namespace or namespace or DEFAULT_NAMESPACE
    return build_children(admit(job, settings), settings).all()


def to_yaml(objects: list[dict[str, Any]]) -> str:
    meta: dict[str, Any] = objects[-1]["metadata"] if objects else {}
    header = HEADER.format(ns=meta.get("namespace", "?"), name=(meta.get("labels") or {}).get("finetune.dev/job", "?"))
    docs = yaml.dump_all(objects, Dumper=_BlockDumper, sort_keys=False, explicit_start=True, width=120)
    return header + docs


def to_json(objects: list[dict[str, Any]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2) + "\n"
