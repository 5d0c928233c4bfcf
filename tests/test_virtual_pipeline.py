"""Interleaved virtual pipeline stages (issue 29 item 3): every model split into the same chunks,
run in lockstep through Megatron's interleaved schedule. Iteration 1 of SFT and DPO against the
float64 HF reference and the non-interleaved run (loss and gradient norm); resume and export of a
chunked run; the guards at their boundaries. AlignDistil's layouts (PP2 x VPP2, TP2 PP2 x VPP2)
join the other layouts of tests/test_train_aligndistil.py."""

import json
import os

import pytest
import torch

from megatron_aligndistil.core.errors import UserError
from megatron_aligndistil.core.parallel import Layout
from megatron_aligndistil.core.schedule import interleaving_group
from megatron_aligndistil.testing import run_distributed
from megatron_aligndistil.train.metrics import read_metrics
from train_fixtures import (aligndistil_argv, dense_dpo, dense_sft, dpo_argv, launch_train, make_setup_with_pairs,
                            run_train, sft_argv)

PP2 = ["--pipeline-model-parallel-size", "2"]
VPP2 = PP2 + ["--num-layers-per-virtual-pipeline-stage", "1"]  # 4 layers: 2 chunks of 1 layer per rank
TP2_PP2_VPP2 = ["--tensor-model-parallel-size", "2"] + PP2 + ["--num-virtual-stages-per-pipeline-rank", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup_with_pairs(str(tmp_path_factory.mktemp("vpp")))


def _run(argv, world):
    assert run_distributed(run_train, world, args=(argv,), timeout=600) == [0] * world
    save = argv[argv.index("--save") + 1]
    return read_metrics(os.path.join(save, "metrics.jsonl"))


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_first_iteration_matches_the_reference_and_the_plain_pipeline(setup, tmp_path, method):
    """Iteration 1's loss and gradient norm at PP2, PP2 x 2 virtual stages and TP2 PP2 x 2 virtual
    stages equal the float64 HF reference (1e-4). DPO's reference model runs in lockstep, in the
    same chunks; a step of 3 micro-batches (not a multiple of PP) runs as one interleaving group."""
    if method == "sft":
        ref = dense_sft(setup)
        argv = lambda name, *extra: sft_argv(setup, str(tmp_path / name), *extra)  # noqa: E731
    else:
        ref = dense_dpo(setup)
        argv = lambda name, *extra: dpo_argv(setup, str(tmp_path / name), "--ref-load", setup["dpo"],  # noqa: E731
                                             "--no-export", *extra, iters=1)
    runs = {"pp2": _run(argv("pp2", *PP2), 2), "pp2_vpp2": _run(argv("pp2_vpp2", *VPP2), 2),
            "tp2pp2_vpp2": _run(argv("tp2pp2_vpp2", *TP2_PP2_VPP2, "--micro-batch-size", "1"), 4)}
    if method == "dpo":  # 8 pairs, 2 per micro-batch... and 3 micro-batches: 6 pairs per step, group of 3
        runs["pp2_vpp2_m3"] = _run(argv("pp2_vpp2_m3", *VPP2, "--global-batch-size", "6"), 2)
        small = dense_dpo(setup, global_batch=6)
    for name, metrics in runs.items():
        want = small if name.endswith("_m3") else ref
        assert metrics[0]["loss"] == pytest.approx(want["loss"], rel=1e-4), name
        assert metrics[0]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), name


def test_a_chunked_run_resumes_and_exports_like_an_uninterrupted_one(setup, tmp_path):
    """PP2 x 2 virtual stages: checkpoints hold one state per chunk (model0, model1); a run stopped at
    iteration 2 continues the same trajectory; the exported release equals the uninterrupted run's,
    and loads as a teacher at another layout. Resuming at other virtual stages is refused."""
    full = str(tmp_path / "full")
    whole = _run(aligndistil_argv(setup, full, *VPP2, iters=4), 2)
    part = str(tmp_path / "part")
    _run(aligndistil_argv(setup, part, *VPP2, "--exit-interval", "2", iters=4), 2)
    resumed = _run(aligndistil_argv(setup, part, *VPP2, iters=4), 2)
    assert [m["iteration"] for m in resumed] == [1, 2, 3, 4]
    for field in ("loss", "grad_norm"):
        assert [m[field] for m in resumed] == pytest.approx([m[field] for m in whole], rel=1e-5), field
    from megatron_aligndistil.core.store import TensorStore

    with TensorStore(os.path.join(full, "release")) as a, TensorStore(os.path.join(part, "release")) as b:
        names = sorted(a.keys())
        assert names == sorted(b.keys()) and any(".layers.3." in n for n in names)
        for name in names:
            assert torch.allclose(a.get(name), b.get(name), rtol=1e-5, atol=1e-7), name
    # the chunked run's training checkpoint as a teacher at TP1 (weights named by global layer)
    teacher = dict(setup, dpo=os.path.join(full, "iter_0000004"))
    _run(aligndistil_argv(teacher, str(tmp_path / "teacher_from_chunks"), "--no-export", iters=1), 1)
    # another number of virtual stages on the same --save: refused, naming the flag
    done = launch_train(aligndistil_argv(setup, part, *PP2, "--num-virtual-stages-per-pipeline-rank", "1",
                                         iters=4), nproc=2)
    assert done.returncode != 0 and "--num-virtual-stages-per-pipeline-rank" in done.stderr, done.stderr[-2000:]


