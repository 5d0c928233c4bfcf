"""Issue 30: Qwen3-MoE and Qwen2-MoE. Configs read with their sparse and dense layers; conversion
HF -> Megatron -> HF tensor-equal; the forward equal to transformers' at EP2, TP2 x EP2, PP2 x EP2,
expert-TP 1 under TP2 and expert-TP 2 without TP; greedy sampling in lockstep over EP; SFT, DPO and
AlignDistil iteration 1 equal to the float64 HF reference (AlignDistil at EP2 (DP2), TP2 x EP2,
PP2 x EP2 and EP2 packed, with the same 4-iteration trajectory and exported release at every
layout; DPO at EP2, TP2 x EP2 and PP2 x EP2; SFT at EP2); on-policy at EP2 as at EP1; the
balancing loss's weight and the routing metrics against the HF router; the guards at their
boundaries."""

import dataclasses
import json
import os

import pytest
import torch

from hf_fixtures import saved_state_dict, tiny_hf_model
from megatron_aligndistil.convert.mapping import hf_to_megatron, megatron_to_hf, megatron_tensor_count
from megatron_aligndistil.core.errors import UserError
from megatron_aligndistil.core.parallel import Layout
from megatron_aligndistil.models.qwen import ArchitectureError, QwenArch
from megatron_aligndistil.testing import megatron_logits, run_distributed
from megatron_aligndistil.train.metrics import read_metrics
from train_fixtures import (aligndistil_argv, dense_dpo, dense_first_iteration, dense_routing, dense_sft, dpo_argv,
                            launch_train, make_setup_with_pairs, run_train, sft_argv)

MOE_TYPES = ("qwen3_moe", "qwen2_moe")


def test_moe_configs_are_read_with_their_sparse_and_dense_layers():
    q3 = QwenArch.from_hf_config(tiny_hf_model("qwen3_moe").config)
    assert (q3.num_experts, q3.num_experts_per_tok, q3.moe_ffn_hidden_size, q3.norm_topk_prob) == (4, 2, 32, True)
    assert q3.moe_layers == (0, 1, 3) and q3.moe_layer_pattern() == [1, 1, 0, 1]  # mlp_only_layers [2]
    assert q3.qk_layernorm and not q3.qkv_bias and q3.shared_expert_ffn_hidden_size == 0
    q2 = QwenArch.from_hf_config(tiny_hf_model("qwen2_moe").config)
    assert q2.moe_layers == (0, 1, 2, 3) and q2.shared_expert_ffn_hidden_size == 48 and q2.qkv_bias
    assert not q2.norm_topk_prob and not q2.qk_layernorm
    # decoder_sparse_step 2: every second layer sparse (HF: (i + 1) % step == 0)
    cfg = dict(tiny_hf_model("qwen2_moe").config.to_dict(), decoder_sparse_step=2)
    assert QwenArch.from_hf_config(cfg).moe_layers == (1, 3)
    # the arch file of a MoE checkpoint reads back the same (moe_layers a JSON list)
    assert QwenArch(**json.loads(q3.to_json())) == q3
    dense = QwenArch.from_hf_config(tiny_hf_model("qwen3").config)
    assert not dense.is_moe and dense.moe_layer_pattern() == [0, 0, 0, 0]


@pytest.mark.parametrize("change,message", [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 exceeds num_experts 4"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok must be a positive integer, got 0"),
    ({"num_experts": 0}, "num_experts must be a positive integer, got 0"),
    ({"moe_intermediate_size": None}, "moe_intermediate_size must be a positive integer, got None"),
    ({"mlp_only_layers": [4]}, "mlp_only_layers [4] are not layers of the 4-layer model"),
    ({"mlp_only_layers": [0, 1, 2, 3]}, "no layer is sparse"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step must be a positive integer, got 0"),
    ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size must be a positive integer"),
], ids=["top_k", "top_k_0", "experts_0", "ffn", "dense_layer", "all_dense", "step", "shared"])
def test_bad_moe_configs_are_refused_naming_the_field(change, message):
    cfg = tiny_hf_model("qwen2_moe").config.to_dict()
    cfg.pop("num_local_experts", None)
    cfg.update(change)
    with pytest.raises(ArchitectureError, match=message.replace("[", r"\[").replace("]", r"\]")):
        QwenArch.from_hf_config(cfg)


