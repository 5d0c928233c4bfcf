#!/usr/bin/env python
"""Benchmark the vocab-parallel AlignDistil loss against Megatron's cross entropy and a naive loss.

For each shape (tokens x vocab) and TP size, each implementation runs in fresh processes (one per
TP rank, gloo on CPU / NCCL on GPU) and reports the median time of forward+backward and the peak
memory above the inputs (CUDA: max_memory_allocated; CPU: peak RSS, ru_maxrss, with glibc
told to unmap every freed buffer >= 64 KiB so RSS follows live tensors). Prints JSON lines
and a Markdown table.

    python tools/bench_loss.py                      # default shapes, TP 1 and 2
    python tools/bench_loss.py --shapes 2048x32768 --tp 1 2 --dtype float32

Implementations:
  aligndistil  megatron_aligndistil.loss.vocab_parallel_aligndistil (3 logit shards in)
  megatron_ce  megatron.core.tensor_parallel.vocab_parallel_cross_entropy on the policy shard
               (the anchor: one model, three all-reduces)
  naive        all-gather the three full vocabularies, then the dense reference (loss/reference.py) in float32 with autograd
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_aligndistil.core.parallel import Layout
from megatron_aligndistil.testing import run_distributed  # noqa: E402


def _naive(policy, dpo, rev, group):
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnn

    if group is not None and dist.get_world_size(group) > 1:
        policy = torch.cat(dnn.all_gather(policy, group=group), -1)
        dpo = torch.cat(dnn.all_gather(dpo, group=group), -1)
        rev = torch.cat(dnn.all_gather(rev, group=group), -1)
    from megatron_aligndistil.loss.reference import dense_aligndistil

    return dense_aligndistil(policy, dpo, rev, dtype=torch.float32)["loss"]  # r 15, eps 1e-3, beta0 0.1


def _rss_bytes():
    import psutil

    return psutil.Process().memory_info().rss


def bench_rank(impl, tokens, vocab, dtype_name, reps, compile=None):
    """One rank: make this rank's shards, time fwd+bwd, measure peak memory above the inputs."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_aligndistil import platform
    from megatron_aligndistil.loss import vocab_parallel_aligndistil

    dev = platform.device()
    dtype = getattr(torch, dtype_name)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    v_local = vocab // tp
    g = torch.Generator(device="cpu").manual_seed(parallel_state.get_tensor_model_parallel_rank())
    # made in place in their dtype: no float32 temporaries that would raise the peak before `base`
    shards = [torch.empty(tokens, v_local, dtype=dtype).normal_(0, 2, generator=g).to(dev)
              for _ in range(3)]
    target = torch.randint(0, vocab, (tokens,), generator=g).to(dev)
    input_bytes = sum(t.numel() * t.element_size() for t in shards)

    def step():
        if impl == "aligndistil":
            policy = shards[0].detach().requires_grad_(True)
            out = vocab_parallel_aligndistil(policy, shards[1], shards[2], vocab_size=vocab, compile=compile)
            out.loss.sum().backward()
        elif impl == "megatron_ce":
            policy = shards[0].detach().requires_grad_(True)
            # Megatron's CE expects [s, b, V_local]; it works in place on a float copy of its input
            loss = tensor_parallel.vocab_parallel_cross_entropy(policy[:, None].float(), target[:, None])
            loss.sum().backward()
        else:
            policy = shards[0].detach().requires_grad_(True)
            _naive(policy, shards[1], shards[2], group).sum().backward()
        return policy.grad

    if impl == "aligndistil":  # compile the fused kernels (dynamic shapes) outside the measurement
        small = [t[:16].detach() for t in shards]
        vocab_parallel_aligndistil(small[0].requires_grad_(True), small[1], small[2],
                                   vocab_size=vocab, compile=compile).loss.sum().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for i in range(reps + 1):
        torch.distributed.barrier(group=group)
        t0 = time.perf_counter()
        grad = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del grad
    if dev.type == "cuda":
        peak_extra = torch.cuda.max_memory_allocated() - base
    else:
        peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"time_s": statistics.median(times[1:]), "peak_extra_bytes": max(0, peak_extra),
            "input_bytes": input_bytes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["2048x32768", "2048x151936"],
                    help="TOKENSxVOCAB (vocab must divide by each TP)")
    ap.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--impls", nargs="+", default=["aligndistil", "megatron_ce", "naive"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="fuse the AlignDistil loss kernels with torch.compile (auto: on with CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    # CPU: let glibc return every freed buffer >= 64 KiB to the OS, so RSS follows live tensors
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    rows = []
    for shape in args.shapes:
        tokens, vocab = (int(x) for x in shape.lower().split("x"))
        for tp in args.tp:
            for impl in args.impls:
                compile_loss = {"on": True, "off": False}.get(args.compile)
                res = run_distributed(bench_rank, tp, args=(impl, tokens, vocab, args.dtype, args.reps, compile_loss),
                                      layout=Layout(tp=tp), timeout=1800)
                row = {
                    "impl": impl, "tokens": tokens, "vocab": vocab, "tp": tp, "dtype": args.dtype,
                    "time_s": max(r["time_s"] for r in res),
                    "peak_extra_mib": max(r["peak_extra_bytes"] for r in res) / 2**20,
                    "inputs_mib": res[0]["input_bytes"] / 2**20,
                }
                row["peak_over_inputs"] = 1 + row["peak_extra_mib"] / row["inputs_mib"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| tokens x vocab | TP | impl | fwd+bwd s | x Megatron CE | peak / 3 input shards |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ce = next((r for r in rows if r["impl"] == "megatron_ce" and r["tokens"] == row["tokens"]
                   and r["vocab"] == row["vocab"] and r["tp"] == row["tp"]), None)
        ratio = f"{row['time_s'] / ce['time_s']:.2f}" if ce else "-"
        print(f"| {row['tokens']}x{row['vocab']} | {row['tp']} | {row['impl']} | {row['time_s']:.3f} "
              f"| {ratio} | {row['peak_over_inputs']:.2f} |")


if __name__ == "__main__":
    main()
