#!/usr/bin/env bash
# The static checks, in one place: `make lint`, `scripts/test.sh` and the pre-commit hooks all run these.
# Assumes the set-up has run (scripts/setup.sh); uses the tools in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
# One command a line: under `set -e` a failure on the left of `&&` would not stop the script.
echo "== ruff";            "$bin/ruff" check .
echo "== ruff format";     "$bin/ruff" format --check .
echo "== mypy --strict";   "$bin/mypy" operator/finetune_operator trainer/finetune_trainer
echo "== import-linter";   "$bin/lint-imports" --no-cache
echo "== CRD drift";       "$bin/python" scripts/sync_crd.py --check