def test_a_dense_model_type_with_experts_is_refused():
    cfg = dict(tiny_hf_model("qwen3").config.to_dict(), num_experts=8)
    with pytest.raises(ArchitectureError, match="a dense model type with experts"):
        QwenArch.from_hf_config(cfg)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_conversion_round_trip_is_tensor_equal(model_type, tmp_path):
    """Through the converter tools on disk (per-expert tensors, as the released checkpoints hold
    them): HF -> Megatron -> HF gives every tensor back bit for bit."""
    from safetensors.torch import load_file

    from hf_fixtures import save_tiny_hf
    from megatron_aligndistil.convert.hf import convert_hf_to_megatron, convert_megatron_to_hf

    hf_dir = str(tmp_path / "hf")
    save_tiny_hf(hf_dir, model_type, max_shard_size="10GB")
    mc = convert_hf_to_megatron(hf_dir, str(tmp_path / "mc"), progress=False)
    back = str(tmp_path / "back")
    convert_megatron_to_hf(mc, back, progress=False)
    original = {k: v for f in os.listdir(hf_dir) if f.endswith(".safetensors")
                for k, v in load_file(os.path.join(hf_dir, f)).items()}
    again = {k: v for f in os.listdir(back) if f.endswith(".safetensors")
             for k, v in load_file(os.path.join(back, f)).items()}
    assert sorted(again) == sorted(original) and any(".mlp.experts.3.down_proj" in k for k in original)
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name
    arch = QwenArch.from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))
    from megatron_aligndistil.core.store import TensorStore

    with TensorStore(mc) as store:
        assert len(store.keys()) == megatron_tensor_count(arch)


def _logits_and_gathered(cases):
    """One rank, per case: the logits, and whether gathering the loaded model's shards (over TP,
    expert-TP, EP and PP: the tests' gather, and the vLLM weight sync's view of the policy) gives
    every full tensor back."""
    from megatron_aligndistil.core import sharding
    from megatron_aligndistil.models import qwen
    from megatron_aligndistil.rollout.vllm import _PolicyWeights

    out = []
    for arch_fields, full, tokens in cases:
        arch = QwenArch(**arch_fields)
        model = qwen.build_model(arch, qwen.transformer_config(arch))
        sharding.load_full_state_dict(model, full)
        gathered = sharding.gather_full_state_dict(model)
        same = sorted(gathered) == sorted(full) and all(torch.equal(gathered[k], full[k]) for k in full)
        view = _PolicyWeights(model)  # every rank asks for every name, in the same order
        same = same and sorted(view.meta) == sorted(full) and all(torch.equal(view.get(k), full[k]) for k in sorted(full))
        out.append((megatron_logits(arch_fields, full, tokens), same))
    return out


