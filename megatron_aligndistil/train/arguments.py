"""Megatron-style command-line flags -> one argparse namespace, validated with messages naming flags.

    python -m megatron_aligndistil.train <aligndistil|dpo|sft> [flags]

The flags are generated from the typed configs' fields (``config.py``, :mod:`..core.flags`):
their names, help, choices, defaults and ranges are written there once. This module adds the
checks that span several configs.
"""

from __future__ import annotations

import argparse
import os

from ..config import (RECIPES, AlignDistilConfig, AlignDistilLossConfig, DPOConfig, PlanOptions, RolloutConfig,
                      SamplingParams, TrainingConfig)
from ..core import flags as _flags

# each method's configs, in help order; each field of these is a flag of the method
CONFIGS = {
    "aligndistil": (TrainingConfig, PlanOptions, AlignDistilConfig, AlignDistilLossConfig, RolloutConfig,
                    SamplingParams),
    "sft": (TrainingConfig, PlanOptions),
    "dpo": (TrainingConfig, PlanOptions, DPOConfig),
}
_HELP = {"aligndistil": "token-level distillation from DPO / reverse-DPO teachers",
         "sft": "supervised fine-tuning on response tokens (the step-time baseline)",
         "dpo": "DPO (or reverse DPO) against a frozen reference model"}
GROUPS = ("parallelism", "mixture of experts", "batch and schedule", "optimizer (AdamW)", "data", "checkpoints and logging", "dry run",
          "AlignDistil", "AlignDistil on-policy rollouts", "DPO")


def apply_recipe(args: argparse.Namespace, argv: list[str]) -> None:
    """Set ``args.recipe``'s settings (:data:`~megatron_aligndistil.config.RECIPES`) that none of
    their flags in ``argv`` set."""
    for dest, flags, value in RECIPES.get(getattr(args, "recipe", None), ()):
        if not _values_of(argv, flags):
            setattr(args, dest, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_aligndistil.train",
                                     description="Train with AlignDistil or DPO on Megatron-Core.")
    sub = parser.add_subparsers(dest="method", required=True)
    for method, classes in CONFIGS.items():
        p = sub.add_parser(method, help=_HELP[method])
        _flags.add_groups(p, GROUPS)
        for cls in classes:
            _flags.add_flags(p, cls)
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
    errors = _flags.range_errors(args, CONFIGS[args.method])
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
    if not errors:  # the typed configs check what spans several of their flags
        from ..config import ConfigError

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



_FLAG_NAMES = {"method": "method"} | _flags.flag_names({cls for classes in CONFIGS.values() for cls in classes})


def flag_name(dest: str) -> str:
    """The command-line flag of a namespace dest / config identity field (as messages name it)."""
    return _FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))
