"""Issue 17: typed configs built from the flags and checked where they are built."""

import dataclasses

import pytest

from megatron_aligndistil.config import (
    AlignDistilLossConfig,
    ConfigError,
    DPOConfig,
    RolloutConfig,
    SamplingParams,
    TrainingConfig,
)
from megatron_aligndistil.train.arguments import build_parser, parse_args

BASE = ["--load", "p", "--save", "s", "--data-path", "d", "--global-batch-size", "8", "--seq-length", "16",
        "--lr", "1e-3"]


@pytest.mark.parametrize("method,extra", [("sft", []), ("dpo", []),
                                          ("aligndistil", ["--dpo-load", "a", "--rev-load", "b"])])
def test_every_config_field_comes_from_a_flag(method, extra):
    """A field whose name is not a flag's dest would silently keep its default."""
    args = parse_args([method] + BASE + extra + ["--micro-batch-size", "2", "--pack-sequences",
                                                 "--transformer-impl", "local", "--min-lr", "1e-4"])
    dests = set(vars(args))
    missing = [f.name for f in dataclasses.fields(TrainingConfig) if f.name not in dests]
    assert not missing, missing
    cfg = TrainingConfig.from_args(args)
    assert (cfg.micro_batch_size, cfg.pack_sequences, cfg.transformer_impl, cfg.min_lr) == (2, True, "local", 1e-4)
    if method == "aligndistil":
        loss = AlignDistilLossConfig.from_args(parse_args([method] + BASE + extra + [
            "--tvd-scale", "10", "--tvd-without-half", "--loss-compile", "off", "--kl-direction", "forward",
            "--plausibility-threshold", "0.1"]))
        assert (loss.r, loss.tvd_half, loss.compile, loss.direction, loss.plausibility_threshold) == \
            (10.0, False, False, "forward", 0.1)
        rollout = RolloutConfig.from_args(parse_args([method] + BASE + extra + ["--top-p", "0.9"]), [7])
        assert rollout.engine == "megatron" and rollout.sampling.top_p == 0.9 and rollout.sampling.stop_ids == (7,)
        assert (rollout.max_logp_diff, rollout.mismatch_action, rollout.gpu_memory_utilization) == (None, "error", None)
        rollout = RolloutConfig.from_args(parse_args([method] + BASE + extra + [
            "--rollout", "on-policy", "--rollout-engine", "vllm", "--max-rollout-logp-diff", "0.02",
            "--rollout-mismatch", "warn", "--vllm-gpu-memory-utilization", "0.3"]), [7])
        assert (rollout.engine, rollout.max_logp_diff, rollout.mismatch_action, rollout.gpu_memory_utilization) == \
            ("vllm", 0.02, "warn", 0.3)
    if method == "dpo":
        assert DPOConfig.from_args(parse_args([method] + BASE + ["--reverse", "--dpo-beta", "0.2"])) == \
            DPOConfig(beta=0.2, reverse=True)


@pytest.mark.parametrize("make,match", [
    (lambda: AlignDistilLossConfig(eps=0.0), "eps > 0"),
    (lambda: AlignDistilLossConfig(token_weight="beta"), "token_weight must be one of"),
    (lambda: AlignDistilLossConfig(direction="sideways"), "direction must be one of"),
    (lambda: AlignDistilLossConfig(constant_alpha=0.0), "constant_alpha=0.0 must be > 0"),
    (lambda: AlignDistilLossConfig(plausibility_threshold=1.0), "plausibility_threshold must be in"),
    (lambda: DPOConfig(beta=0.0), "dpo_beta must be > 0"),
    (lambda: SamplingParams(top_p=0.0), "top_p must be in"),
    (lambda: SamplingParams(temperature=-1.0), "temperature must be >= 0"),
    (lambda: RolloutConfig(engine="sglang"), "rollout engine must be one of"),
    (lambda: RolloutConfig(max_logp_diff=0.0), "max_logp_diff must be > 0"),
    (lambda: RolloutConfig(mismatch_action="ignore"), "mismatch_action must be one of"),
    (lambda: TrainingConfig("p", "s", "d", global_batch_size=8, seq_length=16, lr=1e-5, min_lr=1e-4),
     "--min-lr 0.0001 must not exceed --lr"),
    (lambda: TrainingConfig("p", "s", "d", global_batch_size=8, seq_length=16, lr=1e-5, micro_batch_size=3),
     "not a multiple of --micro-batch-size 3"),
], ids=["eps", "weight", "direction", "alpha", "tau", "dpo_beta", "top_p", "temperature", "engine", "logp_diff",
        "mismatch_action", "min_lr", "mbs"])
