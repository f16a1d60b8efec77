#!/usr/bin/env bash
# The whole test run, exactly as CI runs it: set-up, the static checks (scripts/lint.sh), then every test tier
# that can run on this machine (unit, integration, slow Ray tests; e2e skips unless --kube-config is passed through).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the fast inner loop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

scripts/lint.sh
if [ "$#" -gt 0 ]; then
  echo "== pytest $*"
  exec python -m pytest "$@"
fi
# Two phases on the machine's cores: the tests that start no Ray spread over the cores with pytest-xdist
# (each worker its own process, emulator and ports); the Ray and training tests one at a time, since each
# Ray run takes the cores it is given and two at once only slow each other down.
echo "== pytest: everything but the slow tier, on $(python -c 'import os; print(os.cpu_count())') cores"
python -m pytest -m "not slow" -n auto --durations=15
echo "== pytest: the slow tier (Ray, training), one test at a time"
python -m pytest -m slow --durations=15