def test_forward_equals_transformers_at_expert_layouts():
    """Both MoE families, fp32: the logits at each expert-parallel layout equal transformers' (the
    router's top-k and its renormalisation, the dense layer among sparse ones, the shared expert
    and its sigmoid gate); the loaded shards gather back to the full tensors, expert-TP 2 without
    TP included."""
    cases, refs = [], []
    for model_type in MOE_TYPES:
        hf = tiny_hf_model(model_type, vocab_size=1001, seed=1)
        arch = QwenArch.from_hf_config(hf.config)
        full = dict(hf_to_megatron(arch, saved_state_dict(hf).__getitem__))
        assert dict(megatron_to_hf(arch, full.__getitem__)).keys() == saved_state_dict(hf).keys()
        tokens = torch.randint(0, 1001, (2, 10), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            refs.append(hf(tokens).logits)
        cases.append((dataclasses.asdict(arch), full, tokens))
    for layout, world in ((Layout(ep=2), 2), (Layout(tp=2, ep=2), 4), (Layout(pp=2, ep=2), 4),
                          (Layout(tp=2, ep=2, etp=1), 4), (Layout(ep=2, etp=2), 4)):
        for rank_out in run_distributed(_logits_and_gathered, world, args=(cases,), layout=layout):
            for (got, gathered_back), ref in zip(rank_out, refs):
                assert gathered_back, layout
                if got is not None:  # the last pipeline stage
                    torch.testing.assert_close(got[..., :1001], ref, rtol=1e-5, atol=1e-5, msg=str(layout))


def _greedy_of_this_replica(cases, prompts_by_replica, limits_by_replica):
    """One rank, per case: greedy responses to its data-parallel replica's own prompts (other
    lengths and limits on each expert-parallel rank: they decode in lockstep)."""
    from megatron.core import parallel_state

    from megatron_aligndistil.config import SamplingParams
    from megatron_aligndistil.core import sharding
    from megatron_aligndistil.generation import generate
    from megatron_aligndistil.models import qwen

    replica = parallel_state.get_data_parallel_rank()
    out = []
    for arch_fields, full, _ in cases:
        arch = QwenArch(**arch_fields)
        model = qwen.build_model(arch, qwen.transformer_config(arch))
        sharding.load_full_state_dict(model, full)
        got = generate(model, prompts_by_replica[replica], SamplingParams(max_new_tokens=8, temperature=0.0),
                       arch.vocab_size, max_new_tokens=limits_by_replica[replica])
        out.append([r["response_ids"] for r in got])
    return replica, out


def test_greedy_sampling_at_expert_layouts_equals_transformers():
    """The Megatron sampler (KV cache) on both MoE families at EP2 (DP2) and TP2 x EP2: the two
    expert-parallel ranks hold prompts of other lengths and other limits (one rank's last step is
    far past the other's), decode in lockstep, and each response equals transformers' greedy."""
    cases, refs = [], []
    g = torch.Generator().manual_seed(5)
    prompts = [[torch.randint(0, 1001, (n,), generator=g).tolist() for n in lengths] for lengths in ((3, 9), (6, 2))]
    limits = [[8, 1], [3, 6]]
    for model_type in MOE_TYPES:
        hf = tiny_hf_model(model_type, vocab_size=1001, seed=1)
        arch = QwenArch.from_hf_config(hf.config)
        cases.append((dataclasses.asdict(arch), dict(hf_to_megatron(arch, saved_state_dict(hf).__getitem__)), None))
        refs.append([[hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):]
                      .tolist() for p, n in zip(ps, ns)] for ps, ns in zip(prompts, limits)])
    for layout, world in ((Layout(ep=2), 2), (Layout(tp=2, ep=2), 4)):
        for replica, per_case in run_distributed(_greedy_of_this_replica, world, args=(cases, prompts, limits),
                                                 layout=layout):
            for got, ref in zip(per_case, refs):
                assert got == ref[replica], (layout, replica)


