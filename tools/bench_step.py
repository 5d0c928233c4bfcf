#!/usr/bin/env python
"""Step time of AlignDistil (policy + 2 frozen teachers) vs SFT (policy only), same batch/layout.

    python tools/bench_step.py                       # TP1 PP1, 1 process
    python tools/bench_step.py --tp 2 --pp 2         # 4 processes

Makes a random Qwen2-shaped model (no download), converts it, writes tokenized data, then runs
``python -m megatron_aligndistil.train sft`` and ``... aligndistil`` for --iters iterations each
on spawned ranks and reports the median ``elapsed_s`` of iterations 2..N from metrics.jsonl.
Ideal ratio ~1.67: two teacher forwards (~1/3 of a forward+backward each) on top of one step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_models(root, args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron

    paths = {}
    for seed, role in enumerate(("policy", "dpo", "rev")):
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=2,
                          max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False)
        hf_dir = os.path.join(root, f"hf_{role}")
        Qwen2ForCausalLM(cfg).save_pretrained(hf_dir)
        paths[role] = convert_hf_to_megatron(hf_dir, os.path.join(root, role), progress=False)
    g = torch.Generator().manual_seed(0)
    paths["data"] = os.path.join(root, "data.jsonl")
    with open(paths["data"], "w") as f:
        for _ in range(args.global_batch * (args.iters + 1)):
            f.write(json.dumps({
                "prompt_ids": torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist(),
                "response_ids": torch.randint(0, args.vocab, (args.response,), generator=g).tolist(),
            }) + "\n")
    return paths


def step_times(method, paths, root, args):
    from megatron_aligndistil.testing import run_distributed
    from megatron_aligndistil.train import main as train_main
    from megatron_aligndistil.train.metrics import read_metrics

    save = os.path.join(root, f"run_{method}")
    argv = [method, "--load", paths["policy"], "--data-path", paths["data"], "--save", save,
            "--global-batch-size", str(args.global_batch), "--micro-batch-size", str(args.micro_batch),
            "--seq-length", str(args.prompt + args.response), "--lr", "1e-5", "--train-iters", str(args.iters),
            "--tensor-model-parallel-size", str(args.tp), "--pipeline-model-parallel-size", str(args.pp),
            "--no-progress", "--no-export", "--no-shuffle"]
    if method == "aligndistil":
        argv += ["--dpo-load", paths["dpo"], "--rev-load", paths["rev"], "--loss-compile", args.loss_compile]
    world = args.tp * args.pp * args.dp
    codes = run_distributed(train_main, world, args=(argv,), timeout=3600)
    assert codes == [0] * world, codes
    times = [m["elapsed_s"] for m in read_metrics(os.path.join(save, "metrics.jsonl"))][1:]
    return statistics.median(times), times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=192)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--loss-compile", choices=["auto", "on", "off"], default="auto",
                    help="the trainer's --loss-compile (auto: compiled with CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-step-") as root:
        paths = make_models(root, args)
        sft, sft_all = step_times("sft", paths, root, args)
        ad, ad_all = step_times("aligndistil", paths, root, args)
    result = {"layout": f"TP{args.tp} PP{args.pp} DP{args.dp}", "hidden": args.hidden, "layers": args.layers,
              "vocab": args.vocab, "seq": args.prompt + args.response, "global_batch": args.global_batch,
              "micro_batch": args.micro_batch, "sft_step_s": sft, "aligndistil_step_s": ad,
              "ratio": ad / sft, "ideal_ratio": 5 / 3, "sft_steps": sft_all, "aligndistil_steps": ad_all}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
