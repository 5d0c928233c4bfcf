#!/usr/bin/env bash
# Qwen2.5-32B-Instruct on 2 nodes (NNODES=2) or 4 nodes (DP doubles) of 8 x 80 GB.
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node0> bash examples/qwen2.5-32b.sh aligndistil
# Layout: TP8 (within a node, NVLink; 8 KV groups allow TP <= 8) PP2 (64 layers -> 32 per stage)
# with sequence parallelism and full recompute. Per GPU: policy + 2 teachers bf16 ~12 GB, fp32
# grads 8 GB, distributed Adam state 24 GB at DP1 (12 GB at DP2 on 4 nodes).
# One node (NNODES=1): TP8 PP1 with the teachers streamed from host memory (OFFLOAD=1 implied):
# planner 69.8 GB/GPU + 15.3 GB pinned host memory per GPU; each micro-batch copies the teachers'
# weights over the host link, so steps are slower unless micro-batches are long (docs/scaling.md).
DEFAULT_NNODES=2
here=$(cd "$(dirname "$0")" && pwd); source "$here/common.sh"
MODEL_CONFIG=$here/configs/qwen2.5-32b-instruct.json
TP=8; PP=2; MBS=1; EXTRA=(--sequence-parallel --recompute-granularity full)
# 2 model chunks of 16 layers per pipeline rank (interleaved schedule): the planner's pipeline bubble
# 0.78% -> 0.39% of a step at 42.7 -> 42.8 GB/GPU (full recompute keeps the extra in-flight chunks small)
VPP=${VPP:-2}
if [ "$NNODES" = 1 ]; then PP=1; OFFLOAD=1; fi
launch "${1:-aligndistil}"
