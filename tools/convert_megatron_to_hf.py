#!/usr/bin/env python
"""Export a megatron-aligndistil checkpoint to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --load ckpt/policy --save hf/policy
    python tools/convert_megatron_to_hf.py --load runs/aligndistil --save hf/aligned        # its release/
    python tools/convert_megatron_to_hf.py --load runs/aligndistil/iter_0000200 --save hf/it200

--load is a converted checkpoint, a run directory (its ``release/``, the final policy) or one of a
run's ``iter_XXXXXXX`` training checkpoints (read in one process, the whole model in host memory).

Writes config.json, generation_config.json and tokenizer files (when the checkpoint has them) and
sharded safetensors with an index; ``AutoModelForCausalLM.from_pretrained`` loads the result.
HF -> Megatron -> HF is bit-exact (names, dtypes, shapes, values).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_aligndistil.core.cli import run_tool


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="megatron-aligndistil checkpoint directory")
    ap.add_argument("--save", required=True, help="output HF directory")
    ap.add_argument("--max-shard-size-gb", type=float, default=5.0, help="output shard size (GiB)")
    ap.add_argument("--overwrite", action="store_true", help="replace --save if it exists")
    args = ap.parse_args(argv)

    def export():
        import tempfile

        from megatron_aligndistil.convert.hf import convert_megatron_to_hf
        from megatron_aligndistil.core import weights
        from megatron_aligndistil.train import checkpointing

        load = args.load
        if os.path.isdir(os.path.join(load, weights.RELEASE)) and not weights.is_training_checkpoint(load):
            load = os.path.join(load, weights.RELEASE)  # a run directory: its final policy
        if weights.is_training_checkpoint(load):
            with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.save))) as tmp:
                converted = checkpointing.export_training_checkpoint(load, os.path.join(tmp, "converted"))
                out = convert_megatron_to_hf(converted, args.save, int(args.max_shard_size_gb * 2**30),
                                             overwrite=args.overwrite)
        else:
            out = convert_megatron_to_hf(load, args.save, int(args.max_shard_size_gb * 2**30),
                                         overwrite=args.overwrite)
        print(f"wrote {out}")

    return run_tool(export)


if __name__ == "__main__":
    sys.exit(main())
