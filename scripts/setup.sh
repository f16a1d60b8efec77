#!/usr/bin/env bash
# Creates .venv and installs the project with every extra (operator, trainer, dev), plus the helm and
# kubectl binaries the tests use. Idempotent: re-running with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup: Python 3.10+ is required (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

stamp=.venv/.finetune-installed
want=$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt scripts/install_k8s_tools.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing finetune-operator and its dependencies into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  # torch/torchvision are pinned in pyproject.toml (trainer extra); pip finds 2.14.1/0.29.1 locally when cached.
  .venv/bin/python -m pip install -q -e '.[operator,trainer,dev]' -c scripts/constraints.txt
  .venv/bin/python scripts/install_k8s_tools.py
  echo "$want" > "$stamp"
fi