def test_generate_tool_on_a_moe_checkpoint_equals_transformers(tmp_path):
    """tools/generate.py (the evaluator's sampler too) on a converted Qwen2-MoE checkpoint, two
    data-parallel ranks splitting the prompts: greedy outputs equal transformers'."""
    from hf_fixtures import save_tiny_hf
    from megatron_aligndistil.convert.hf import convert_hf_to_megatron
    from test_generation import _generate_tool

    hf = save_tiny_hf(tmp_path / "hf", "qwen2_moe")
    ckpt = convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mc"), progress=False)
    prompts = [[5, 17, 300], [9, 8, 7, 6, 5, 4, 3]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
    out = tmp_path / "out.json"
    argv = ["--load", ckpt, "--prompts", str(tmp_path / "p.jsonl"), "--out", str(out), "--greedy",
            "--max-new-tokens", "5", "--stop-token-ids", "2", "--generator", "moe"]
    assert run_distributed(_generate_tool, 2, args=(argv,)) == [0, 0]
    for p, got in zip(prompts, json.load(open(out))):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, eos_token_id=2, pad_token_id=0,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
        assert got["output"] == (ref[:ref.index(2)] if 2 in ref else ref)  # tokenized prompts: ids out


@pytest.fixture(scope="module")
def qwen3_moe_setup(tmp_path_factory):
    return make_setup_with_pairs(str(tmp_path_factory.mktemp("moe3")), model_type="qwen3_moe")


@pytest.fixture(scope="module")
def qwen2_moe_setup(tmp_path_factory):
    return make_setup_with_pairs(str(tmp_path_factory.mktemp("moe2")), model_type="qwen2_moe")


EP2 = ["--expert-model-parallel-size", "2"]
LAYOUTS = {"ep2": (EP2, 2), "tp2_ep2": (["--tensor-model-parallel-size", "2", "--sequence-parallel"] + EP2, 4),
           "pp2_ep2": (["--pipeline-model-parallel-size", "2"] + EP2, 4)}
# packed rows (issue 17): each rank packs its own records into its own number of micro-batches
# (rows of 20 positions: 3 and 2 at iteration 2)
PACKED = {"ep2_packed": (EP2 + ["--pack-sequences", "--micro-batch-size", "1", "--seq-length", "20"], 2)}


def _run(argv, world):
    assert run_distributed(run_train, world, args=(argv,), timeout=600) == [0] * world
    return read_metrics(os.path.join(argv[argv.index("--save") + 1], "metrics.jsonl"))


def _release(save):
    from megatron_aligndistil.core.store import TensorStore

    with TensorStore(os.path.join(save, "release")) as store:
        return {name: store.get(name) for name in store.keys()}


def test_aligndistil_on_qwen3_moe_matches_the_reference_at_every_expert_layout(qwen3_moe_setup, tmp_path):
    """Policy and both teachers MoE, run in lockstep: iteration 1 equals the float64 HF reference
    (1e-4) at EP2, TP2 x EP2 (sequence parallel), PP2 x EP2 and EP2 with packed rows (the rank
    with fewer packed micro-batches runs empty ones); the 4-iteration trajectories and the
    exported releases (every expert, written by its own EP rank) are equal across layouts."""
    setup = qwen3_moe_setup
    ref = dense_first_iteration(setup)
    runs, releases = {}, {}
    for name, (flags, world) in {**LAYOUTS, **PACKED}.items():
        save = str(tmp_path / name)
        runs[name] = _run(aligndistil_argv(setup, save, *flags, iters=4), world)
        releases[name] = _release(save)
        assert runs[name][0]["loss"] == pytest.approx(ref["loss"], rel=1e-4), name
        assert runs[name][0]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), name
        assert runs[name][0]["alpha_mean"] == pytest.approx(ref["alpha"], rel=1e-4), name
        assert "moe_load_balancing_loss" not in runs[name][0]  # none without --moe-aux-loss-coeff
    for name, metrics in runs.items():
        for field in ("loss", "grad_norm", "kl", "moe_expert_load_max_mean", "moe_expert_load_max_mean_worst"):
            assert [m[field] for m in metrics] == pytest.approx([m[field] for m in runs["ep2"]], rel=1e-5), (name, field)
        assert sorted(releases[name]) == sorted(releases["ep2"])
        assert any(".local_experts.3." in n for n in releases[name])
        for tensor_name, tensor in releases["ep2"].items():
            torch.testing.assert_close(releases[name][tensor_name], tensor, rtol=1e-4, atol=1e-5,
                                       msg=f"{name} {tensor_name}")


def test_the_load_balancing_loss_is_weighted_the_same_at_every_layout(qwen3_moe_setup, tmp_path):
    """--moe-aux-loss-coeff: the router's balancing loss joins the gradient (the norm changes; the
    logged loss stays the method's), weighted as Megatron-LM's per-token semantics: coeff x the
    token-weighted mean over the global batch, padding left out. So iteration 1's gradient norm is
    the same at DP1, TP2 x EP2 with sequence parallelism (DP2: other padding per rank), PP2 x EP2
    and PP2 x TP2 (sequence parallel) x EP2 with expert-TP 1 (the second stage's routers get their
    slice of the padding mask). The routing metrics equal the HF model's at each. Before the weighting, Megatron's per-token scaling against our per-example
    normalisation made it ~tokens-per-sequence times too strong, and padding-dependent."""
    setup = qwen3_moe_setup
    ref = dense_first_iteration(setup)  # without the balancing loss
    routing = dense_routing(setup)
    assert routing["moe_expert_load_max_mean_worst"] > routing["moe_expert_load_max_mean"] > 1
    aux = ["--moe-aux-loss-coeff", "0.1", "--no-export"]
    norms = {}
    layouts = {"dp1": ([], 1), "tp2_ep2": LAYOUTS["tp2_ep2"], "pp2_ep2": LAYOUTS["pp2_ep2"],
               "pp2_tp2_ep2_etp1": (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                     "--sequence-parallel", "--expert-tensor-parallel-size", "1"] + EP2, 4)}
    for name, (flags, world) in layouts.items():
        got = _run(aligndistil_argv(setup, str(tmp_path / name), *flags, *aux, iters=1), world)
        assert got[0]["loss"] == pytest.approx(ref["loss"], rel=1e-4), name  # the method's loss
        for metric, value in routing.items():  # the routing metrics, padding left out, equal the HF model's
            assert got[0][metric] == pytest.approx(value, rel=1e-5), (name, metric)
        norms[name] = got[0]["grad_norm"]
    assert norms["dp1"] > 3 * ref["grad_norm"]  # the balancing loss is in the gradient
    for name, norm in norms.items():
        assert norm == pytest.approx(norms["dp1"], rel=1e-5), (name, norms)


