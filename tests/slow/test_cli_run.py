"""`finetune run JOB.yaml` as a new user runs it: a subprocess that starts its own Ray, trains, writes the
artifacts and a JSON status file, and prints a one-line summary; a bad weights file fails in one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
import torchvision
import yaml

pytestmark = pytest.mark.slow

JOB = """
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: tiny}
spec:
  model: {name: resnet18}
  dataset: {format: digits, classes: [0, 1, 2], maxPerClass: 10, imageSize: 32, augmentation: none, loaderWorkers: 0}
  strategy: {method: lp-ft, probeEpochs: 1}
  hyperparameters: {epochs: 2, batchSize: 8}
  resources: {workers: 1, cpusPerWorker: 1}
  output: {uri: runs, exports: [state_dict, torchscript, safetensors]}
"""


def finetune(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=540, env=env
    )


def test_finetune_run_trains_a_job_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(JOB)

    # A Ray cluster named in the environment (or started by `ray start` earlier) is not joined: local mode is local.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    out = finetune("run", "job.yaml", "--json-status", "status.json", cwd=tmp_path, env=env)

    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # No traceback, ours or Ray's: a warning Ray logs with one ("Failed to send resource request ... safe to ignore",
    # on a busy machine) is one line (ray_compat.AnnouncedFixedScalingPolicy), and this job makes no such request.
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("tiny: model.pt holds epoch ") and f"artifacts in {tmp_path}/runs/tiny" in summary
    # The console sink's per-epoch line, once (Ray forwards worker output to the driver's stdout or stderr).
    assert (out.stdout + out.stderr).count("epoch 2/2  fine-tune") == 1
    run_dir = tmp_path / "runs" / "tiny"
    for name in ("model.pt", "model.torchscript.pt", "model.json", "metrics.jsonl", "training_curves.png"):
        assert (run_dir / name).is_file(), name
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    assert status["progress"]["epoch"] == 2
    assert status["artifacts"]["modelUri"].endswith("runs/tiny/model.pt")
    check_readme_card(run_dir)
    # model.safetensors serves `finetune predict` like model.pt does.
    digit = tmp_path / "digit.png"
    PIL.Image.new("L", (32, 32), 128).save(digit)
    same = [
        finetune("predict", "--model", str(run_dir), "--format", fmt, str(digit), cwd=tmp_path)
        for fmt in ("state_dict", "safetensors")
    ]
    assert [p.returncode for p in same] == [0, 0], same[1].stderr
    assert same[0].stdout == same[1].stdout


def check_readme_card(run_dir: Path) -> None:
    """README.md of a real run: front matter, the classes' table from the final evaluation, the data counts,
    the confusion matrix, and its entry in model.json's file list (issue 15 signs that list)."""
    card = json.loads((run_dir / "model.json").read_text())
    text = (run_dir / "README.md").read_text()
    assert card["files"]["README.md"]["bytes"] == len(text.encode())
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["model-index"][0]["name"] == "tiny"
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(card["evaluation"]["accuracy"], abs=1e-5)
    data = card["data"]
    # maxPerClass caps the training images (3 classes × 10); the validation split keeps its own.
    assert data["trainImages"] == 30 and data["validationImages"] == card["evaluation"]["numSamples"] > 0
    assert f"| train | {data['trainImages']} |" in body and f"| validation | {data['validationImages']} |" in body
    for row in card["evaluation"]["classes"]:
        assert f"| {row['name']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |" in body
    assert "![Confusion matrix](confusion_matrix.png)" in body and (run_dir / "confusion_matrix.png").is_file()
    assert card["recipe"]["batchSize"] == 8 and card["recipe"]["strategy"] == "lp-ft"


def test_finetune_run_reports_weights_of_another_architecture(tmp_path: Path) -> None:
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), tmp_path / "other.pt")
    (tmp_path / "job.yaml").write_text(JOB.replace("model: {name: resnet18}", "model: {name: resnet18, weightsUri: other.pt}"))

    out = finetune("run", "job.yaml", cwd=tmp_path)

    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: weights_uri {tmp_path}/other.pt does not fit resnet18 (another architecture?)")
    # Nowhere a traceback: not from the driver, and not from the worker (Ray Train logs one for whatever the
    # training function raises; a user error is one line, printed once, last, after Ray has stopped).
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert sum("does not fit resnet18" in line for line in out.stderr.splitlines()) == 1, out.stderr[-3000:]


def test_a_user_error_met_while_decoding_is_one_line_not_ray_datas_tracebacks(tmp_path: Path) -> None:
    """Every training image undecodable on the streaming path: the decode task meets the user error, and Ray Data
    would print its tracebacks (several, with "please open an issue on the Ray project") if it were raised there."""
    for name in ("circle", "square"):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for i in range(20):
            (folder / f"{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing after the magic")
    streamed = "dataset: {format: imagefolder, trainUri: data, ingest: streaming, imageSize: 16, augmentation: none}"
    job = re.sub(r"dataset: \{[^}]*\}", streamed, JOB).replace(
        "strategy: {method: lp-ft, probeEpochs: 1}", "strategy: {method: full}"
    )
    (tmp_path / "job.yaml").write_text(job)

    out = finetune("run", "job.yaml", cwd=tmp_path)

    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: dataset: none of the "), out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    # Once, as the run's error: not from Ray Data, Ray Train or the progress display.
    assert sum("images of a batch can be decoded" in line for line in out.stderr.splitlines()) == 1, out.stderr[-3000:]
