#!/usr/bin/env python
"""Rollout-engine throughput (new tokens per second), and on-policy iteration time per engine.

    python tools/bench_generate.py [--engine megatron vllm] [--shape small 169m] [--tp 1]
    python tools/bench_generate.py --on-policy [--engine megatron vllm]

Throughput: a random Qwen2-shaped model in fp32, --batch prompts of --prompt tokens, sampling at
temperature 1 with no stop token, so every sequence makes --new tokens. Shapes: ``small`` (hidden
256, 4 layers, vocab 16k, 8 heads / 2 KV groups) and ``169m`` (hidden 1024, 12 layers, vocab 32k,
16 heads / 2 KV groups: 169M parameters). Each engine is timed on its second ``generate`` call (the
first warms it up); the engine's start-up (and, for vLLM, its first weight sync) is reported apart.
--no-kv-cache measures the Megatron sampler's uncached path.

--on-policy: the trainer itself, on-policy AlignDistil at TP1 with three models of --on-policy-shape
(default small), for --iters iterations with each engine; reports the mean iteration time and the
share of it spent sampling (``rollout_s / elapsed_s`` from metrics.jsonl), iteration 1 excluded.

Threads: --threads per process (OMP_NUM_THREADS), the same for both engines. Prints JSON lines.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {
    "small": dict(hidden_size=256, num_hidden_layers=4, vocab_size=16384, num_attention_heads=8),
    "169m": dict(hidden_size=1024, num_hidden_layers=12, vocab_size=32000, num_attention_heads=16),
}


def _hf_config(shape: str, max_positions: int = 4096):
    from transformers import Qwen2Config

    s = SHAPES[shape]
    return Qwen2Config(intermediate_size=s["hidden_size"] * 11 // 4, num_key_value_heads=2,
                       max_position_embeddings=max_positions, tie_word_embeddings=False, torch_dtype="float32", **s)


def _rank(engine_name, fields, full, prompts, new, kv_cache):
    from megatron_aligndistil.config import RolloutConfig, SamplingParams
    from megatron_aligndistil.models import qwen
    from megatron_aligndistil.core import sharding
    from megatron_aligndistil.rollout import make_engine

    arch = qwen.QwenArch(**fields)
    model = qwen.build_model(arch, qwen.transformer_config(arch))
    sharding.load_full_state_dict(model, full)
    params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=0)
    t0 = time.time()
    engine = make_engine(RolloutConfig(engine_name, params), model, arch, arch.vocab_size,
                         max_model_len=len(prompts[0]) + new)
    if engine_name == "megatron":
        engine.kv_cache = kv_cache
    startup = time.time() - t0
    engine.generate(prompts[:2], max_new_tokens=[4, 4])  # warm-up
    t0 = time.time()
    out = engine.generate(prompts, sequence_ids=list(range(len(prompts))))
    secs = time.time() - t0
    t0 = time.time()
    engine.sync_weights(model)
    return {"startup_s": startup, "seconds": secs, "new_tokens": sum(len(o.response_ids) for o in out),
            "sync_s": time.time() - t0}


def throughput(args):
    import dataclasses

    import torch
    from transformers import Qwen2ForCausalLM

    from megatron_aligndistil.convert.mapping import hf_to_megatron
    from megatron_aligndistil.models.qwen import QwenArch
    from megatron_aligndistil.core.parallel import Layout
    from megatron_aligndistil.testing import run_distributed

    for shape in args.shape:
        torch.manual_seed(0)
        hf = Qwen2ForCausalLM(_hf_config(shape))
        arch = QwenArch.from_hf_config(hf.config)
        full = dict(hf_to_megatron(arch, hf.state_dict().__getitem__))
        params = sum(t.numel() for t in hf.state_dict().values())
        del hf
        prompts = torch.randint(0, arch.vocab_size, (args.batch, args.prompt)).tolist()
        for engine in args.engine:
            for tp in args.tp:
                r = run_distributed(_rank, tp, args=(engine, dataclasses.asdict(arch), full, prompts, args.new,
                                                     not args.no_kv_cache), layout=Layout(tp=tp), timeout=7200)[0]
                print(json.dumps({"engine": engine, "shape": shape, "parameters": params, "tp": tp,
                                  "threads": args.threads, "batch": args.batch, "prompt": args.prompt,
                                  **r, "tokens_per_s": r["new_tokens"] / r["seconds"]}), flush=True)


def _write_models(root: str, shape: str) -> dict:
    """Three random models of ``shape`` (policy, DPO, reverse DPO), converted; prompts JSONL."""
    import torch
    from transformers import Qwen2ForCausalLM

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron

    out = {}
    for seed, role in enumerate(("policy", "dpo", "rev")):
        torch.manual_seed(seed)
        hf_dir = os.path.join(root, f"hf_{role}")
        Qwen2ForCausalLM(_hf_config(shape, max_positions=512)).save_pretrained(hf_dir)
        out[role] = convert_hf_to_megatron(hf_dir, os.path.join(root, role), progress=False)
    return out


def on_policy(args):
    import subprocess

    import torch

    from megatron_aligndistil.core.parallel import free_port
    from megatron_aligndistil.train.metrics import read_metrics

    with tempfile.TemporaryDirectory(prefix="bench-onpolicy-") as root:
        models = _write_models(root, args.on_policy_shape)
        vocab = SHAPES[args.on_policy_shape]["vocab_size"]
        g = torch.Generator().manual_seed(0)
        data = os.path.join(root, "prompts.jsonl")
        with open(data, "w") as f:
            for _ in range(args.global_batch * args.iters):
                f.write(json.dumps({"prompt_ids": torch.randint(0, vocab, (args.prompt,), generator=g).tolist()}) + "\n")
        for engine in args.engine:
            save = os.path.join(root, f"run_{engine}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                   "--master-port", str(free_port()), "-m", "megatron_aligndistil.train", "aligndistil",
                   "--load", models["policy"], "--dpo-load", models["dpo"], "--rev-load", models["rev"],
                   "--data-path", data, "--save", save, "--rollout", "on-policy", "--rollout-engine", engine,
                   "--global-batch-size", str(args.global_batch), "--micro-batch-size", str(args.micro_batch),
                   "--seq-length", str(args.prompt + args.new), "--max-new-tokens", str(args.new),
                   "--stop-token-ids", str(vocab - 1), "--lr", "1e-5", "--train-iters", str(args.iters), "--no-progress",
                   "--no-export"]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{engine}: the run failed:\n{proc.stderr[-4000:]}")
            m = read_metrics(os.path.join(save, "metrics.jsonl"))[1:]
            it = sum(x["elapsed_s"] for x in m) / len(m)
            roll = sum(x["rollout_s"] for x in m) / len(m)
            sync = sum(x["weight_sync_s"] for x in m) / len(m)
            row = {"engine": engine, "on_policy_shape": args.on_policy_shape, "nproc": args.nproc,
                   "global_batch": args.global_batch, "prompt": args.prompt, "new": args.new,
                   "iteration_s": it, "rollout_s": roll, "rollout_share": roll / it, "weight_sync_s": sync,
                   "response_len_mean": sum(x["response_len_mean"] for x in m) / len(m), "run_s": time.time() - t0}
            if "rollout_logp_diff_max" in m[-1]:
                row.update({k: max(x[k] for x in m) for k in ("rollout_logp_diff_mean", "rollout_logp_diff_max")})
            print(json.dumps(row), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", nargs="+", choices=["megatron", "vllm"], default=["megatron", "vllm"])
    ap.add_argument("--shape", nargs="+", choices=list(SHAPES), default=["small", "169m"])
    ap.add_argument("--tp", type=int, nargs="+", default=[1])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each process")
    ap.add_argument("--no-kv-cache", action="store_true", help="Megatron engine: recompute the prefix every step")
    ap.add_argument("--on-policy", action="store_true", help="time on-policy AlignDistil iterations instead")
    ap.add_argument("--on-policy-shape", choices=list(SHAPES), default="small")
    ap.add_argument("--nproc", type=int, default=1, help="--on-policy: processes (data-parallel ranks)")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=4)
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.on_policy:
        on_policy(args)
    else:
        throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
