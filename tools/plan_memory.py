#!/usr/bin/env python
"""Predict per-GPU memory of a run from an HF config and a layout; suggest the smallest layout
that fits a GPU.

    python tools/plan_memory.py --hf-config examples/configs/qwen2.5-7b-instruct.json \\
        --tensor-model-parallel-size 2 --world-size 8 --sequence-parallel --recompute-granularity full
    python tools/plan_memory.py --hf-config examples/configs/qwen2.5-72b-instruct.json --suggest --gpu-memory-gb 80

Terms and their derivation: megatron_aligndistil/memory.py and docs/scaling.md.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-config", required=True, help="HF config.json (or a converted checkpoint dir)")
    ap.add_argument("--method", choices=["aligndistil", "dpo", "sft"], default="aligndistil")
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ap.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    ap.add_argument("--expert-model-parallel-size", type=int, default=1, help="MoE: experts split over EP ranks")
    ap.add_argument("--expert-tensor-parallel-size", type=int, default=None, help="MoE: default TP")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--global-batch-size", type=int, default=128)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--fp32", action="store_true", help="fp32 instead of bf16")
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--recompute-granularity", choices=["full"], default=None)
    ap.add_argument("--offload-frozen-models", action="store_true",
                    help="frozen models' weights in host memory, streamed per layer (as the trainer flag)")
    ap.add_argument("--no-flash-attention", action="store_true", help="count a*s^2 attention scores")
    ap.add_argument("--suggest", action="store_true", help="list the smallest layouts that fit")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from megatron_aligndistil.memory import GIB, Layout, host_bytes_per_gpu, plan_memory, suggest
    from megatron_aligndistil.train.plan import resolve_arch

    arch = resolve_arch(args.hf_config)
    frozen = {"aligndistil": 2, "dpo": 1, "sft": 0}[args.method]
    common = dict(micro_batch=args.micro_batch_size, global_batch=args.global_batch_size, seq_length=args.seq_length,
                  bf16=not args.fp32, distributed_optimizer=not args.no_distributed_optimizer,
                  sequence_parallel=args.sequence_parallel, recompute=args.recompute_granularity,
                  frozen_models=frozen, sequences_per_record=2 if args.method == "dpo" else 1,
                  flash_attention=not args.no_flash_attention, offload_frozen=args.offload_frozen_models)
    if args.suggest:
        fits = suggest(arch, args.gpu_memory_gb, args.gpus_per_node, **common)
        if args.json:
            print(json.dumps(fits))
        elif not fits:
            print("no layout up to 32 nodes fits")
        else:
            print(f"smallest layouts that fit {args.gpu_memory_gb:g} GB GPUs ({args.method}):")
            for f in fits[:8]:
                experts = f" EP{f['ep']} ETP{f['etp']}" if "ep" in f else ""
                print(f"  {f['nodes']} node(s), {f['gpus']} GPUs: TP{f['tp']} PP{f['pp']} DP{f['dp']}{experts}  "
                      f"{f['per_gpu_gb']:.1f} GB/GPU")
        return 0
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size
    arch.check_layout(tp, pp, ep=ep, sequence_parallel=args.sequence_parallel)
    lay = Layout(tp=tp, pp=pp, dp=args.world_size // (tp * pp), ep=ep, etp=etp, **common)
    terms = plan_memory(arch, lay)
    host = host_bytes_per_gpu(arch, lay)
    if args.json:
        print(json.dumps({**{k: v / GIB for k, v in terms.items()}, "host_pinned_per_gpu": host / GIB}))
    else:
        experts = f" EP{ep} ETP{etp or tp}" if arch.is_moe else ""
        print(f"per-GPU memory, worst pipeline stage, TP{tp} PP{pp} DP{lay.dp}{experts} ({args.method}):")
        for k, v in terms.items():
            print(f"  {k:<16} {v / GIB:8.2f} GiB")
        if host:
            print(f"  (+ {host / GIB:.2f} GiB of pinned host memory per GPU for the offloaded frozen weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