def test_on_policy_with_virtual_stages_follows_the_plain_pipeline(setup, tmp_path):
    """On-policy AlignDistil at PP2 x 2 virtual stages: the Megatron sampler decodes around the
    ring of chunks (one micro-batch per step), training goes through the interleaved schedule.
    Sampling is seeded per sequence, so the responses and the 3-iteration trajectory equal PP2's,
    also at TP2 PP2 x 2 with sequence parallelism."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": json.loads(line)["prompt_ids"]}) + "\n"
                               for line in open(setup["data"])))
    onp = dict(setup, data=str(prompts))
    stops = [str(i) for i in range(0, 1001, 7)][:150]  # responses stop at different lengths
    extra = ["--rollout", "on-policy", "--max-new-tokens", "6", "--stop-token-ids", *stops]
    plain = _run(aligndistil_argv(onp, str(tmp_path / "pp2"), *PP2, *extra, iters=3), 2)
    chunked = _run(aligndistil_argv(onp, str(tmp_path / "vpp2"), *VPP2, *extra, iters=3), 2)
    # TP2 with sequence parallelism in every chunk: sampling turns it off in all of them
    tp2_sp = _run(aligndistil_argv(onp, str(tmp_path / "tp2sp"), *TP2_PP2_VPP2, "--sequence-parallel", *extra,
                                   iters=3), 4)
    assert len({m["response_len_mean"] for m in plain}) > 1 or 0 < plain[0]["eos_rate"] < 1
    for run in (chunked, tp2_sp):
        assert [m["response_len_mean"] for m in run] == [m["response_len_mean"] for m in plain]
        for field in ("loss", "grad_norm", "kl", "alpha_mean"):
            assert [m[field] for m in run] == pytest.approx([m[field] for m in plain], rel=1e-5), field


def test_interleaving_group_at_its_boundaries():
    """Megatron-LM's group (PP) when PP divides the micro-batches, else all of them; under PP: refused."""
    assert interleaving_group(2, 2) == 2
    assert interleaving_group(4, 2) == 2
    assert interleaving_group(3, 2) == 3
    assert interleaving_group(5, 4) == 5
    assert interleaving_group(8, 4) == 4
    with pytest.raises(UserError, match="1 micro-batches in a step under 2 pipeline stages"):
        interleaving_group(1, 2)
    with pytest.raises(UserError, match="--pipeline-model-parallel-size"):
        interleaving_group(3, 4)


def test_layout_axes_and_their_guards():
    """Every axis a positive integer, virtual stages only with PP, DP = world / (TP x CP x PP), the
    expert layout dividing the world too (expert-tensor size defaults to TP)."""
    assert Layout(tp=2, pp=2, vpp=2).data_parallel_size(8) == 2
    assert Layout(tp=2, cp=2).data_parallel_size(8) == 2
    assert Layout(tp=2, ep=4).data_parallel_size(8) == 4
    assert Layout(tp=2, ep=4).expert_tp == 2 and Layout(tp=2, etp=1).expert_tp == 1
    assert Layout(pp=2, vpp=1).vpp == 1
    with pytest.raises(UserError, match="need --pipeline-model-parallel-size > 1"):
        Layout(vpp=2)
    for axis in ("tp", "pp", "vpp", "cp", "ep", "etp"):
        for bad in (0, -1, 1.5, True):
            with pytest.raises(UserError, match=Layout.FLAGS[axis]):
                Layout(**{axis: bad})
    with pytest.raises(UserError, match="world size 6 is not divisible by --tensor-model-parallel-size 2 x "
                                        "--context-parallel-size 2"):
        Layout(tp=2, cp=2).data_parallel_size(6)
    with pytest.raises(UserError, match="expert layout"):
        Layout(tp=1, ep=4).data_parallel_size(6)
    with pytest.raises(UserError, match="world size 3 is not divisible by --tensor-model-parallel-size 1 x "
                                        "--pipeline-model-parallel-size 2 = 2"):
        Layout(pp=2).data_parallel_size(3)


