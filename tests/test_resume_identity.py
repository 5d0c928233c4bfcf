"""Issue 26 item 4: a resume keeps every setting that changes the trajectory. The identity comes
from the typed configs (the Python API and the command line alike); each of its fields, changed
alone, is refused naming the flag with its saved and current values; the schedule may change on
purpose with Megatron-LM's --override-opt_param-scheduler, recorded in args.json."""

import json
import os

import pytest

from megatron_aligndistil.config import RolloutConfig, TrainingConfig
from megatron_aligndistil.train import get_method
from megatron_aligndistil.train.arguments import build_parser, parse_args
from megatron_aligndistil.train.checkpointing import (
    LAYOUT_FIELDS,
    RUN_FILE,
    SCHEDULE_FIELDS,
    CheckpointError,
    check_resumable,
    flag_name,
)

BASE = ["--load", "p", "--save", "s", "--data-path", "d", "--global-batch-size", "8", "--seq-length", "16",
        "--lr", "1e-3", "--train-iters", "4"]
ARGV = {
    "aligndistil": ["aligndistil"] + BASE + ["--dpo-load", "a", "--rev-load", "b", "--rollout", "on-policy",
                                             "--constant-alpha", "1.5", "--plausibility-threshold", "0.1"],
    "dpo": ["dpo"] + BASE + ["--ref-load", "r"],
    "sft": ["sft"] + BASE,
}


def identity_of(argv):
    """The trainer's run identity for a command line, built as the Python API builds a trainer
    (typed configs, no flags namespace), without a launch."""
    from megatron_aligndistil.train.loop import Trainer

    args = parse_args(argv)
    method = get_method(args.method).from_args(args)
    rollout = RolloutConfig.from_args(args, [7]) if method.on_policy else None
    return Trainer(TrainingConfig.from_args(args), method, rollout).run_identity()


def _other(value):
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if value is None:
        return 0.25
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, list):
        return value + [99]
    return value + "_other"


def _saved(tmp_path, identity):
    ckpt = tmp_path / "iter_0000002"
    ckpt.mkdir(exist_ok=True)
    (ckpt / RUN_FILE).write_text(json.dumps(identity))
    return str(ckpt)


@pytest.mark.parametrize("method", sorted(ARGV))
def test_every_identity_field_changed_alone_is_refused(method, tmp_path):
    ident = identity_of(ARGV[method])
    ckpt = _saved(tmp_path, ident)
    assert check_resumable(ident, "s", ckpt) == {}
    options = {s for a in build_parser()._subparsers._group_actions[0].choices[method]._actions for s in a.option_strings}
    for key, value in ident.items():
        if key != "method":
            assert flag_name(key).split(" ")[0] in options, key  # every field names a real flag
        changed = dict(ident, **{key: _other(value)})
        with pytest.raises(CheckpointError) as exc:
            check_resumable(changed, "s", ckpt)
        saved, now = json.loads(json.dumps([value, _other(value)]))
        assert f"{flag_name(key)} {saved} (saved) vs {now} (now)" in str(exc.value), key
        hint = ("relaunch with the saved layout" if key in LAYOUT_FIELDS else "add --override-opt_param-scheduler"
                if key in SCHEDULE_FIELDS else "give a new --save directory")  # the one hint for this kind
        assert str(exc.value).count(". ") >= 1 and hint in str(exc.value), (key, str(exc.value))
        if key in SCHEDULE_FIELDS:
            assert "--override-opt_param-scheduler" in str(exc.value)
            assert check_resumable(changed, "s", ckpt, override_schedule=True) == {key: [saved, now]}
        else:
            with pytest.raises(CheckpointError):
                check_resumable(changed, "s", ckpt, override_schedule=True)


def test_the_identity_holds_what_the_issue_lists():
    """The settings that change a trajectory (issue 26 item 4), all in the identity."""
    want = {"lr", "min_lr", "lr_warmup_fraction", "lr_decay_style", "weight_decay", "clip_grad", "global_batch_size",
            "seq_length", "seed", "r", "eps", "beta0", "token_weight", "kl_direction", "constant_alpha",
            "tvd_without_half", "plausibility_threshold", "rollout", "rollout_engine", "max_new_tokens", "temperature",
            "top_p", "top_k", "stop_token_ids", "dpo_load", "rev_load", "load", "data_path", "bf16", "train_iters"}
    assert want <= set(identity_of(ARGV["aligndistil"]))
    assert {"dpo_beta", "reverse", "ref_load"} <= set(identity_of(ARGV["dpo"]))


def test_older_checkpoints_compare_what_they_saved(tmp_path):
    """A run.json of an older version (fewer fields, DPO's default reference saved as None) resumes."""
    ident = identity_of(ARGV["dpo"][:-2])  # no --ref-load: the reference is --load
    old = {k: ident[k] for k in ("method", "load", "data_path", "tensor_model_parallel_size")} | {"ref_load": None}
    assert check_resumable(ident, "s", _saved(tmp_path, old)) == {}


