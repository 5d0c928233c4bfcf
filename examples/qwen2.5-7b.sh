#!/usr/bin/env bash
# Qwen2.5-7B-Instruct on 1 node of 8 x 80 GB.
#   bash examples/qwen2.5-7b.sh dpo|rev|aligndistil|aligndistil-onpolicy     (DRY_RUN=1 to check)
# Layout: TP2 PP1 DP4 with sequence parallelism and full recompute. Per GPU: policy bf16 weights
# 7.6 GB/TP, fp32 grads and distributed Adam state (12 B/param / (TP x DP)), two bf16 teachers
# 15 GB/TP; TP2 keeps it near 45 GB and leaves room for 2k-token activations and three 152k-vocab
# logit shards. 4 KV groups allow TP <= 4.
here=$(cd "$(dirname "$0")" && pwd); source "$here/common.sh"
MODEL_CONFIG=$here/configs/qwen2.5-7b-instruct.json
TP=2; PP=1; MBS=1; EXTRA=(--sequence-parallel --recompute-granularity full)
launch "${1:-aligndistil}"
