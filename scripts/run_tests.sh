#!/usr/bin/env bash
# The README's test command: sets up .venv if needed, then runs the whole pytest suite in it.
# Extra arguments go to pytest (e.g. scripts/run_tests.sh -k loss -x).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$repo/scripts/setup_env.sh")
cd "$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$venv/bin/python" -m pytest -q tests "$@"
