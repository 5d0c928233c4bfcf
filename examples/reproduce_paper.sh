#!/usr/bin/env bash
# The paper's comparisons (Tables 1-3) on the gold-judged world, on this CPU machine, no download:
# SFT, DPO (beta 0.1, 0.01, and with AlignDistil's training budget), reverse DPO, DPO and
# contrastive reward accuracy, AlignDistil off- and on-policy (with and without the plausibility
# guard), constant alpha 1.0 / 1.5 / 2.0, and the vanilla teacher; 3 seeds, gold rate +- 95% CI.
#
#   bash examples/reproduce_paper.sh           # full: about 22 minutes on 2 cores
#   bash examples/reproduce_paper.sh --quick   # one seed, fewer rows: about 6-8 minutes
#
# Results: runs/paper/results.md (table), results.json, plots/gold_rate.png; docs/alignment.md.
# Extra flags go to python -m megatron_aligndistil.eval.reproduce (--run-dir, --seeds, --set K=V).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$repo/scripts/setup_env.sh")
cd "$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
args=("$@")
if [ "${1:-}" = "--quick" ]; then
  args=(--quick --run-dir runs/paper_quick "${@:2}")
fi
"$venv/bin/python" -m megatron_aligndistil.eval.reproduce "${args[@]}"
