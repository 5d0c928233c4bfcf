# Sourced by the sbatch scripts of this folder (not run). Slurm starts the batch script on the
# first node; `run_recipe RECIPE METHOD` then starts one task per node with srun, and each task
# runs the recipe (examples/RECIPE.sh), which starts torchrun for its node's GPUs. The rendezvous
# comes from Slurm: NNODES = SLURM_JOB_NUM_NODES, NODE_RANK = each task's SLURM_NODEID,
# MASTER_ADDR = the job's first host (scontrol show hostnames).
#
# Submit from the repository root, with the environment that has the package (sbatch exports it):
#   source .venv/bin/activate && sbatch examples/slurm/qwen2.5-7b.sbatch aligndistil
# Environment: MASTER_PORT (29500), GPUS_PER_NODE (8), and the recipes' own (BASE, DATA, RUNS,
# OFFLOAD, VPP, DRY_RUN=1 for the plan on every node without training).
set -euo pipefail

REPO=${SLURM_SUBMIT_DIR:?submit with sbatch from the repository root (SLURM_SUBMIT_DIR is not set)}

run_recipe() {
  local recipe=$1 method=$2
  local master
  master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')  # reads all: no SIGPIPE under pipefail
  echo "[slurm] job ${SLURM_JOB_ID:-?}: $SLURM_JOB_NUM_NODES node(s), rendezvous $master:${MASTER_PORT:-29500}, recipe $recipe $method"
  # one task per node; $SLURM_NODEID is expanded by each task, the rest here
  srun --nodes "$SLURM_JOB_NUM_NODES" --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c \
    "echo \"[slurm] node \$SLURM_NODEID on \$(hostname)\"; \
     NNODES=$SLURM_JOB_NUM_NODES NODE_RANK=\$SLURM_NODEID MASTER_ADDR=$master MASTER_PORT=${MASTER_PORT:-29500} \
     GPUS_PER_NODE=${GPUS_PER_NODE:-8} bash '$REPO/examples/$recipe.sh' '$method'"
}
