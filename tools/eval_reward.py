#!/usr/bin/env python
"""Response-level reward accuracy (paper Table 2) of DPO-style implicit rewards, as JSON.

    # DPO reward (DPO model vs reference) and contrastive reward (DPO vs reverse DPO)
    torchrun --nproc-per-node 4 tools/eval_reward.py --dpo-load runs/dpo --ref-load ckpt/base \\
        --rev-load runs/rev --data-path heldout_pairs.jsonl --tensor-model-parallel-size 2

Checkpoints are converted directories or run directories (their release/). Any TP/PP; the remaining
ranks split the pairs (data parallel). Plain ``python`` runs one process.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_aligndistil.core.cli import run_tool


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dpo-load", required=True, help="the DPO model")
    ap.add_argument("--ref-load", help="reference model: DPO reward = beta * (log pi_dpo - log pi_ref)")
    ap.add_argument("--rev-load", help="reverse-DPO model: contrastive reward = beta * (log pi_dpo - log pi_rev)")
    ap.add_argument("--data-path", required=True, help="tokenized preference pairs (JSONL)")
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ap.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--skip-bad-records", action="store_true")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if not args.ref_load and not args.rev_load:
        ap.error("give --ref-load (DPO reward) and/or --rev-load (contrastive reward)")
    result = {}

    def evaluate():
        import torch

        from megatron_aligndistil.train.evaluate import reward_accuracy

        for name, other in (("dpo_reward", args.ref_load), ("contrastive_reward", args.rev_load)):
            if other:
                result[name] = reward_accuracy(
                    args.dpo_load, other, args.data_path, beta=args.dpo_beta,
                    tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                    micro_batch_size=args.micro_batch_size, skip_bad=args.skip_bad_records)
        if torch.distributed.get_rank() == 0:
            text = json.dumps(result, indent=2)
            print(text)
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    f.write(text + "\n")

    return run_tool(evaluate)


if __name__ == "__main__":
    sys.exit(main())