def test_on_policy_with_expert_parallelism_samples_and_trains_as_without(qwen3_moe_setup, tmp_path):
    """On-policy AlignDistil, Megatron sampler: at EP2 each replica samples its own prompts, with
    stop ids that end responses at other lengths on each rank; the expert-parallel ranks decode
    in lockstep. Same responses and losses as at EP1 (DP2) for 3 iterations."""
    setup = qwen3_moe_setup
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": json.loads(line)["prompt_ids"]}) + "\n"
                               for line in open(setup["data"])))
    onp = dict(setup, data=str(prompts))
    stops = [str(i) for i in range(0, 1001, 7)][:150]
    flags = ["--rollout", "on-policy", "--max-new-tokens", "6", "--stop-token-ids", *stops, "--lr", "3e-3",
             "--no-export"]
    dp2 = _run(aligndistil_argv(onp, str(tmp_path / "dp2"), *flags, iters=3), 2)
    ep2 = _run(aligndistil_argv(onp, str(tmp_path / "ep2"), *flags, *EP2, iters=3), 2)
    assert len({m["response_len_mean"] for m in dp2}) > 1 and all(0 < m["eos_rate"] < 1 for m in dp2)
    assert [m["response_len_mean"] for m in ep2] == [m["response_len_mean"] for m in dp2]
    for field in ("loss", "grad_norm", "kl", "moe_expert_load_max_mean"):
        assert [m[field] for m in ep2] == pytest.approx([m[field] for m in dp2], rel=1e-5), field


def test_dpo_and_sft_on_qwen2_moe_match_the_reference(qwen2_moe_setup, tmp_path):
    """The shared expert with its sigmoid gate, 4 experts top-2 without renormalisation; the
    reference model MoE too, in lockstep. DPO at EP2 (DP2), TP2 x EP2 (4 ranks: DP2, EP2) and
    PP2 x EP2; SFT at EP2."""
    setup = qwen2_moe_setup
    sft = _run(sft_argv(setup, str(tmp_path / "sft")) + EP2, 2)
    ref = dense_sft(setup)
    assert (sft[0]["loss"], sft[0]["grad_norm"]) == pytest.approx((ref["loss"], ref["grad_norm"]), rel=1e-4)
    ref = dense_dpo(setup)
    for layout in ("ep2", "tp2_ep2", "pp2_ep2"):
        flags, world = LAYOUTS[layout]
        got = _run(dpo_argv(setup, str(tmp_path / layout), "--ref-load", setup["dpo"], *flags, "--no-export",
                            iters=1), world)
        assert got[0]["loss"] == pytest.approx(ref["loss"], rel=1e-4), layout
        assert got[0]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), layout


