#!/usr/bin/env bash
# The quick-start demo: sets everything up, then shows the FineTuneJob API at work — validates the
# example jobs, shows how a mistake is reported, explains a field and prints the CRD.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== finetune validate manifests/examples/*.yaml"
finetune validate manifests/examples/*.yaml
echo
echo "== a job with mistakes is rejected, field by field"
sed -e 's/name: resnet18/name: resnet5/' -e 's/learningRate: 0.003/learningRate: -1/' manifests/examples/digits-cpu.yaml \
  | finetune validate - || true
echo
echo "== finetune explain spec.strategy.method"
finetune explain spec.strategy.method
echo "== finetune crd | head -40"
finetune crd | head -40
