"""How far the vLLM rollout engine's log-probs are from the policy's, fp32 and bf16: the numbers
behind the tolerances of ``rollout/agreement.py`` (docs/training.md).

    python tools/bench_engine_agreement.py [--hidden 128] [--iters 3] [--untied]

A tiny random Qwen2 (tied by default, as Qwen2.5 up to 3B) as policy and teachers, on-policy
AlignDistil at DP2 with ``--rollout-engine vllm``; prints, per dtype, the start check's
measurement (4 fixed sequences, every pipeline stage's replica) and the per-iteration
``rollout_logp_diff_mean`` / ``_max`` of the sampled responses. Needs the vLLM extra."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _train(argv):
    from megatron_aligndistil.train import build_trainer
    from megatron_aligndistil.train.arguments import parse_args

    trainer = build_trainer(parse_args(argv))
    agreement = trainer.engine.agreement
    trainer.train()
    return agreement


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--untied", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron
    from megatron_aligndistil.testing import run_distributed
    from megatron_aligndistil.train.metrics import read_metrics

    root = tempfile.mkdtemp(prefix="bench_agreement_")
    paths = {}
    for seed, role in enumerate(("policy", "dpo", "rev")):
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=1001, hidden_size=args.hidden, intermediate_size=args.hidden * 3 // 2,
                          num_hidden_layers=4, num_attention_heads=args.hidden // 32, num_key_value_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=not args.untied, eos_token_id=7)
        Qwen2ForCausalLM(cfg).save_pretrained(os.path.join(root, f"hf_{role}"))
        paths[role] = convert_hf_to_megatron(os.path.join(root, f"hf_{role}"), os.path.join(root, role),
                                             progress=False)
    g = torch.Generator().manual_seed(0)
    data = os.path.join(root, "prompts.jsonl")
    with open(data, "w") as f:
        for _ in range(24):
            f.write(json.dumps({"prompt_ids": torch.randint(8, 1001, (6,), generator=g).tolist()}) + "\n")
    for dtype in ("fp32", "bf16"):
        save = os.path.join(root, dtype)
        argv = ["aligndistil", "--load", paths["policy"], "--dpo-load", paths["dpo"], "--rev-load", paths["rev"],
                "--data-path", data, "--save", save, "--global-batch-size", "8", "--micro-batch-size", "2",
                "--seq-length", "24", "--lr", "3e-3", "--train-iters", str(args.iters), "--no-progress", "--no-export",
                "--rollout", "on-policy", "--rollout-engine", "vllm", "--max-new-tokens", "12",
                "--max-rollout-logp-diff", "10", "--rollout-mismatch", "warn"] + (["--bf16"] if dtype == "bf16" else [])
        start = run_distributed(_train, 2, args=(argv,), timeout=1800)[0]
        steps = read_metrics(os.path.join(save, "metrics.jsonl"))
        print(f"{dtype}: start check mean {start['mean']:.3g} max {start['max']:.3g} over {start['tokens']} tokens; "
              "training mean/max per iteration: "
              + ", ".join(f"{m['rollout_logp_diff_mean']:.3g}/{m['rollout_logp_diff_max']:.3g}" for m in steps),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
