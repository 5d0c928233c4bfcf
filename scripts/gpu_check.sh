#!/usr/bin/env bash
# The first-GPU check (docs/gpu_check.md): tools/gpu_check.py with the right Python.
#
#   bash scripts/gpu_check.sh --out DIR                  # one GPU: at most 8 minutes
#   bash scripts/gpu_check.sh --cpu-rehearsal --out DIR  # tiny shapes on CPU (CI runs this)
#
# Python: $PYTHON, else this checkout's .venv (scripts/setup_env.sh), else python3 (a GPU machine
# with its own torch). Wheels carried to a machine without network go in wheels/ beside this
# repository's root and are installed first, without index or dependencies (docs/gpu_check.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if compgen -G "wheels/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links wheels wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" tools/gpu_check.py "$@"
