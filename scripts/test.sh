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
# Two phases on the machine's cores: the unit and integration tiers (no Ray) spread over the cores with
# pytest-xdist, each worker its own process, emulator and ports; then the slow tier (Ray, training) and the
# e2e tier one test at a time, since each Ray run takes the cores it is given and two at once only slow
# each other down.
# Both phases run whatever the first one gives, so one run shows every failure; the script exits with the
# worse of their two statuses (pytest's: 1 tests failed, 2 interrupted, 3 internal error, ...).
status=0
# Two xdist workers a core: many of these tests wait (on sockets, timeouts, an operator's restart, subprocesses), so one
# a core left the cores a third idle (2 cores: 8:18 with 2 workers, 6:47 with 4, same tests passing). At most one per
# 4 GiB of memory: a worker holds up to 3 GiB.
workers=$(python -c 'import os; print(max(1, min(2 * len(os.sched_getaffinity(0)), os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (4 << 30))))')
echo "== pytest: unit and integration tiers, $workers workers"
python -m pytest tests/unit tests/integration -n "$workers" --durations=15 || status=$?
echo "== pytest: slow and e2e tiers, one test at a time"
python -m pytest tests/slow tests/e2e --durations=15 || { rc=$?; if [ "$rc" -gt "$status" ]; then status=$rc; fi; }
exit "$status"
