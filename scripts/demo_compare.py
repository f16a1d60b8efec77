"""The demo's baseline and verdict: the transfer job trained from scratch on the same budget, then the
validation accuracies of the models both ship side by side.

    python scripts/demo_compare.py [--transfer manifests/examples/digits-transfer.yaml] [--output runs]

Derives the scratch job from the transfer YAML (same data, epochs, batch size, seed; `weightsUri`
dropped, method `full` at the source job's from-scratch learning rate, no backbone multiplier), writes it
to `<output>/digits-scratch.yaml`, runs it with `finetune run` like any job, and compares the models both
runs ship (`model.pt`, the epoch each model card names in `metrics.shipped`), with each last epoch beside.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import yaml

REPO = Path(__file__).resolve().parent.parent


def scratch_manifest(transfer: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The transfer job without its head start: random weights, every parameter trained at the rate the
    source job used from scratch, the same epochs, data and seed."""
    job: dict[str, Any] = json.loads(json.dumps(transfer))
    job["metadata"]["name"] = f"{transfer['metadata']['name']}-scratch"
    job["spec"]["model"].pop("weightsUri", None)
    job["spec"]["strategy"] = {"method": "full"}
    hp = job["spec"]["hyperparameters"]
    hp.pop("backboneLrMultiplier", None)
    hp.pop("backboneLearningRate", None)
    hp["learningRate"] = source["spec"]["hyperparameters"].get("learningRate", hp.get("learningRate"))
    return job


class Outcome(NamedTuple):
    """One run's validation accuracy: of the model it ships (``model.pt``, the epoch its card names in
    ``metrics.shipped``) and of its last epoch, which a later epoch that validated worse makes lower."""

    shipped: float
    shipped_epoch: int
    last: float
    last_epoch: int


def outcome(run_dir: Path) -> Outcome:
    """A finished run's Outcome, from its model card (what ships) and its metrics.jsonl (the last epoch)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    card = json.loads((run_dir / "model.json").read_text())
    # A card older than metrics.shipped shipped the last epoch's weights.
    shipped = card.get("metrics", {}).get("shipped") or rows[-1]
    return Outcome(shipped["valAccuracy"], shipped["epoch"], rows[-1]["valAccuracy"], rows[-1]["epoch"])


def comparison(transfer: Outcome, scratch: Outcome) -> list[str]:
    """The table and the verdict, which compares the shipped models: the ones a user would deploy."""
    lines = [f"  {'':<34} {'model.pt val acc':>16} {'(epoch)':>8} {'last epoch':>11}"]
    for label, o in (("transfer (digits-source → LP-FT)", transfer), ("from scratch (same budget)", scratch)):
        lines.append(f"  {label:<34} {o.shipped:>16.1%} {f'({o.shipped_epoch})':>8} {o.last:>11.1%}")
    verdict = "transfer wins" if transfer.shipped > scratch.shipped else "transfer does NOT win"
    lines.append(f"  {verdict} by {100 * (transfer.shipped - scratch.shipped):+.1f} points (shipped model against shipped model)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transfer", default=str(REPO / "manifests/examples/digits-transfer.yaml"))
    parser.add_argument("--source", default=str(REPO / "manifests/examples/digits-source.yaml"))
    parser.add_argument("--output", default=str(REPO / "runs"))
    args = parser.parse_args()

    transfer = yaml.safe_load(Path(args.transfer).read_text())
    source = yaml.safe_load(Path(args.source).read_text())
    scratch = scratch_manifest(transfer, source)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    scratch_yaml = output / f"{scratch['metadata']['name']}.yaml"
    scratch_yaml.write_text(yaml.safe_dump(scratch, sort_keys=False))

    print(f"== finetune run {scratch_yaml.relative_to(REPO) if scratch_yaml.is_relative_to(REPO) else scratch_yaml}", flush=True)
    code = subprocess.call(["finetune", "run", str(scratch_yaml), "--output", str(output)], cwd=REPO)
    if code:
        return code

    transfer_outcome = outcome(output / transfer["metadata"]["name"])
    scratch_outcome = outcome(output / scratch["metadata"]["name"])
    spec = transfer["spec"]
    per_class = spec["dataset"].get("maxPerClass")
    epochs = spec["hyperparameters"]["epochs"]
    print()
    print(f"digits {spec['dataset'].get('classes')}, {per_class} training images per class, {epochs} epochs each:")
    print("\n".join(comparison(transfer_outcome, scratch_outcome)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
