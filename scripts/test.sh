#!/usr/bin/env bash
# The whole test run, exactly as CI runs it: set-up, lint, types, import contracts, then every test tier
# that can run on this machine (unit, slow Ray tests; e2e skips unless --kube-config is passed through).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the fast inner loop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff";          ruff check . && ruff format --check .
echo "== mypy --strict"; mypy operator/finetune_operator trainer/finetune_trainer
echo "== import-linter"; lint-imports --no-cache
echo "== pytest"
python -m pytest "$@"
