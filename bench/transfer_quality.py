"""Transfer quality of the default recipe, measured through `finetune run` only (issue 11).

    python bench/transfer_quality.py [--families resnet18,mobilenet_v3_small] [--per-class 5,20] [--seeds 0,1,2]
                                     [--output runs/transfer-quality]

For each model family: a source job trains the model from scratch on the digits 0-4 (12 epochs, as
manifests/examples/digits-source.yaml); then target jobs fine-tune its model.pt on the unseen digits 5-9
with 5 or 20 labelled images per class for 15 epochs, `augmentation: light` (as the docs advise for
digits), and nothing else: no strategy, optimiser, learning rate or batch size, so the defaults decide.
Every job runs as a user would run it, `finetune run JOB.yaml`, in its own process. Prints the final
validation accuracy of each target job and the mean ± standard deviation over the seeds, as markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def source_job(family: str) -> dict[str, Any]:
    """manifests/examples/digits-source.yaml with ``family`` as the model."""
    job: dict[str, Any] = yaml.safe_load((REPO / "manifests/examples/digits-source.yaml").read_text())
    job["metadata"]["name"] = f"source-{family.replace('_', '-')}"
    job["spec"]["model"]["name"] = family
    return job


def target_job(family: str, weights: Path, per_class: int, seed: int) -> dict[str, Any]:
    """The target task with defaults only: what the issue measures."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"target-{family.replace('_', '-')}-{per_class}-{seed}"},
        "spec": {
            "model": {"name": family, "weightsUri": str(weights)},
            "dataset": {
                "format": "digits",
                "classes": [5, 6, 7, 8, 9],
                "maxPerClass": per_class,
                "imageSize": 32,
                "augmentation": "light",
                "loaderWorkers": 0,
            },
            "hyperparameters": {"epochs": 15, "seed": seed},
            "resources": {"workers": 1, "cpusPerWorker": 2},
            "output": {"uri": "unused"},
        },
    }


def run(job: dict[str, Any], output: Path, reuse: bool = False) -> list[dict[str, Any]]:
    """``finetune run`` on ``job`` (written next to its run directory); its metrics.jsonl rows. ``reuse``: a
    finished run of the same name (its model.pt exists) is read, not run again."""
    name = job["metadata"]["name"]
    if reuse and (output / name / "model.pt").exists():
        return [json.loads(line) for line in (output / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    manifest = output / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(job, sort_keys=False))
    log = output / f"{name}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(
            [sys.executable, "-m", "finetune_operator.cli", "run", str(manifest), "--output", str(output)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if code != 0:
        raise SystemExit(f"{name}: finetune run exited {code}; see {log}")
    rows = [json.loads(line) for line in (output / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    print(f"  {name}: val accuracy {rows[-1]['valAccuracy']:.3f} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="resnet18,mobilenet_v3_small")
    parser.add_argument("--per-class", default="5,20")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", default=str(REPO / "runs/transfer-quality"))
    parser.add_argument("--reuse-sources", action="store_true", help="keep source jobs already finished in --output")
    args = parser.parse_args()
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_class = [int(p) for p in args.per_class.split(",")]

    table: list[str] = []
    for family in args.families.split(","):
        source = source_job(family)
        source_rows = run(source, output, reuse=args.reuse_sources)
        weights = output / source["metadata"]["name"] / "model.pt"
        for n in per_class:
            finals: list[float] = []
            switch: list[str] = []
            for seed in seeds:
                rows = run(target_job(family, weights, n, seed), output)
                finals.append(rows[-1]["valAccuracy"])
                probe = [r for r in rows if r["stage"] == "probe"]
                tuned = [r for r in rows if r["stage"] == "fine-tune"]
                if probe and tuned:
                    switch.append(f"{probe[-1]['valAccuracy']:.2f}→{tuned[0]['valAccuracy']:.2f}")
            spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
            table.append(
                f"| {family} | {source_rows[-1]['valAccuracy']:.3f} | {n} | {statistics.mean(finals):.3f} ± {spread:.3f} "
                f"| {', '.join(f'{a:.3f}' for a in finals)} | {', '.join(switch) or '-'} |"
            )
    print(
        "| model | source val acc (0-4) | labels per class | target val acc, mean ± sd | per seed "
        "| probe → first fine-tune epoch |"
    )
    print("|---|---:|---:|---:|---|---|")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
