#!/usr/bin/env bash
# The quick-start demo, offline on a laptop's CPU in a few minutes: train resnet18 from scratch on the
# digits 0-4, transfer its backbone to the unseen digits 5-9 with ten labelled images per class, and put
# the result next to the same job trained from scratch on the same budget.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

# A fresh start: a job launched again resumes from its checkpoints, which a demo should not.
rm -rf runs/digits-source runs/digits-transfer runs/digits-transfer-scratch

echo "== 1/3 finetune run manifests/examples/digits-source.yaml   (resnet18 from scratch on digits 0-4)"
finetune run manifests/examples/digits-source.yaml
echo
echo "== 2/3 finetune run manifests/examples/digits-transfer.yaml (its backbone, few-shot on digits 5-9)"
finetune run manifests/examples/digits-transfer.yaml
echo
echo "== 3/3 the transfer job again, from scratch, same data and epochs"
python scripts/demo_compare.py
echo
echo "artifacts: runs/<job>/ (model.pt, model.json, metrics.jsonl, training_curves.png, confusion_matrix.png)"