def test_expert_parallel_guards(qwen3_moe_setup, tmp_path):
    """At their boundaries, each naming the flag: EP that does not divide the experts (3 of 4; 4
    runs), EP on a dense model, a teacher with other experts, packing with EP and a balancing loss, MoE under TP without sequence
    parallelism, a dispatcher that needs NCCL on gloo, vLLM rollouts of a MoE policy on CPU."""
    from megatron_aligndistil.train.arguments import parse_args
    from megatron_aligndistil.train.plan import make_plan

    setup = qwen3_moe_setup
    arch = QwenArch.from_hf_config(tiny_hf_model("qwen3_moe").config)
    with pytest.raises(UserError, match="--expert-model-parallel-size 3 does not divide the model's 4 experts"):
        arch.check_layout(1, 1, 1, ep=3)
    arch.check_layout(1, 1, 1, ep=4)
    dense = QwenArch.from_hf_config(tiny_hf_model("qwen3").config)
    with pytest.raises(UserError, match="--expert-model-parallel-size 2 needs a mixture-of-experts model"):
        dense.check_layout(1, 1, 1, ep=2)
    dense.check_layout(1, 1, 1, ep=1)
    argv = aligndistil_argv(setup, str(tmp_path / "plan"), "--dry-run", *EP2)
    plan = make_plan(parse_args(argv), 2)
    assert plan["data_parallel"] == 2 and plan["expert_parallel"] == 2 and plan["experts_per_expert_parallel_rank"] == 2
    assert plan["expert_data_parallel"] == 1 and plan["planned_gb_per_gpu"] >= 0
    # Megatron's MoE layers train under TP only with sequence parallelism
    tp2 = ["--tensor-model-parallel-size", "2", "--world-size", "4"]
    with pytest.raises(UserError, match="--tensor-model-parallel-size 2 with a mixture-of-experts model needs "
                                        "--sequence-parallel"):
        make_plan(parse_args(aligndistil_argv(setup, str(tmp_path / "plan"), "--dry-run", *tp2)), 4)
    assert make_plan(parse_args(aligndistil_argv(setup, str(tmp_path / "plan"), "--dry-run", *tp2,
                                                 "--sequence-parallel")), 4)["tensor_parallel"] == 2
    with pytest.raises(UserError, match="not divisible by the expert layout"):
        make_plan(parse_args(aligndistil_argv(setup, str(tmp_path / "plan"), "--dry-run",
                                              "--expert-model-parallel-size", "4")), 2)
    done = launch_train(aligndistil_argv(setup, str(tmp_path / "a2a"), "--moe-token-dispatcher-type", "alltoall"),
                        nproc=1)
    assert done.returncode == 2 and "--moe-token-dispatcher-type alltoall needs NCCL" in done.stderr, done.stderr[-2000:]
    # a teacher with another expert count (or top-k) than the policy: refused, naming the fields
    from megatron_aligndistil.core.weights import check_compatible

    policy_arch = QwenArch(**json.load(open(os.path.join(setup["policy"], "qwen_arch.json"))))
    for change in ({"num_experts": 8}, {"num_experts_per_tok": 1}):
        other = tmp_path / f"teacher_{next(iter(change))}"
        other.mkdir()
        (other / "qwen_arch.json").write_text(dataclasses.replace(policy_arch, **change).to_json())
        key = next(iter(change))
        with pytest.raises(UserError, match=f"--dpo-load {other}: architecture differs from the policy's "
                                            rf"\(policy, dpo\): {{'{key}': \({getattr(policy_arch, key)}, "):
            check_compatible(policy_arch, setup["policy"], str(other), "dpo")
    check_compatible(policy_arch, setup["policy"], setup["dpo"], "dpo")  # the same architecture passes
    # packed rows with EP train (test above), but not with a balancing loss (an empty micro-batch has no tokens)
    packed = ["--pack-sequences", *EP2, "--moe-aux-loss-coeff"]
    with pytest.raises(SystemExit):
        parse_args(aligndistil_argv(setup, str(tmp_path / "p"), *packed, "0.01"))
    parse_args(aligndistil_argv(setup, str(tmp_path / "p"), *packed, "0"))
    # vLLM's CPU build cannot be synced with a MoE policy: refused before any model is built
    done = launch_train(aligndistil_argv(setup, str(tmp_path / "onp"), "--rollout", "on-policy",
                                         "--rollout-engine", "vllm", "--stop-token-ids", "3"), nproc=1)
    assert done.returncode == 2 and "--rollout-engine vllm with a mixture-of-experts policy (qwen3_moe) is not " \
        "supported without CUDA" in done.stderr, done.stderr[-2000:]