def test_a_changed_lr_resumes_only_on_purpose(tmp_path):
    """End to end: --lr changed on resume is refused; with --override-opt_param-scheduler the run
    goes on with the new schedule and args.json records the change."""
    from train_fixtures import aligndistil_argv, launch_train, make_aligndistil_setup, run_train

    from megatron_aligndistil.testing import run_distributed
    from megatron_aligndistil.train.metrics import read_metrics

    setup = make_aligndistil_setup(str(tmp_path / "models"), num_layers=2)
    save = str(tmp_path / "run")
    first = aligndistil_argv(setup, save, "--save-interval", "2", "--exit-interval", "2", "--no-export", iters=4)
    assert run_distributed(run_train, 1, args=(first,), timeout=300) == [0]
    changed = aligndistil_argv(setup, save, "--lr", "2e-3", "--no-export", iters=4)
    r = launch_train(changed)
    assert r.returncode == 2 and "--lr 0.001 (saved) vs 0.002 (now)" in r.stderr, r.stderr[-2000:]
    assert "add --override-opt_param-scheduler" in r.stderr
    assert run_distributed(run_train, 1, args=(changed + ["--override-opt_param-scheduler"],), timeout=300) == [0]
    metrics = read_metrics(os.path.join(save, "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]
    # cosine from the new max 2e-3 to --min-lr 1e-4 over 4 steps, no warmup (int(0.2 x 4) = 0): step 2 of 4
    assert metrics[2]["lr"] == pytest.approx(1e-4 + (2e-3 - 1e-4) * 0.5)
    history = json.load(open(os.path.join(save, "args.json")))["resume_history"]
    assert history == [{"iteration": 2, "overridden_identity": {"lr": [0.001, 0.002]},
                        "changed_flags": {"lr": [0.001, 0.002], "override_opt_param_scheduler": [False, True],
                                          "save_interval": [2, None], "exit_interval": [2, None]}}]


# config fields a resume may change, and why each leaves the trajectory alone
_NOT_IDENTITY = {
    "save": "where the run is written", "save_interval": "when checkpoints are written",
    "exit_interval": "when this launch stops", "log_interval": "console lines only", "no_export": "after training",
    "no_progress": "console only", "tensorboard_dir": "logging only", "wandb_project": "logging only",
    "wandb_exp_name": "logging only", "wandb_save_dir": "logging only",
    "override_opt_param_scheduler": "the permission to change the schedule on resume itself",
    "micro_batch_size": "trajectories equal at micro-batch 1/2/4 (test_train_aligndistil.py)",
    "pack_sequences": "packed equals unpacked (test_packing.py)",
    "recompute_granularity": "recomputation gives the same values", "recompute_method": "same",
    "recompute_num_layers": "same", "sequence_parallel": "same values (test_train_aligndistil.py)",
    "transformer_impl": "the same math on another kernel (a resume on a GPU machine)",
    "offload_frozen_models": "where frozen weights wait, not their values (test_offload.py)",
    "chunk_size": "vocab chunks of the same sum", "compile": "fused kernels of the same loss",
    "gpu_memory_utilization": "vLLM's memory share", "max_logp_diff": "a guard's threshold",
    "mismatch_action": "what the guard does", "seed": "rollout.sampling.seed: the run's --seed, in the identity",
    "moe_token_dispatcher_type": "how tokens travel to their experts, not which (no token dropping)",
}
_IDENTITY_NAME = {"direction": "kl_direction", "tvd_half": "tvd_without_half", "beta": "dpo_beta",
                  "engine": "rollout_engine", "stop_ids": "stop_token_ids", "data_path": "data_path"}


@pytest.mark.parametrize("method", sorted(ARGV))
def test_every_config_field_is_in_the_identity_or_named_as_harmless(method):
    """Generated from the dataclasses: a field added to a config, or dropped from an identity(),
    fails here until it is in the identity or named above with the reason a resume may change it."""
    import dataclasses

    args = parse_args(ARGV[method])
    configs = [TrainingConfig.from_args(args)]
    m = get_method(method).from_args(args)
    configs += [v for v in vars(m).values() if dataclasses.is_dataclass(v)]
    if m.on_policy:
        rollout = RolloutConfig.from_args(args, [7])
        configs += [rollout, rollout.sampling]
    identity = identity_of(ARGV[method])
    missing = []
    for config in configs:
        for f in dataclasses.fields(config):
            key = _IDENTITY_NAME.get(f.name, f.name)
            if dataclasses.is_dataclass(getattr(config, f.name)):
                continue  # its own fields are checked (rollout.sampling)
            if key not in identity and f.name not in _NOT_IDENTITY:
                missing.append(f"{type(config).__name__}.{f.name}")
    assert not missing, f"fields a resume could change silently: {missing}"
    assert [k for k in _NOT_IDENTITY if k in identity and k != "seed"] == []  # an excuse for a field it checks


@pytest.mark.parametrize("method", sorted(ARGV))
def test_identity_values_are_the_flags_values(method):
    """Each identity entry keyed by a flag holds that flag's value (paths resolved): an entry
    computed wrongly (``tvd_without_half`` from ``tvd_half``) would compare two wrong values and
    pass the refusal tests, while the message and args.json misreport the run."""
    for extra in ([], ["--tvd-without-half", "--kl-direction", "forward", "--no-shuffle", "--bf16"]):
        argv = ARGV[method] + (extra if method == "aligndistil" else extra[-2:])
        args = parse_args(argv)
        identity = identity_of(argv)
        checked = 0
        for key, value in identity.items():
            if key == "stop_token_ids" or not hasattr(args, key):
                continue
            want = getattr(args, key)
            if key.endswith(("load", "data_path")) and want is not None:
                want = os.path.realpath(want)
            assert value == want, (key, value, want)
            checked += 1
        assert checked >= len(identity) - 1
