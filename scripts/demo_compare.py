"""The demo's baseline and verdict: the transfer job trained from scratch on the same budget, then both
validation accuracies side by side.

    python scripts/demo_compare.py [--transfer manifests/examples/digits-transfer.yaml] [--output runs]

Derives the scratch job from the transfer YAML (same data, epochs, batch size, seed; `weightsUri`
dropped, method `full` at the source job's from-scratch learning rate, no backbone multiplier), writes it
to `<output>/digits-scratch.yaml`, runs it with `finetune run` like any job, and prints the comparison
from both runs' `metrics.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def final_accuracy(run_dir: Path) -> tuple[float, float]:
    """(last epoch's, best) validation accuracy from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows[-1]["valAccuracy"], max(r["valAccuracy"] for r in rows)


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

    t_last, t_best = final_accuracy(output / transfer["metadata"]["name"])
    s_last, s_best = final_accuracy(output / scratch["metadata"]["name"])
    spec = transfer["spec"]
    per_class = spec["dataset"].get("maxPerClass")
    epochs = spec["hyperparameters"]["epochs"]
    print()
    print(f"digits {spec['dataset'].get('classes')}, {per_class} training images per class, {epochs} epochs each:")
    print(f"  {'':<34} {'final val acc':>13} {'best':>8}")
    print(f"  {'transfer (digits-source → LP-FT)':<34} {t_last:>13.1%} {t_best:>8.1%}")
    print(f"  {'from scratch (same budget)':<34} {s_last:>13.1%} {s_best:>8.1%}")
    verdict = "transfer wins" if t_last > s_last else "transfer does NOT win"
    print(f"  {verdict} by {100 * (t_last - s_last):+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
