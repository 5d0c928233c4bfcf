# Shared launcher for the per-model recipes (sourced, not run). A recipe sets MODEL_CONFIG, the
# layout (TP, PP, ...) and batch flags, then calls `launch METHOD`.
#
# Environment (all optional):
#   NNODES (1), NODE_RANK (0), GPUS_PER_NODE (8), MASTER_ADDR (localhost), MASTER_PORT (29500)
#   BASE      converted base/SFT checkpoint     (default ckpt/<model>)
#   DATA      tokenized data prefix             (default data/uf, from tools/preprocess_data.py)
#   RUNS      output root                       (default runs/<model>)
#   DRY_RUN=1 check flags against the model and print the parallel plan; allocates nothing
#   OFFLOAD=1 keep the teachers'/reference's weights in host memory (--offload-frozen-models)
#   VPP=N     N model chunks per pipeline rank (--num-virtual-stages-per-pipeline-rank, the
#             interleaved schedule); a recipe's default is where the planner shows a smaller
#             pipeline bubble within memory
set -euo pipefail

NNODES=${NNODES:-${DEFAULT_NNODES:-1}}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
WORLD=$((NNODES * GPUS_PER_NODE))

launch() {
  local method=$1; shift
  local name; name=$(basename "$MODEL_CONFIG" .json)
  local base=${BASE:-ckpt/$name} data=${DATA:-data/uf} runs=${RUNS:-runs/$name}
  local common=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
                --global-batch-size 128 --micro-batch-size "$MBS" --seq-length 2048
                --lr-warmup-fraction 0.1 --bf16 --use-distributed-optimizer
                --save-interval 200 "${EXTRA[@]}")
  if [ "${OFFLOAD:-0}" = 1 ]; then common+=(--offload-frozen-models); fi
  if [ "${VPP:-1}" -gt 1 ] && [ "$PP" -gt 1 ]; then
    common+=(--num-virtual-stages-per-pipeline-rank "$VPP")
  fi
  local args
  case "$method" in
    # The paper's code (OpenRLHF's schedule): warmup 0.1, cosine to 0.1 x lr, for every stage.
    # Its TVD is sum |p_dpo - p_rev| without the 1/2 and its r is 10 off-policy, 15 on-policy:
    # --tvd-without-half --tvd-scale 10 here is exactly that (= --tvd-scale 20 with the paper's 1/2).
    dpo)     args=(dpo --load "$base" --data-path "$data"_pairs --save "$runs"/dpo --dpo-beta 0.1
                   --lr 1e-6 --min-lr 1e-7) ;;
    rev)     args=(dpo --load "$base" --data-path "$data"_pairs --save "$runs"/rev --dpo-beta 0.1
                   --lr 1e-6 --min-lr 1e-7 --reverse) ;;
    aligndistil)
             args=(aligndistil --rollout off-policy --load "$base" --dpo-load "$runs"/dpo --rev-load "$runs"/rev
                   --data-path "$data"_chosen --save "$runs"/aligndistil --lr 1e-6 --min-lr 1e-7
                   --tvd-without-half --tvd-scale 10 --beta0 0.1) ;;
    aligndistil-onpolicy)
             args=(aligndistil --rollout on-policy --load "$base" --dpo-load "$runs"/dpo --rev-load "$runs"/rev
                   --data-path "$data"_prompts --save "$runs"/aligndistil_onpolicy --lr 1e-6 --min-lr 1e-7
                   --tvd-without-half --tvd-scale 15 --beta0 0.1) ;;
    *) echo "usage: $0 dpo|rev|aligndistil|aligndistil-onpolicy" >&2; exit 2 ;;
  esac
  if [ "${DRY_RUN:-0}" = 1 ]; then
    python -m megatron_aligndistil.train -- "${args[@]}" "${common[@]}" \
        --dry-run --world-size "$WORLD" --model-config "$MODEL_CONFIG"
  else
    torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
        -m megatron_aligndistil.train -- "${args[@]}" "${common[@]}"
  fi
}
