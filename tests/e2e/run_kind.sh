#!/usr/bin/env bash
# Runs the e2e tier against a local kind cluster. Needs docker, kind and network access to pull KubeRay.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-finetune-e2e}
KUBECONFIG_FILE=${KUBECONFIG_FILE:-$HOME/.kube/config}
kubectl config use-context "kind-$CLUSTER"
for target in operator trainer; do
  docker build --target "$target" -t "ghcr.io/finetune-operator/$target:e2e" .
  kind load docker-image --name "$CLUSTER" "ghcr.io/finetune-operator/$target:e2e"
done
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator --version 1.7.0 --wait
scripts/setup.sh
.venv/bin/python -m pytest -m e2e --kube-config "$KUBECONFIG_FILE" tests/e2e -v
