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


def test_degeneracy_is_judged_against_sft_when_given():
    """The DPO model itself may have lost the format (likelihood displacement): with the SFT model,
    a teacher as long and as rarely ending as that DPO model fails; without it, it passes."""
    broken = _result(length=30.0, eos=0.3, dpo_length=30.0, dpo_eos=0.3)
    assert verdict(broken)[0] == "pass"
    broken["sft"] = {"response_len_mean": 21.0, "eos_rate": 1.0}
    level, reasons = verdict(broken)
    assert level == "fail" and "1.43x as long as the SFT model's" in reasons[0] and "the SFT model 100%" in reasons[1]
    assert "the DPO model itself degenerates against SFT" in reasons[2]
    fine = _result(length=21.0 * 1.3, eos=0.9, dpo_length=30.0, dpo_eos=0.3)
    fine["sft"] = {"response_len_mean": 21.0, "eos_rate": 1.0}
    assert verdict(fine)[0] == "pass"  # at both limits against SFT, though far from the broken DPO model


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
    (["--dpo-load", "a", "--rev-load", "b", "--prompts", "p", "--tvd-scale", "-1"], "--tvd-scale (--r) -1.0 is out of range [0, inf)"),
    (["--dpo-load", "a", "--rev-load", "b", "--prompts", "p", "--plausibility-threshold", "1"],
     "--plausibility-threshold 1.0 is out of range (0, 1)"),
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


# ----------------------------------------------------------------------------- on real (tiny) models
PROMPTS = ["Describe the red fox.", "Say owl three times.", "Which word is last: cat, red, owl?", "Put fox before blue."]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def teachers(tmp_path_factory, request):
    """Two tiny random Qwen2 models with the gold world's tokenizer (the "DPO" and "reverse" teachers;
    tied and untied embeddings, 448 rows for a 400-id tokenizer, as real Qwen pads its vocabulary)."""
    import json

    from hf_fixtures import tiny_hf_model
    from megatron_aligndistil.convert.hf import convert_hf_to_megatron
    from megatron_aligndistil.data.synthetic import train_tokenizer
    from megatron_aligndistil.eval.world import corpus

    root = tmp_path_factory.mktemp("preflight")
    tok = train_tokenizer(corpus(), vocab_size=400)
    out = {}
    for name, seed in (("dpo", 3), ("rev", 4)):
        model = tiny_hf_model("qwen2", tied=request.param, vocab_size=448, seed=seed)
        model.config.eos_token_id = tok.eos_token_id
        model.save_pretrained(root / f"hf_{name}")
        tok.save_pretrained(root / f"hf_{name}")
        out[name] = convert_hf_to_megatron(str(root / f"hf_{name}"), str(root / name), progress=False)
        out[f"hf_{name}"] = str(root / f"hf_{name}")
    with open(root / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"instruction": p}) + "\n" for p in PROMPTS)
    out["prompts"] = str(root / "prompts.jsonl")
    return out


def _teacher_on_ranks(paths, tp, pp, loss_kwargs):
    """On each rank: the pre-flight's token statistics on fixed responses, its teacher samples, and
    (alpha-0 check) the DPO model's own samples from the plain KV-cached sampler."""
    from megatron_aligndistil.config import AlignDistilLossConfig, SamplingParams
    from megatron_aligndistil.eval.policy_eval import EvalSettings, PolicyEvaluator, load_prompts
    from megatron_aligndistil.eval.preflight import sample_teacher, teacher_token_stats
    from megatron_aligndistil.generation import generate
    from megatron_aligndistil.core.lockstep import LockstepStage

    settings = EvalSettings(samples_per_prompt=2, sampling=SamplingParams(max_new_tokens=5, seed=7), batch_size=3,
                            greedy=False)
    ev = PolicyEvaluator(load_prompts(paths["prompts"]), lambda p, r: 0.0, settings, tokenizer_path=paths["dpo"],
                         tp=tp, pp=pp)
    stage = LockstepStage(ev._build(paths["dpo"]), {"other": ev._build(paths["rev"])}, policy_role="dpo").eval()
    cfg = AlignDistilLossConfig(token_weight="none", **loss_kwargs)
    pairs = [(p, [(7 * i + j) % 390 + 5 for j in range(3 + i)]) for i, p in enumerate(ev.prompts)]
    stats = teacher_token_stats(ev, stage, pairs, cfg)
    samples = sample_teacher(ev, stage, cfg, stop_ids=[ev.tokenizer.eos_token_id])
    plain = generate(stage.policy, [ev.prompts[i] for i, _ in sorted(samples)],
                     SamplingParams(max_new_tokens=5, seed=7, stop_ids=(ev.tokenizer.eos_token_id,)), ev.vocab_size,
                     sequence_ids=[i * 2 + k for i, k in sorted(samples)])
    whole = None
    if tp == pp == 1 and "r" in loss_kwargs:  # the whole pre-flight, the DPO model standing in for SFT too
        from megatron_aligndistil.eval.preflight import preflight

        whole = preflight(ev, paths["dpo"], paths["rev"], cfg, target_alpha=0.6, sft_load=paths["dpo"])
    return stats, {k: v["response_ids"] for k, v in samples.items()}, [r["response_ids"] for r in plain], pairs, \
        ev.vocab_size, whole


