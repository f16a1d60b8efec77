#!/usr/bin/env bash
# The whole test run, exactly as CI runs it: set-up, the static checks (scripts/lint.sh), then every test tier
# that can run on this machine (unit, integration, slow Ray tests; e2e skips unless --kube-config is passed through).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the fast inner loop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

scripts/lint.sh
echo "== pytest"
python -m pytest "$@"
