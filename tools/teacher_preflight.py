#!/usr/bin/env python
"""Teacher pre-flight: sample from AlignDistil's teacher z* and from the DPO model before training.

    # gold world: exact judge; exit 3 when the teacher degenerates or surely answers worse than DPO
    torchrun --nproc-per-node 2 tools/teacher_preflight.py -- --dpo-load runs/dpo --rev-load runs/rev \\
        --prompts data/validation_prompts.jsonl --recipe guarded --samples-per-prompt 4 \\
        --max-new-tokens 32 --target-alpha 0.6 --out preflight.json

    # real data: a reward model judges (win rate of the teacher's samples against the DPO model's)
    torchrun --nproc-per-node 8 tools/teacher_preflight.py -- --dpo-load ckpt/dpo --rev-load ckpt/rev \\
        --prompts uf_validation_prompts.jsonl --judge none --reward-model RM_DIR \\
        --tensor-model-parallel-size 2 --max-new-tokens 1024 && torchrun ... -m megatron_aligndistil.train ...

The loss flags (--recipe, --tvd-scale/--r, --eps, --constant-alpha, --plausibility-threshold,
--tvd-without-half) mean what they mean to the trainer: pass the ones the run will use. The teacher
is sampled token by token from softmax(z*) built by the loss's own teacher, the two teacher models
in lockstep (any TP/PP; the remaining ranks split the prompts). Prints the comparison and the
verdict (pass / warn / fail, eval/preflight.py), the teachers' mean TVD and alpha on the DPO
model's samples and, with --target-alpha, the --tvd-scale that puts mean alpha there. Exit status:
0 pass or warn, 3 fail (0 with --warn-only), 2 bad input (torchrun reports a rank that exits 3 as 1).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_aligndistil.core.cli import run_tool

FAIL_EXIT = 3


def main(argv=None):
    from megatron_aligndistil.config import AlignDistilConfig, AlignDistilLossConfig
    from megatron_aligndistil.core import flags
    from megatron_aligndistil.train.arguments import apply_recipe

    teacher_flags = ("r", "eps", "constant_alpha", "plausibility_threshold", "tvd_half")

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dpo-load", required=True, help="DPO teacher checkpoint")
    ap.add_argument("--rev-load", default=None, help="reverse-DPO teacher checkpoint")
    ap.add_argument("--ref-load", default=None, help="reference model: the vanilla teacher (needs --constant-alpha)")
    ap.add_argument("--sft-load", default=None, help="the policy's starting checkpoint: the teacher's length and "
                                                       "end-of-turn rate are compared with its samples (default: "
                                                       "the DPO model's)")
    ap.add_argument("--prompts", required=True, help="JSON list or JSONL of {\"instruction\": ...}, not test prompts")
    ap.add_argument("--judge", choices=["world", "none"], default="world")
    ap.add_argument("--reward-model", default=None, help="HF sequence-classification reward model directory")
    # the teacher: the trainer's AlignDistil flags, generated from the same config fields
    flags.add_flags(ap, AlignDistilConfig, only=("recipe",))
    flags.add_flags(ap, AlignDistilLossConfig, only=teacher_flags)
    g = ap.add_argument_group("sampling and verdict")
    g.add_argument("--samples-per-prompt", type=int, default=4)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--target-alpha", type=float, default=None,
                   help="report the --tvd-scale at which mean alpha on the DPO model's samples is this")
    g.add_argument("--max-length-ratio", type=float, default=1.3,
                   help="fail when the teacher's mean length exceeds this x the DPO model's")
    g.add_argument("--min-eos-ratio", type=float, default=0.9,
                   help="fail when the teacher's end-of-turn rate is below this x the DPO model's")
    g.add_argument("--warn-only", action="store_true", help="exit 0 on a failing verdict too (pipelines that "
                                                             "collect the verdict from --out)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--out", default=None, help="JSON results")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = ap.parse_args(argv)
    apply_recipe(args, argv)
    errors = flags.range_errors(args, [AlignDistilLossConfig])  # and no NaN / inf in any number
    if errors:
        ap.error("; ".join(errors))
    if bool(args.rev_load) == bool(args.ref_load):
        ap.error("give exactly one of --rev-load (AlignDistil's teacher) or --ref-load (the vanilla teacher)")
    if args.ref_load and args.constant_alpha is None:
        ap.error("--ref-load (vanilla teacher) needs --constant-alpha")
    if args.judge == "none" and not args.reward_model:
        ap.error("--judge none needs --reward-model (something must compare the teacher with the DPO model)")
    if args.samples_per_prompt < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        ap.error(f"--samples-per-prompt must be >= 1 (got {args.samples_per_prompt}), --max-new-tokens >= 1 "
                 f"(got {args.max_new_tokens}), --temperature >= 0 (got {args.temperature})")
    from megatron_aligndistil.config import ConfigError

    try:
        # the token weight scales the loss, not the teacher: any weight that accepts every alpha
        loss = AlignDistilLossConfig(**flags.field_values(AlignDistilLossConfig, args, only=teacher_flags),
                                     token_weight="none")
    except ConfigError as exc:
        ap.error(str(exc))
    level = ["pass"]

    def run():
        import torch

        from megatron_aligndistil.config import SamplingParams
        from megatron_aligndistil.eval.policy_eval import EvalSettings, PolicyEvaluator, load_prompts
        from megatron_aligndistil.eval.preflight import PreflightLimits, preflight, verdict

        items = load_prompts(args.prompts)
        if args.judge == "world":
            from megatron_aligndistil.eval.world import check_world_prompts, judge

            check_world_prompts(items, args.prompts, "for real data use --judge none --reward-model DIR")
        else:
            def judge(prompt, response):
                return 0.0
        sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
        settings = EvalSettings(samples_per_prompt=args.samples_per_prompt, sampling=sampling,
                                batch_size=args.batch_size, greedy=False)
        scratch = None if args.out is None else os.path.dirname(os.path.abspath(args.out))
        evaluator = PolicyEvaluator(items, judge, settings, tokenizer_path=args.dpo_load,
                                    tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                                    scratch=scratch)
        result = preflight(evaluator, args.dpo_load, args.rev_load or args.ref_load, loss, args.target_alpha,
                           args.sft_load)
        if args.reward_model:  # the teacher's win rate against the DPO model's samples, minus one half
            from megatron_aligndistil.eval.reward_model import RewardModelJudge, win_rate
            from megatron_aligndistil.eval.stats import mean_ci

            rm = RewardModelJudge(args.reward_model)
            prompts = [items[j // args.samples_per_prompt]["instruction"] for j in range(len(result["teacher"]["sample_outputs"]))]
            ts = rm.scores(prompts, result["teacher"]["sample_outputs"])
            ds = rm.scores(prompts, result["dpo"]["sample_outputs"])
            index = [j // args.samples_per_prompt for j in range(len(prompts))]
            result["win_rate"] = win_rate(ts, ds, index)
            result["teacher_minus_dpo"] = {k: (v - 0.5 if k != "n" else v) for k, v in result["win_rate"].items()}
        result["verdict"], result["reasons"] = verdict(result, PreflightLimits(args.max_length_ratio, args.min_eos_ratio))
        level[0] = result["verdict"]
        if torch.distributed.get_rank() != 0:
            return
        d, t, st = result["dpo"], result["teacher"], result["token_stats"]
        print(f"{'':<10} {'gold':>22} {'length':>8} {'EOS':>6}")
        for name, r in (("SFT", result.get("sft")), ("DPO", d), ("teacher", t)):
            if r is None:
                continue
            g = r["gold"]
            print(f"{name:<10} {g['mean']:.3f} [{g['lo']:.3f}, {g['hi']:.3f}] {r['response_len_mean']:>8.2f} "
                  f"{r['eos_rate']:>6.2f}")
        diff = result["teacher_minus_dpo"]
        what = "win rate - 0.5" if args.reward_model else "gold"
        print(f"teacher - DPO ({what}): {diff['mean']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}]")
        print(f"on the DPO model's samples: mean TVD {st['tvd_mean']:.4f}, mean alpha {st['alpha_mean']:.3f} "
              f"({st['tokens']} tokens)")
        if result["r_for_target_alpha"] is not None:
            print(f"--tvd-scale {result['r_for_target_alpha']:.3g} puts mean alpha at {args.target_alpha}")
        print(f"verdict: {result['verdict']}" + "".join(f"\n  - {r}" for r in result["reasons"]))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump({"settings": vars(args), **result}, f, indent=1)
            os.replace(args.out + ".tmp", args.out)

    code = run_tool(run)
    return code if code else (FAIL_EXIT if level[0] == "fail" and not args.warn_only else 0)


if __name__ == "__main__":
    sys.exit(main())
