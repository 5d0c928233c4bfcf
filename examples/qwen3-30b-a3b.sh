#!/usr/bin/env bash
# Qwen3-30B-A3B (MoE: 48 layers, 128 experts top-8, 30.5B parameters, 3.3B active) on one node of
# 8 GPUs with at least 100 GB each (H200, B200), or NNODES=2 on 80 GB GPUs.
#   bash examples/qwen3-30b-a3b.sh aligndistil                      # 1 node
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node0> bash examples/qwen3-30b-a3b.sh aligndistil
# Layout: EP8 (16 experts of every MoE layer per GPU), TP1, data parallel 8 for the dense part, full
# recompute. Planner, 1 node: 94.2 GB/GPU, of which policy weights 9.6, fp32 grads 19.3 and
# distributed Adam state 42.7 (the experts' state is sharded over expert-data-parallel = 1 rank
# only). 30.5B parameters x (2 + 4 + 12) bytes = 549 GB, 68.6 GB per GPU at best on 8 GPUs: 80 GB
# GPUs cannot hold it even with the teachers offloaded (76.1 GB + a 6 GB reserve), hence PP2 over
# two nodes there (48.8 GB/GPU).
here=$(cd "$(dirname "$0")" && pwd); source "$here/common.sh"
MODEL_CONFIG=$here/configs/qwen3-30b-a3b.json
TP=1; PP=1; MBS=1; EXTRA=(--recompute-granularity full --expert-model-parallel-size 8)
if [ "$NNODES" -ge 2 ]; then PP=2; fi
launch "${1:-aligndistil}"
