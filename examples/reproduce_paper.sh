#!/usr/bin/env bash
# The alignment benchmark on three gold-judged worlds (rules, steps, trap), on this CPU machine, no
# download: SFT; DPO (beta 0.1 and 0.01); AlignDistil with the paper's loss off- and on-policy,
# constant alpha 1.0 and the vanilla teacher; AlignDistil --recipe guarded off- and on-policy. Every
# row but SFT is trained on one grid (epochs {1, 3} x lr {2e-4, 5e-4}), the cell chosen on validation
# prompts, judged on test prompts; 3 seeds, gold rate +- 95% CI; the teacher pre-flight per seed.
#
#   bash examples/reproduce_paper.sh           # full: 3 worlds x 3 seeds x 11 rows (seed 1 of every world and
#                                              # row took about 55 min on 2 cores; docs/alignment.md)
#   bash examples/reproduce_paper.sh --quick   # rules world, one seed, 5 rows
#
# Results: runs/paper/summary.md (every world), runs/paper/<world>/results.{md,json}, plots/;
# docs/alignment.md. Extra flags go to python -m megatron_aligndistil.eval.reproduce (--run-dir,
# --worlds, --seeds, --set K=V).
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
