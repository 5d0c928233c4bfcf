#!/usr/bin/env bash
# Qwen3-235B-A22B (MoE: 94 layers, 128 experts top-8, 235B parameters, 22B active) on 16 nodes of
# 8 x 80 GB (NNODES=16), or 8 nodes with the teachers in host memory (NNODES=8, OFFLOAD=1 implied).
#   NNODES=16 NODE_RANK=<i> MASTER_ADDR=<node0> bash examples/qwen3-235b-a22b.sh aligndistil
# Layout: TP4 (4 KV groups) with sequence parallelism for attention, PP2 (94 layers = 2 x 47: PP
# must divide the layers), experts over EP64 (2 per GPU and layer) with expert-TP 1, full recompute.
# Planner: 50.2 GB/GPU on 16 nodes; on 8 nodes EP32 and offloaded teachers, 69.9 GB/GPU plus their
# pinned host copy.
DEFAULT_NNODES=16
here=$(cd "$(dirname "$0")" && pwd); source "$here/common.sh"
MODEL_CONFIG=$here/configs/qwen3-235b-a22b.json
TP=4; PP=2; MBS=1; EP=64
if [ "$NNODES" -lt 16 ]; then EP=32; OFFLOAD=1; fi
EXTRA=(--sequence-parallel --recompute-granularity full --expert-model-parallel-size "$EP"
       --expert-tensor-parallel-size 1)
launch "${1:-aligndistil}"