def _dense_stats(paths, pairs, vocab_size, loss_kwargs):
    """The same statistics from the HF models, full vocabulary rows, float64."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_aligndistil.config import AlignDistilLossConfig
    from megatron_aligndistil.loss.aligndistil import dense_teacher
    from test_generation import _reference_choices

    cfg = AlignDistilLossConfig(token_weight="none", **loss_kwargs)
    models = [AutoModelForCausalLM.from_pretrained(paths[f"hf_{n}"], dtype=torch.float64).eval() for n in ("dpo", "rev")]
    tvd = alpha = tokens = 0.0
    with torch.no_grad():
        for prompt, response in pairs:
            ids = torch.tensor([prompt + response])
            z = [m(ids).logits[0, len(prompt) - 1: -1, :vocab_size] for m in models]
            _, a, t = dense_teacher(z[0], z[1], cfg)
            tvd, alpha, tokens = tvd + float(t.sum()), alpha + float(a.sum()), tokens + len(response)
    return tvd / tokens, alpha / tokens, tokens


@pytest.mark.parametrize("layout,world", [((1, 1), 1), ((2, 1), 2), ((1, 2), 2)], ids=["tp1", "tp2", "pp2"])
def test_teacher_statistics_and_samples_at_every_layout(teachers, layout, world):
    """The pre-flight's mean TVD / alpha equal a dense float64 reference on the HF models; at alpha 0
    the teacher samples exactly the DPO model's tokens (the lockstep, uncached sampler against the
    plain KV-cached one); TP2 and PP2 sample the same teacher tokens as TP1."""
    from megatron_aligndistil.testing import run_distributed

    # random tiny models are near-uniform (TVD ~1e-2): a large r and a small tau make the teacher differ
    # from the DPO model and the guard act on part of the vocabulary
    guarded = {"r": 200.0, "plausibility_threshold": 0.002}
    got = run_distributed(_teacher_on_ranks, world, args=(teachers, *layout, guarded), timeout=600)
    stats, samples, _, pairs, vocab_size, whole = got[0]
    tvd, alpha, tokens = _dense_stats(teachers, pairs, vocab_size, guarded)
    assert stats["tokens"] == tokens and abs(stats["tvd_mean"] - tvd) < 1e-5 and abs(stats["alpha_mean"] - alpha) < 1e-4
    assert all(g[1] == samples for g in got)  # every rank holds every sample
    zero = run_distributed(_teacher_on_ranks, world, args=(teachers, *layout, {"constant_alpha": 0.0}), timeout=600)
    _, samples0, plain, _, _, _ = zero[0]
    assert [samples0[k] for k in sorted(samples0)] == plain
    if layout != (1, 1):
        ref = run_distributed(_teacher_on_ranks, 1, args=(teachers, 1, 1, guarded), timeout=600)
        assert ref[0][1] == samples
    else:  # each sample's first token is a draw from softmax(z*) of the HF models, with the sampler's seed
        assert _dense_first_tokens(teachers, guarded, vocab_size, sorted(samples)) == \
            [samples[k][0] for k in sorted(samples)]
        assert [samples[k] for k in sorted(samples)] != zero[0][2]  # the guarded teacher is not the DPO model
        # preflight() as a whole: the SFT stand-in samples what the DPO model samples; the teacher's
        # samples are sample_teacher's; the statistics are on the DPO model's own samples
        assert whole["sft"]["sample_response_ids"] == whole["dpo"]["sample_response_ids"]
        assert whole["teacher"]["gold"]["n"] == len(PROMPTS) and whole["token_stats"]["tokens"] > 0
        assert whole["r_for_target_alpha"] == pytest.approx((0.6 - 1e-3) / whole["token_stats"]["tvd_mean"])
        assert whole["teacher_minus_dpo"]["mean"] == 0  # the judge gives 0 to everything


def _dense_first_tokens(paths, loss_kwargs, vocab_size, jobs):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_aligndistil.config import AlignDistilLossConfig
    from megatron_aligndistil.loss.aligndistil import dense_teacher
    from test_generation import _reference_choices

    cfg = AlignDistilLossConfig(token_weight="none", **loss_kwargs)
    tok = AutoTokenizer.from_pretrained(paths["hf_dpo"])
    models = [AutoModelForCausalLM.from_pretrained(paths[f"hf_{n}"], dtype=torch.float64).eval() for n in ("dpo", "rev")]
    items = [json.loads(line)["instruction"] for line in open(paths["prompts"])]
    out = []
    with torch.no_grad():
        for i, k in jobs:
            ids = tok.apply_chat_template([{"role": "user", "content": items[i]}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            z = [m(ids).logits[0, -1, :vocab_size].float() for m in models]
            z_star = torch.full((448,), float("-inf"))
            z_star[:vocab_size] = dense_teacher(z[0][None], z[1][None], cfg)[0][0]
            out += _reference_choices(torch.softmax(z_star, -1)[None], [7 * 1_000_003 + (i * 2 + k) * 7_919])
    return out