def test_virtual_stage_flags_at_their_boundaries():
    """Either flag (not both), only with PP > 1; N layers per virtual stage must divide the layers per rank."""
    from megatron_aligndistil.config import ConfigError, TrainingConfig

    base = dict(load="l", save="s", data_path="d", global_batch_size=8, seq_length=16, lr=1e-3)
    cfg = TrainingConfig(**base, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1)
    assert cfg.virtual_stages(4) == 2 and cfg.virtual_stages(8) == 4 and cfg.virtual_stages(2) == 1
    two = TrainingConfig(**base, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2)
    assert two.virtual_stages(8) == 2 and two.virtual_stages(4) == 1
    with pytest.raises(ConfigError, match="does not divide the model's 6 layers"):
        two.virtual_stages(6)
    assert TrainingConfig(**base, pipeline_model_parallel_size=2, num_virtual_stages_per_pipeline_rank=3
                          ).virtual_stages(12) == 3
    assert TrainingConfig(**base, pipeline_model_parallel_size=2).virtual_stages(4) == 1
    with pytest.raises(ConfigError, match="give one"):
        TrainingConfig(**base, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1,
                       num_virtual_stages_per_pipeline_rank=2)
    with pytest.raises(ConfigError, match="needs --pipeline-model-parallel-size > 1"):
        TrainingConfig(**base, num_virtual_stages_per_pipeline_rank=2)
    from megatron_aligndistil.models.qwen import QwenArch

    arch = QwenArch("qwen2", 4, 64, 96, 4, 2, 16, 1001, 256, 1e6, 1e-6, True, False, False)
    arch.check_layout(1, 2, 2)
    with pytest.raises(UserError, match="6 model chunks do not divide num_hidden_layers 4"):
        arch.check_layout(1, 2, 3)


def test_planner_counts_the_interleaved_warm_up():
    """Chunks in flight on rank r: 1F1B's PP - r; interleaved, Megatron's warm-up 2 (PP - r - 1) + (V - 1) g,
    plus one, capped at every (micro-batch, chunk) pair; the bubble (PP - 1) / (V m)."""
    from megatron_aligndistil.memory import Layout as PlannedLayout, chunks_in_flight, pipeline_bubble

    assert chunks_in_flight(PlannedLayout(pp=4), 8, stage=0) == 4
    assert chunks_in_flight(PlannedLayout(pp=4), 2, stage=0) == 2
    assert chunks_in_flight(PlannedLayout(pp=4, vpp=2), 8, stage=0) == 11  # 6 + 4 + 1
    assert chunks_in_flight(PlannedLayout(pp=4, vpp=2), 8, stage=3) == 5  # 0 + 4 + 1
    assert chunks_in_flight(PlannedLayout(pp=4, vpp=2), 6, stage=0) == 12  # 6 + 6 + 1, capped at 6 x 2
    assert chunks_in_flight(PlannedLayout(pp=2, vpp=3), 3, stage=1) == 7  # 0 + 2 x 3 + 1 (group of 3)
    assert pipeline_bubble(PlannedLayout(pp=4), 8) == 3 / 8
    assert pipeline_bubble(PlannedLayout(pp=4, vpp=2), 8) == 3 / 16
    assert pipeline_bubble(PlannedLayout(pp=1), 8) == 0


def test_bf16_chunks_match_the_plain_pipeline(setup, tmp_path):
    """In bf16 each chunk is wrapped in Megatron's Float16Module (bf16 weights, bf16 activations
    over the p2p ring): PP2 x 2 virtual stages equals PP2 step for step."""
    runs = [_run(aligndistil_argv(setup, str(tmp_path / name), "--bf16", "--no-export", *layout, iters=2), 2)
            for name, layout in (("pp2", PP2), ("pp2_vpp2", VPP2))]
    for field in ("loss", "grad_norm", "kl"):
        assert [m[field] for m in runs[1]] == pytest.approx([m[field] for m in runs[0]], rel=1e-6), field


def _weights_view_over_chunks(arch_fields, full):
    """Inside a rank: the vLLM sync's view of the policy (``_PolicyWeights``) over this rank's
    chunks; returns its tensor names and those whose gathered value is not the full tensor."""
    from megatron_aligndistil.core import sharding
    from megatron_aligndistil.models import qwen
    from megatron_aligndistil.models.qwen import QwenArch
    from megatron_aligndistil.rollout.vllm import _PolicyWeights

    arch = QwenArch(**arch_fields)
    chunks = qwen.build_chunks(arch, qwen.transformer_config(arch))
    for chunk in chunks:
        sharding.load_full_state_dict(chunk, full)
    view = _PolicyWeights(chunks)
    wrong = [name for name in sorted(full) if not torch.equal(view.get(name), full[name])]
    return sorted(view.meta), wrong


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_vllm_weight_sync_reads_every_chunk(tied):
    """The weights vLLM receives at PP2 x 2 chunks (TP2 too): every tensor of the model, once, by
    its global name, equal to the full tensor (the tied embedding from the first stage only)."""
    import dataclasses

    from hf_fixtures import tiny_hf_model

    from megatron_aligndistil.convert.mapping import hf_to_megatron
    from megatron_aligndistil.models.qwen import QwenArch

    hf = tiny_hf_model("qwen3", tied=tied, vocab_size=1001, seed=5)
    arch = QwenArch.from_hf_config(hf.config)
    full = dict(hf_to_megatron(arch, hf.state_dict().__getitem__))
    for layout, world in ((Layout(pp=2, vpp=2), 2), (Layout(tp=2, pp=2, vpp=2), 4)):
        for names, wrong in run_distributed(_weights_view_over_chunks, world, args=(dataclasses.asdict(arch), full),
                                            layout=layout):
            assert names == sorted(full) and wrong == [], (layout, wrong)
            assert any(".layers.3." in n for n in names)
