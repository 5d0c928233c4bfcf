#!/usr/bin/env bash
# Qwen2.5-72B-Instruct on 4 nodes (NNODES=4) or 8 nodes of 8 x 80 GB.
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node0> bash examples/qwen2.5-72b.sh aligndistil
# Layout: TP8 (within a node) PP4 (80 layers -> 20 per stage), DP = NNODES/4, sequence
# parallelism and full recompute. Per GPU: policy + 2 teachers bf16 ~13.5 GB, fp32 grads 9 GB,
# distributed Adam state 27 GB at DP1 (13.5 GB at DP2 on 8 nodes).
DEFAULT_NNODES=4
here=$(cd "$(dirname "$0")" && pwd); source "$here/common.sh"
MODEL_CONFIG=$here/configs/qwen2.5-72b-instruct.json
TP=8; PP=4; MBS=1; EXTRA=(--sequence-parallel --recompute-granularity full)
# 2 model chunks of 10 layers per pipeline rank (interleaved schedule): the planner's pipeline bubble
# 2.34% -> 1.17% of a step at 49.1 -> 49.3 GB/GPU; VPP=4 (5-layer chunks): 0.59% at 49.4 GB, twice the p2p hops
VPP=${VPP:-2}
launch "${1:-aligndistil}"
