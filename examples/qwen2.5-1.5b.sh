#!/usr/bin/env bash
# Qwen2.5-1.5B-Instruct, the paper's model, on 1 node of 8 x 80 GB.
#   bash examples/qwen2.5-1.5b.sh dpo|rev|aligndistil|aligndistil-onpolicy     (DRY_RUN=1 to check)
# Layout: TP1 PP1 DP8. 1.5B fits a GPU many times over (policy + 2 bf16 teachers ~ 9 GB of weights,
# ~18 GB optimizer state before DP sharding), so pure data parallelism is fastest; TP would only
# add collectives. 2 KV groups would allow TP <= 2 anyway.
here=$(cd "$(dirname "$0")" && pwd); source "$here/common.sh"
MODEL_CONFIG=$here/configs/qwen2.5-1.5b-instruct.json
TP=1; PP=1; MBS=2; EXTRA=()
launch "${1:-aligndistil}"