def test_configs_refuse_bad_values_naming_the_field(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_the_parser_reports_config_errors_as_flag_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser()  # the parser itself builds
        parse_args(["sft"] + BASE + ["--micro-batch-size", "3"])
    assert exc.value.code == 2
    assert "--global-batch-size 8 is not a multiple of --micro-batch-size 3" in capsys.readouterr().err


def test_transformer_engine_on_request_without_cuda_is_a_clear_error():
    import torch

    from megatron_aligndistil.core.errors import UserError
    from megatron_aligndistil.models.qwen import use_transformer_engine

    assert use_transformer_engine("local") is False
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--transformer-impl transformer_engine needs CUDA"):
            use_transformer_engine("transformer_engine")


AD = ["aligndistil"] + BASE + ["--dpo-load", "a", "--rev-load", "b"]


@pytest.mark.parametrize("flag", [["--vllm-gpu-memory-utilization", "0.4"], ["--max-rollout-logp-diff", "0.1"],
                                  ["--rollout-mismatch", "warn"]], ids=["gpu_memory", "logp_diff", "mismatch"])
@pytest.mark.parametrize("run", [[], ["--rollout", "on-policy"], ["--rollout-engine", "vllm"]],
                         ids=["off-policy", "megatron-engine", "vllm-off-policy"])
def test_vllm_flags_on_a_run_without_vllm_are_refused(flag, run, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(AD + run + flag)
    assert exc.value.code == 2
    assert f"{flag[0]} only act with --rollout on-policy --rollout-engine vllm" in capsys.readouterr().err
    parse_args(AD + ["--rollout", "on-policy", "--rollout-engine", "vllm"] + flag)  # where vLLM samples: taken


@pytest.mark.parametrize("value,ok", [("0", False), ("-1e-3", False), ("nan", False), ("1e-12", True)])
def test_max_rollout_logp_diff_at_its_boundary(value, ok, capsys):
    argv = AD + ["--rollout", "on-policy", "--rollout-engine", "vllm", f"--max-rollout-logp-diff={value}"]
    if ok:
        assert parse_args(argv).max_rollout_logp_diff == float(value)
        return
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert f"--max-rollout-logp-diff {float(value)} is out of range (0, inf)" in capsys.readouterr().err


# flags that are not configuration of the trained run: where they go instead
_NOT_CONFIG = {
    "help": "argparse",
    "dry_run": "selects train/plan.py instead of training",
    "world_size": "--dry-run only",
    "model_config": "--dry-run only",
    "rollout_batch_size": "validated equal to --global-batch-size (one step per rollout)",
}
# a value per type where the generic rule (default + 1, default / 2, 0.5) is out of the flag's range
_VALUES = {"min_lr": "1e-4", "micro_batch_size": "2", "global_batch_size": "16", "tensor_model_parallel_size": "2",
           "pipeline_model_parallel_size": "2", "vllm_gpu_memory_utilization": "0.3", "stop_token_ids": ["5", "6"]}


def _method_parsers():
    return build_parser()._subparsers._group_actions[0].choices


def _value_for(action, current):
    """A valid command-line value for ``action`` other than ``current`` (its value in the base
    command line), generated from its type and choices."""
    if action.dest in _VALUES:
        value = _VALUES[action.dest]
        return value if isinstance(value, list) else [value]
    if action.nargs == 0:  # store_true
        return []
    if action.choices:
        return [action.choices[-1] if action.choices[-1] != current else action.choices[0]]
    if action.type is int:
        return [str((current or 1) + 1)]
    if action.type is float:
        return [str(current / 2 if current else 0.5)]
    return [f"/x/{action.dest}"]


def _flatten(prefix, value, out):
    """Dataclasses and dicts down to their leaves: {"rollout.sampling.seed": 1234, ...}."""
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, list) and any(dataclasses.is_dataclass(v) for v in value):
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = value
    return out


def _configs(args):
    """Every typed config a run builds from ``args``, flattened to {dotted path: leaf value}."""
    from megatron_aligndistil.train import get_method

    method = get_method(args.method).from_args(args)
    out = _flatten("training", TrainingConfig.from_args(args), {})
    for name, value in vars(method).items():
        _flatten(f"method.{name}", value, out)
    if getattr(args, "rollout", None) == "on-policy":
        _flatten("rollout", RolloutConfig.from_args(args, args.stop_token_ids or [7]), out)
    return out


# config leaves that no flag sets, and why
_NO_FLAG = {
    "method.loss_config.chunk_size": "Python API only (vocab chunking of the loss; None = whole shard)",
}


@pytest.mark.parametrize("method", ["sft", "dpo", "aligndistil"])
def test_every_flag_reaches_a_config_field(method):
    """Generated from the parser: each flag, set alone to a non-default value, changes a field of
    the configs the run is built from (a flag that stops reaching its field is a flag that does
    nothing). The few flags that are not run configuration are named, with where they go."""
    base = [method] + BASE
    if method == "aligndistil":
        base += ["--dpo-load", "a", "--rev-load", "b", "--rollout", "on-policy", "--rollout-engine", "vllm"]
    base_args = parse_args(base)
    reference = _configs(base_args)
    untested, reached = [], set()
    for action in _method_parsers()[method]._actions:
        if action.dest in _NOT_CONFIG:
            continue
        flag = action.option_strings[0]
        extra = [flag, *_value_for(action, getattr(base_args, action.dest))]
        if action.dest == "sequence_parallel":
            extra += ["--tensor-model-parallel-size", "2"]
        virtual = action.dest in ("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank")
        if virtual:
            extra += ["--pipeline-model-parallel-size", "2"]
        argv = base + extra
        if action.dest == "rollout":  # off-policy: the vLLM-only flags of the base go with it
            argv = base + [flag, "off-policy", "--rollout-engine", "megatron"]
        if action.dest == "ref_load" and method == "aligndistil":  # the vanilla teacher, in --rev-load's place
            argv = [a for a in base if a not in ("--rev-load", "b")] + extra + ["--constant-alpha", "1.0"]
        configs = _configs(parse_args(argv))
        changed = {k for k, v in configs.items() if reference.get(k, v) != v or k not in reference}
        changed |= set(reference) - set(configs)  # fields the flag removes (off-policy: the rollout's)
        if action.dest == "sequence_parallel":
            changed.discard("training.tensor_model_parallel_size")
        if virtual:
            changed.discard("training.pipeline_model_parallel_size")
        if not changed:
            untested.append(flag)
        # a flag reaches every field that carries its name (--seed: training.seed and rollout.sampling.seed)
        namesakes = {k for k in reference if k.rsplit(".", 1)[-1] == action.dest}
        if namesakes - changed and action.dest not in ("rollout", "ref_load"):
            untested.append(f"{flag} (not {sorted(namesakes - changed)})")
        reached |= changed
    assert not untested, f"flags that reach no config field: {untested}"
    path_fields = {k for k in reference if k.endswith((".path", ".role", "_load"))}  # the frozen models' own
    unreached = set(reference) - reached - set(_NO_FLAG) - path_fields
    assert not unreached, f"config fields that no flag sets: {sorted(unreached)}"


def test_the_python_api_defaults_are_the_command_lines():
    """A config built in Python with its defaults equals the one the command line builds from the
    required flags alone: the library and the CLI train the same run by default (a dataclass
    default that drifted from its flag's, tvd_half False, survived every other test)."""
    required = dict(load="p", save="s", data_path="d", global_batch_size=8, seq_length=16, lr=1e-3)
    for method in ("sft", "dpo", "aligndistil"):
        extra = ["--dpo-load", "a", "--rev-load", "b"] if method == "aligndistil" else []
        args = parse_args([method] + BASE + extra)
        assert TrainingConfig.from_args(args) == TrainingConfig(**required), method
    args = parse_args(AD)
    assert AlignDistilLossConfig.from_args(args) == AlignDistilLossConfig()
    assert RolloutConfig.from_args(args, [7]) == RolloutConfig(sampling=SamplingParams(stop_ids=(7,)))
    assert DPOConfig.from_args(parse_args(["dpo"] + BASE)) == DPOConfig()


# ---- issue 29 item 2: one config source (core/flags.py) ----

def test_every_trainer_flag_is_generated_from_a_config_field():
    """Each flag of each method is a config field's (nothing hand-written beside the configs), and
    each flagged field of the method's configs is a flag, with help text."""
    from megatron_aligndistil.core.flags import dest_of, flags_of
    from megatron_aligndistil.train.arguments import CONFIGS

    for method, parser in build_parser()._subparsers._group_actions[0].choices.items():
        fields = {dest_of(f): spec for cls in CONFIGS[method] for f, spec in flags_of(cls)}
        dests = [a.dest for a in parser._actions if a.dest != "help"]
        assert sorted(dests) == sorted(fields), method  # same flags, none twice
        assert all(spec.help.strip() for spec in fields.values()), method


def test_a_flag_default_and_help_come_from_the_field():
    parser = build_parser()._subparsers._group_actions[0].choices["aligndistil"]
    action = {a.dest: a for a in parser._actions}
    assert action["r"].option_strings == ["--tvd-scale", "--r"] and action["r"].default == 15.0
    assert action["r"].type is float and "in [0, inf)" in action["r"].help
    assert action["tvd_without_half"].nargs == 0 and action["loss_compile"].choices == ["auto", "on", "off"]
    assert action["stop_token_ids"].nargs == "*" and action["stop_token_ids"].type is int
    assert action["seq_length"].required and action["seq_length"].default is None
    assert action["micro_batch_size"].default == 1 and "(default: 1)" in action["micro_batch_size"].help
    fields = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    assert fields["micro_batch_size"].default == 1  # the same value, written once


def test_the_loss_keyword_function_and_the_reference_take_the_configs_fields():
    """The SPEC's keyword form and the dense reference cannot drift from AlignDistilLossConfig:
    the same names with the same defaults; an unknown keyword is refused by both."""
    import inspect

    import torch

    from megatron_aligndistil.loss import vocab_parallel_aligndistil
    from megatron_aligndistil.loss.reference import dense_aligndistil

    params = inspect.signature(vocab_parallel_aligndistil).parameters
    keywords = {n: p.default for n, p in params.items()
                if n not in ("policy_logits", "dpo_logits", "rev_logits", "vocab_size", "group")}
    assert keywords == {f.name: f.default for f in dataclasses.fields(AlignDistilLossConfig)}
    z = torch.randn(2, 5)
    with pytest.raises(TypeError, match="tvd_scale"):
        dense_aligndistil(z, z, z, tvd_scale=5.0)
    with pytest.raises(TypeError, match="tvd_scale"):
        vocab_parallel_aligndistil(z, z, z, tvd_scale=5.0)
    with pytest.raises(ConfigError, match="eps > 0"):  # the reference checks like the loss
        dense_aligndistil(z, z, z, eps=0.0)
    assert torch.equal(dense_aligndistil(z, z, z, r=5.0)["alpha"],
                       dense_aligndistil(z, z, z, AlignDistilLossConfig(r=5.0))["alpha"])


def test_run_identity_keys_are_those_of_existing_checkpoints():
    """Generated from the fields' ``identity``: the keys and values must stay those written into
    run.json by earlier versions, or every saved run would refuse to resume."""
    loss = AlignDistilLossConfig(constant_alpha=1.5, tvd_half=False)
    assert loss.identity() == {"r": 15.0, "eps": 1e-3, "beta0": 0.1, "token_weight": "beta_t",
                               "kl_direction": "reverse", "constant_alpha": 1.5, "tvd_without_half": True,
                               "plausibility_threshold": None}
    assert DPOConfig(beta=0.2, reverse=True, ref_load="r").identity() == {"dpo_beta": 0.2, "reverse": True}
    rollout = RolloutConfig(sampling=SamplingParams(stop_ids=(7, 8), seed=5))
    assert rollout.identity() == {"rollout_engine": "megatron", "max_new_tokens": 1024, "temperature": 1.0,
                                  "top_p": 1.0, "top_k": 0, "stop_token_ids": [7, 8]}
    import os

    cfg = TrainingConfig("p", "s", "d", global_batch_size=8, seq_length=16, lr=1e-5)
    assert cfg.identity() == {
        "global_batch_size": 8, "seq_length": 16, "seed": 1234, "no_shuffle": False, "skip_bad_records": False,
        "lr": 1e-5, "min_lr": 0.0, "lr_warmup_fraction": 0.0, "lr_decay_style": "cosine", "weight_decay": 0.0,
        "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8, "clip_grad": 1.0, "bf16": False,
        "train_iters": None, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "num_layers_per_virtual_pipeline_stage": None, "num_virtual_stages_per_pipeline_rank": None,
        "use_distributed_optimizer": False, "load": os.path.realpath("p"), "data_path": os.path.realpath("d"),
        # added with MoE (issue 30): saved identities without them are not compared on these keys
        "expert_model_parallel_size": 1, "expert_tensor_parallel_size": None,
        "moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.0, "moe_router_dtype": None}


def test_flag_ranges_are_the_documented_ones():
    """The ranges themselves, written out (the edge tests derive their values from the fields, so
    a wrong bound would move the tests with it)."""
    from megatron_aligndistil.core.flags import ranges
    from megatron_aligndistil.train.arguments import CONFIGS

    shown = {dest: str(r) for dest, r in ranges(CONFIGS["aligndistil"] + CONFIGS["dpo"]).items()}
    assert shown == {
        **dict.fromkeys(("global_batch_size", "micro_batch_size", "tensor_model_parallel_size",
                         "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
                         "num_virtual_stages_per_pipeline_rank", "recompute_num_layers", "train_iters",
                         "save_interval", "exit_interval", "log_interval", "world_size", "rollout_batch_size",
                         "max_new_tokens", "expert_model_parallel_size", "expert_tensor_parallel_size"), "[1, inf)"),
        "seq_length": "[2, inf)", "seed": "[0, 4294967295]",
        **dict.fromkeys(("lr", "adam_eps", "eps", "beta0", "dpo_beta", "max_rollout_logp_diff"), "(0, inf)"),
        **dict.fromkeys(("min_lr", "weight_decay", "clip_grad", "r", "temperature", "top_k", "moe_aux_loss_coeff"),
                        "[0, inf)"),
        **dict.fromkeys(("lr_warmup_fraction", "adam_beta1", "adam_beta2"), "[0, 1)"),
        **dict.fromkeys(("top_p", "vllm_gpu_memory_utilization"), "(0, 1]"),
        "plausibility_threshold": "(0, 1)"}
