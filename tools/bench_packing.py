#!/usr/bin/env python
"""Sequence packing on an UltraFeedback-like length distribution: padding and tokens/s.

    python tools/bench_packing.py                    # AlignDistil, TP1, 1 process
    python tools/bench_packing.py --method sft --tp 2

Records get prompt lengths 20-600 and response lengths 50-1500 tokens (log-normal, long tail,
like UltraFeedback's chat-templated pairs). The same random Qwen2-shaped models and global
batches are trained with and without ``--pack-sequences`` at the same ``--micro-batch-size`` and
``--seq-length`` (the same activation memory bound per micro-batch). Reports, per mode, the
padding fraction of the model's input positions (from the trainer's own micro-batches), the
number of micro-batches, the median step time of iterations 2..N and input tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def lengths(n, lo, hi, median, sigma, g):
    import torch

    x = torch.exp(torch.randn(n, generator=g) * sigma) * median
    return x.clamp(lo, hi).round().long().tolist()


def write_data(path, args):
    import torch

    g = torch.Generator().manual_seed(0)
    n = args.global_batch * (args.iters + 1)
    prompts = lengths(n, 20, 600, 120, 0.9, g)
    responses = lengths(n, 50, 1500, 300, 0.8, g)
    with open(path, "w") as f:
        for p, r in zip(prompts, responses):
            f.write(json.dumps({"prompt_ids": torch.randint(0, args.vocab, (p,), generator=g).tolist(),
                                "response_ids": torch.randint(0, args.vocab, (r,), generator=g).tolist()}) + "\n")
    return prompts, responses


def padding(method, records, args, pack: bool):
    """(padding fraction, micro-batches per step) of the trainer's micro-batches, averaged over steps."""
    rows = args.micro_batch * method.sequences_per_record
    pads, counts = [], []
    for it in range(args.iters):
        batch = records[it * args.global_batch: (it + 1) * args.global_batch]
        mbs, seq_len = method.micro_batches(batch, rows, pack_length=args.seq_length if pack else None)
        real = sum(int((b.seq_index >= 0).sum()) for b in mbs)
        pads.append(1 - real / (len(mbs) * rows * seq_len))
        counts.append(len(mbs))
    return statistics.mean(pads), statistics.mean(counts)


def run(paths, root, args, pack: bool):
    from megatron_aligndistil.testing import run_distributed
    from megatron_aligndistil.train import main as train_main
    from megatron_aligndistil.train.metrics import read_metrics

    save = os.path.join(root, f"run_{'packed' if pack else 'unpacked'}")
    argv = [args.method, "--load", paths["policy"], "--data-path", paths["data"], "--save", save,
            "--global-batch-size", str(args.global_batch), "--micro-batch-size", str(args.micro_batch),
            "--seq-length", str(args.seq_length), "--lr", "1e-5", "--train-iters", str(args.iters),
            "--tensor-model-parallel-size", str(args.tp), "--no-progress", "--no-export", "--no-shuffle"]
    if args.method == "aligndistil":
        argv += ["--dpo-load", paths["dpo"], "--rev-load", paths["rev"]]
    if pack:
        argv.append("--pack-sequences")
    codes = run_distributed(train_main, args.tp, args=(argv,), timeout=7200)
    assert codes == [0] * args.tp, codes
    return statistics.median(m["elapsed_s"] for m in read_metrics(os.path.join(save, "metrics.jsonl"))[1:])


def main(argv=None):
    from bench_step import make_models

    from megatron_aligndistil.data.records import read_jsonl
    from megatron_aligndistil.train.sft import SFT

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["aligndistil", "sft"], default="aligndistil")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-length", type=int, default=2100)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    # bench_step.make_models reads these
    args.prompt, args.response, args.pp, args.dp = 1, 1, 1, 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as root:
        paths = make_models(root, args)
        prompts, responses = write_data(paths["data"], args)
        records = read_jsonl(paths["data"], "distill", args.vocab, max_tokens=args.seq_length + 1).records
        probe = SFT()  # one sequence per record, as AlignDistil: the same micro-batches
        results = {}
        for pack in (False, True):
            pad, count = padding(probe, records, args, pack)
            step_s = run(paths, root, args, pack)
            tokens = sum(p + r - 1 for p, r in zip(prompts, responses)) / (args.iters + 1)
            results["packed" if pack else "unpacked"] = {"padding_fraction": pad, "micro_batches_per_step": count,
                                                         "step_s": step_s, "input_tokens_per_s": tokens / step_s}
    print(f"{args.method}, TP{args.tp}, hidden {args.hidden}, {args.layers} layers, global batch "
          f"{args.global_batch}, micro-batch {args.micro_batch} x {args.seq_length}")
    print("| mode | padding | micro-batches/step | step (s) | input tokens/s |")
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['padding_fraction']:.1%} | {r['micro_batches_per_step']:.1f} | {r['step_s']:.2f} | "
              f"{r['input_tokens_per_s']:.0f} |")
    speedup = results["packed"]["input_tokens_per_s"] / results["unpacked"]["input_tokens_per_s"]
    print(f"packing speed-up: {speedup:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "speedup": speedup}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
