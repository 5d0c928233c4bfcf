#!/usr/bin/env bash
# The first-GPU check (docs/gpu_check.md): tools/gpu_check.py with the right Python.
#
#   bash scripts/gpu_check.sh --out DIR                  # one GPU: at most 8 minutes
#   bash scripts/gpu_check.sh --cpu-rehearsal --out DIR  # tiny shapes on CPU (CI runs this)
#
# Python: $PYTHON, else this checkout's .venv (scripts/setup_env.sh), else python3 (a GPU machine
# with its own torch). Wheels carried to a machine without network go in wheels/ at the repository
# root; they are installed first into .gpu-check-deps/, without index or dependencies
# (docs/gpu_check.md says which and how to download them).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEPS=""
if compgen -G "wheels/*.whl" > /dev/null; then  # into a folder of its own: the machine's site-packages stay as they are
    DEPS="$PWD/.gpu-check-deps"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --upgrade --target "$DEPS" wheels/*.whl
fi
export PYTHONPATH="$PWD${DEPS:+:$DEPS}${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" tools/gpu_check.py "$@"
