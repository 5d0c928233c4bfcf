"""Issue 28: the teacher pre-flight's verdict at its boundaries, the tool's input errors, and the
--recipe preset (the end-to-end pre-flight runs on the quickstart's teachers in test_quickstart.py)."""

import os
import sys

import pytest

from megatron_aligndistil.eval.preflight import PreflightLimits, verdict

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def _result(length=10.0, eos=1.0, diff=(0.0, -0.1, 0.1), dpo_length=10.0, dpo_eos=1.0):
    return {"dpo": {"response_len_mean": dpo_length, "eos_rate": dpo_eos},
            "teacher": {"response_len_mean": length, "eos_rate": eos},
            "teacher_minus_dpo": dict(zip(("mean", "lo", "hi"), diff))}


@pytest.mark.parametrize("case,expected", [
    ({}, "pass"),
    ({"length": 13.0}, "pass"),  # exactly 1.3x: allowed
    ({"length": 13.000001}, "fail"),  # just above
    ({"eos": 0.9}, "pass"),  # exactly 0.9x the DPO model's EOS rate: allowed
    ({"eos": 0.8999999}, "fail"),
    ({"eos": 0.0, "dpo_eos": 0.0}, "pass"),  # neither ends: not the teacher's fault
    ({"diff": (-0.01, -0.05, 0.0)}, "warn"),  # worse, the interval reaches 0
    ({"diff": (-0.01, -0.05, -1e-9)}, "fail"),  # surely worse
    ({"diff": (0.0, 0.0, 0.0)}, "pass"),  # level
    ({"diff": (-0.01, -0.05, 0.03), "length": 20.0}, "fail"),  # degenerate beats warn
    ({"diff": (float("nan"), float("nan"), float("nan"))}, "fail"),
])
def test_verdict_at_its_boundaries(case, expected):
    level, reasons = verdict(_result(**case))
    assert level == expected, reasons
    assert bool(reasons) == (expected != "pass")


def test_verdict_limits_are_settable():
    assert verdict(_result(length=15.0), PreflightLimits(max_length_ratio=1.5))[0] == "pass"
    assert verdict(_result(eos=0.5), PreflightLimits(min_eos_ratio=0.5))[0] == "pass"
    level, reasons = verdict(_result(length=27.0, eos=0.2))  # the collapse: 2.7x, rarely ends
    assert level == "fail" and len(reasons) == 2 and "2.70x as long" in reasons[0] and "ends 20%" in reasons[1]


@pytest.mark.parametrize("argv,message", [
    (["--dpo-load", "a", "--prompts", "p"], "give exactly one of --rev-load"),
    (["--dpo-load", "a", "--rev-load", "b", "--ref-load", "c", "--prompts", "p"], "give exactly one of --rev-load"),
    (["--dpo-load", "a", "--ref-load", "c", "--prompts", "p"], "--ref-load (vanilla teacher) needs --constant-alpha"),
    (["--dpo-load", "a", "--rev-load", "b", "--prompts", "p", "--judge", "none"], "--judge none needs --reward-model"),
    (["--dpo-load", "a", "--rev-load", "b", "--prompts", "p", "--samples-per-prompt", "0"],
     "--samples-per-prompt must be >= 1 (got 0)"),
    (["--dpo-load", "a", "--rev-load", "b", "--prompts", "p", "--tvd-scale", "-1"], "needs r >= 0"),
    (["--dpo-load", "a", "--rev-load", "b", "--prompts", "p", "--plausibility-threshold", "1"],
     "plausibility_threshold must be in (0, 1)"),
])
def test_preflight_tool_input_errors(argv, message, capsys):
    sys.path.insert(0, TOOLS)
    import teacher_preflight

    with pytest.raises(SystemExit) as exc:
        teacher_preflight.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


BASE = ["aligndistil", "--load", "p", "--save", "s", "--data-path", "d", "--global-batch-size", "8", "--seq-length",
        "16", "--lr", "1e-3", "--dpo-load", "a", "--rev-load", "b"]


@pytest.mark.parametrize("extra,r,tau", [
    ([], 15.0, None),  # the paper's defaults
    (["--recipe", "paper"], 15.0, None),
    (["--recipe", "guarded"], 5.0, 0.1),
    (["--recipe", "guarded", "--tvd-scale", "8"], 8.0, 0.1),  # a flag given explicitly wins
    (["--recipe", "guarded", "--r=15"], 15.0, 0.1),  # even at the paper's value
    (["--recipe", "guarded", "--plausibility-threshold", "0.3"], 5.0, 0.3),
    (["--r", "3", "--recipe=guarded"], 3.0, 0.1),  # order does not matter
])
def test_recipe_sets_what_no_flag_sets(extra, r, tau):
    from megatron_aligndistil.train.arguments import RECIPES, parse_args

    args = parse_args(BASE + extra)
    assert (args.r, args.plausibility_threshold) == (r, tau)
    assert set(RECIPES) == {"paper", "guarded"} and RECIPES["paper"] == ()
    # the recipe's values land in the loss config the trainer builds
    from megatron_aligndistil.config import AlignDistilLossConfig

    loss = AlignDistilLossConfig.from_args(args)
    assert (loss.r, loss.plausibility_threshold) == (r, tau)
