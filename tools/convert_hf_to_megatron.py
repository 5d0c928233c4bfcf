#!/usr/bin/env python
"""Convert a Hugging Face Qwen2 / Qwen2.5 / Qwen3 checkpoint to a megatron-aligndistil checkpoint.

    python tools/convert_hf_to_megatron.py --hf-path Qwen2.5-1.5B-Instruct --save ckpt/policy \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1

Streams tensor by tensor (peak memory: a few tensors plus one output shard). The result loads at
any TP/PP that divides the model; the sizes given here are checked and recorded.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_aligndistil.core.cli import run_tool


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-path", required=True, help="HF model directory (config.json + safetensors)")
    ap.add_argument("--save", required=True, help="output directory")
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ap.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    ap.add_argument("--max-shard-size-gb", type=float, default=5.0, help="output shard size (GiB)")
    ap.add_argument("--overwrite", action="store_true", help="replace --save if it exists")
    args = ap.parse_args(argv)

    def convert():
        from megatron_aligndistil.convert.hf import convert_hf_to_megatron

        out = convert_hf_to_megatron(
            args.hf_path, args.save, tp=args.tensor_model_parallel_size,
            pp=args.pipeline_model_parallel_size, max_shard_bytes=int(args.max_shard_size_gb * 2**30),
            overwrite=args.overwrite,
        )
        print(f"wrote {out}")

    return run_tool(convert)


if __name__ == "__main__":
    sys.exit(main())
