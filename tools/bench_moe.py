#!/usr/bin/env python
"""A Qwen3-MoE-shaped run on 2 CPU processes: AlignDistil step / SFT step, and peak memory
against the memory planner, at expert parallelism 1 and 2.

    python tools/bench_moe.py                       # about 6 min on 2 cores
    python tools/bench_moe.py --seq-length 128 --iters 3

Makes three random Qwen3-MoE models (policy, DPO and reverse-DPO teacher; q/k norm, every layer
sparse, experts dominating the weights as in Qwen3-30B-A3B), converts them and writes records of
exactly ``--seq-length`` input positions. Then, at 2 ranks each: EP1 (data parallel 2, every rank
all experts) and EP2 (data parallel 2, each rank half the experts), trains SFT and AlignDistil
(policy and both teachers MoE, in lockstep) for ``--iters`` iterations with ``--no-export``.
Per rank: the peak anonymous memory above the start of model building (sampled every ms,
``MALLOC_MMAP_THRESHOLD_=65536`` so RSS follows live tensors) next to the planner's prediction;
step time = median ``elapsed_s`` of iterations 2..N. Prints a markdown table (docs/scaling.md
has the recorded one) and the JSON results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_models(root: str, args) -> dict:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron

    cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         moe_intermediate_size=args.moe_ffn, num_experts=args.experts, num_experts_per_tok=args.top_k,
                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=2, head_dim=args.hidden // args.heads,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    paths = {}
    for seed, role in enumerate(("policy", "dpo", "rev")):
        torch.manual_seed(seed)
        hf_dir = os.path.join(root, f"hf_{role}")
        Qwen3MoeForCausalLM(cfg).save_pretrained(hf_dir)
        paths[role] = convert_hf_to_megatron(hf_dir, os.path.join(root, role), progress=False)
    g = torch.Generator().manual_seed(0)
    paths["data"] = os.path.join(root, "data.jsonl")
    prompt = args.seq_length // 4
    with open(paths["data"], "w") as f:
        for _ in range(args.global_batch_size * (args.iters + 1)):
            f.write(json.dumps({"prompt_ids": torch.randint(0, args.vocab, (prompt,), generator=g).tolist(),
                                "response_ids": torch.randint(0, args.vocab, (args.seq_length + 1 - prompt,),
                                                              generator=g).tolist()}) + "\n")
    return paths


def train(method: str, ep: int, paths: dict, root: str, args) -> dict:
    """2 ranks of ``method`` at expert parallelism ``ep``: step time and per-rank peak memory."""
    from megatron_aligndistil.testing import measure_training, run_distributed
    from megatron_aligndistil.train.metrics import read_metrics

    save = os.path.join(root, f"run_{method}_ep{ep}")
    teachers = ["--dpo-load", paths["dpo"], "--rev-load", paths["rev"]] if method == "aligndistil" else []
    argv = [method, "--load", paths["policy"], *teachers, "--data-path", paths["data"], "--save", save,
            "--global-batch-size", str(args.global_batch_size), "--micro-batch-size", str(args.micro_batch_size),
            "--seq-length", str(args.seq_length), "--lr", "1e-5", "--train-iters", str(args.iters),
            "--expert-model-parallel-size", str(ep), "--no-progress", "--no-export", "--no-shuffle"]
    memory = run_distributed(measure_training, 2, args=(argv,), timeout=3600)
    times = [m["elapsed_s"] for m in read_metrics(os.path.join(save, "metrics.jsonl"))][1:]
    return {"step_s": statistics.median(times), "peak_mib": [m / 2**20 for m in memory]}


def planned_mib(paths: dict, method: str, ep: int, args) -> float:
    from megatron_aligndistil.loss.vocab_parallel import CPU_CHUNK_ELEMENTS
    from megatron_aligndistil.memory import Layout, plan_memory
    from megatron_aligndistil.models.qwen import read_arch

    lay = Layout(dp=2, ep=ep, micro_batch=args.micro_batch_size, global_batch=args.global_batch_size,
                 seq_length=args.seq_length, bf16=False, distributed_optimizer=False, flash_attention=False,
                 chunk_elements=CPU_CHUNK_ELEMENTS, fused_optimizer=False,
                 frozen_models=2 if method == "aligndistil" else 0)
    return plan_memory(read_arch(paths["policy"]), lay)["total"] / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-ffn", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--global-batch-size", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--iters", type=int, default=4)
    args = ap.parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # before the ranks start
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as root:
        paths = make_models(root, args)
        for ep in (1, 2):
            row = {"ep": ep}
            for method in ("sft", "aligndistil"):
                got = train(method, ep, paths, root, args)
                planned = planned_mib(paths, method, ep, args)
                row[method] = {**got, "planned_mib": planned,
                               "error": [planned / m - 1 for m in got["peak_mib"]]}
            row["ratio"] = row["aligndistil"]["step_s"] / row["sft"]["step_s"]
            rows.append(row)
    print("| layout (2 ranks) | SFT step s | AlignDistil step s | ratio | method | peak MiB per rank | planned MiB "
          "| planner error |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for method in ("sft", "aligndistil"):
            r = row[method]
            print(f"| EP{row['ep']} (DP2) | {row['sft']['step_s']:.2f} | {row['aligndistil']['step_s']:.2f} | "
                  f"{row['ratio']:.2f} | {method} | {', '.join(f'{m:.0f}' for m in r['peak_mib'])} | "
                  f"{r['planned_mib']:.0f} | {', '.join(f'{e:+.1%}' for e in r['error'])} |")
    print(json.dumps({"shape": vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
