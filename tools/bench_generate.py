#!/usr/bin/env python
"""Generation throughput (new tokens per second) of megatron_aligndistil.generation at TP1/TP2.

    python tools/bench_generate.py [--tp 1 2] [--batch 16] [--prompt 64] [--new 64]

Random Qwen2-shaped model (hidden 256, 4 layers, vocab 16k by default), sampling at temperature 1
with no stop token so every sequence makes --new tokens. --no-kv-cache measures the uncached path. Prints JSON lines.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _rank(fields, full, prompts, new, kv_cache):
    from megatron_aligndistil.generation import SamplingParams, generate
    from megatron_aligndistil.models import qwen, sharding

    arch = qwen.QwenArch(**fields)
    model = qwen.build_model(arch, qwen.transformer_config(arch))
    sharding.load_full_state_dict(model, full)
    t0 = time.time()
    out = generate(model, prompts, SamplingParams(max_new_tokens=new, temperature=1.0), arch.vocab_size,
                   kv_cache=kv_cache)
    return time.time() - t0, sum(len(o["response_ids"]) for o in out)


def main(argv=None):
    import dataclasses

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_aligndistil.convert.mapping import hf_to_megatron
    from megatron_aligndistil.models.qwen import QwenArch
    from megatron_aligndistil.parallel import Layout
    from megatron_aligndistil.testing import run_distributed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--no-kv-cache", action="store_true", help="recompute the prefix every step")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096))
    arch = QwenArch.from_hf_config(hf.config)
    full = dict(hf_to_megatron(arch, hf.state_dict().__getitem__))
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt)).tolist()
    for tp in args.tp:
        secs, toks = run_distributed(_rank, tp, args=(dataclasses.asdict(arch), full, prompts, args.new, not args.no_kv_cache),
                                     layout=Layout(tp=tp), timeout=3600)[0]
        print(json.dumps({"tp": tp, "batch": args.batch, "prompt": args.prompt, "new_tokens": toks,
                          "seconds": secs, "tokens_per_s": toks / secs, "kv_cache": not args.no_kv_cache}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
