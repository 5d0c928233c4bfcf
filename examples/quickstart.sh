#!/usr/bin/env bash
# The README's first command: set up .venv (if missing) and run the whole AlignDistil pipeline on
# this CPU machine (tiny models, synthetic data, no download), in runs/quickstart/.
# Re-running skips finished stages; pass --run-dir DIR for another run, --short for a smoke run.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$repo/scripts/setup_env.sh")
cd "$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$venv/bin/python" -m megatron_aligndistil.quickstart "$@"
