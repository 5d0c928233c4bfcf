#!/usr/bin/env bash
# The README's first command: set up .venv (if missing) and run the CPU quickstart end to end.
# Today it runs the machine self-check (tiny Qwen policy + two frozen teachers, AlignDistil loss,
# TP1 vs TP2 vs TP4 on spawned gloo ranks). It grows into the full pipeline (issue 9).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$repo/scripts/setup_env.sh")
cd "$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$venv/bin/python" -m megatron_aligndistil.selfcheck "$@"
