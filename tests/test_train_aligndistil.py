"""Issue 5: off-policy AlignDistil under TP, PP and DP against a dense HF reference; layout
independence of the trajectory; kill-and-resume; bad data."""

import json
import os
import shutil

import pytest
import torch

from megatron_aligndistil.testing import run_distributed
from megatron_aligndistil.train.metrics import read_metrics
from train_fixtures import aligndistil_argv, dense_first_iteration, launch_train, make_aligndistil_setup, run_train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_aligndistil_setup(str(tmp_path_factory.mktemp("aligndistil")))


def _train(setup, tmp, name, world, *extra, iters=5):
    save = os.path.join(tmp, name)
    codes = run_distributed(run_train, world, args=(aligndistil_argv(setup, save, *extra, iters=iters),),
                            timeout=600)
    assert codes == [0] * world
    return read_metrics(os.path.join(save, "metrics.jsonl"))


def test_layouts_match_each_other_and_the_dense_reference(setup, tmp_path):
    """Loss, gradient norm and metrics of iteration 1 against the float64 reference; the whole
    trajectory (loss, grad_norm) equal across TP/PP/DP layouts, interleaved virtual pipeline stages
    (issue 29), micro-batch sizes 1, 2, 4 and packed rows, with --clip-grad small enough that clipping
    acts at every step (issue 19 items 1, 5; 17), and JSONL or indexed records (issue 16)."""
    ref = dense_first_iteration(setup)
    clip = ["--clip-grad", "0.004"]
    runs = {
        "tp1pp1": _train(setup, tmp_path, "tp1pp1", 1, *clip),  # micro-batch 2
        "tp2pp2_mbs1": _train(setup, tmp_path, "tp2pp2", 4, *clip, "--tensor-model-parallel-size", "2",
                              "--pipeline-model-parallel-size", "2", "--micro-batch-size", "1"),
        "dp2_mbs4": _train(setup, tmp_path, "dp2", 2, *clip, "--use-distributed-optimizer", "--micro-batch-size", "4"),
        # interleaved virtual pipeline stages (issue 29): every model in 2 chunks of 1 layer per rank
        "pp2_vpp2": _train(setup, tmp_path, "pp2vpp2", 2, *clip, "--pipeline-model-parallel-size", "2",
                           "--num-layers-per-virtual-pipeline-stage", "1"),
        "tp2pp2_vpp2_mbs1": _train(setup, tmp_path, "tp2pp2vpp2", 4, *clip, "--tensor-model-parallel-size", "2",
                                   "--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
                                   "--micro-batch-size", "1"),
        # and the records read from the Megatron indexed dataset (issue 16 item 3)
        "tp2_sp_recompute_packed_indexed": _train(
            dict(setup, data=setup["data_indexed"]), tmp_path, "tp2sp", 2, *clip, "--tensor-model-parallel-size", "2",
            "--sequence-parallel", "--recompute-granularity", "full", "--pack-sequences"),
    }
    assert ref["grad_norm"] > 0.004  # clipping really acts at iteration 1
    for name, metrics in runs.items():
        assert [m["iteration"] for m in metrics] == [1, 2, 3, 4, 5], name
        for field in ("iteration", "loss", "lr", "grad_norm", "tokens", "elapsed_s", "kl",
                      "alpha_mean", "tvd_mean"):
            assert field in metrics[0], (name, field)
        first = metrics[0]
        assert first["loss"] == pytest.approx(ref["loss"], rel=1e-4), name
        assert first["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), name
        assert first["tokens"] == ref["tokens"], name
        for field, key in (("kl", "kl"), ("alpha_mean", "alpha"), ("tvd_mean", "tvd")):
            assert first[field] == pytest.approx(ref[key], rel=1e-4), (name, field)
    base = runs["tp1pp1"]
    assert base[-1]["loss"] < base[0]["loss"]  # it learns
    for name in runs:
        for field in ("loss", "grad_norm", "kl", "alpha_mean"):
            assert [m[field] for m in runs[name]] == pytest.approx([m[field] for m in base], rel=1e-4), (name, field)
        assert [m["tokens"] for m in runs[name]] == [m["tokens"] for m in base]


@pytest.fixture(scope="module")
def tied_setup(tmp_path_factory):
    return make_aligndistil_setup(str(tmp_path_factory.mktemp("aligndistil_tied")), tied=True)


def train_and_return_tied_weights(argv):
    """Inside a run_distributed rank: train, then this rank's shard of the input embedding (first
    stage) and of the output layer's weight (last stage)."""
    from megatron.core import parallel_state

    from megatron_aligndistil.train import build_trainer
    from megatron_aligndistil.train.arguments import parse_args

    trainer = build_trainer(parse_args(argv))
    trainer.train()
    chunks = trainer.policy_chunks  # the embedding in the first chunk, the output layer in the last
    out = {"tp": parallel_state.get_tensor_model_parallel_rank()}
    if chunks[0].pre_process:
        out["embedding"] = chunks[0].embedding.word_embeddings.weight.detach().clone()
    if chunks[-1].post_process:
        out["output"] = chunks[-1].shared_embedding_or_output_weight().detach().clone()
    parallel_state.destroy_model_parallel()
    return out


def test_tied_embeddings_under_pipeline_parallelism(tied_setup, tmp_path):
    """Qwen2.5-0.5B/1.5B/3B tie the output layer to the embedding. Under PP the last stage holds a
    copy whose gradient is summed with the first stage's: losses and grad norms equal TP1 PP1's over
    several iterations, and the copy still equals the embedding after training (issue 19 item 4).
    The PP2 run also streams the teachers from host memory (--offload-frozen-models); the PP2 x 2
    virtual stages run ties the first chunk's embedding to the last chunk's output layer."""
    runs, weights = {}, {}
    for name, world, layout in (("tp1pp1", 1, []),
                                ("pp2_offload", 2, ["--pipeline-model-parallel-size", "2", "--offload-frozen-models"]),
                                ("tp2pp2", 4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
                                ("pp2_vpp2", 2, ["--pipeline-model-parallel-size", "2",
                                                 "--num-layers-per-virtual-pipeline-stage", "1"])):
        save = str(tmp_path / name)
        argv = aligndistil_argv(tied_setup, save, *layout, "--no-export", iters=4)
        weights[name] = run_distributed(train_and_return_tied_weights, world, args=(argv,), timeout=600)
        runs[name] = read_metrics(os.path.join(save, "metrics.jsonl"))
    for name in ("pp2_offload", "tp2pp2", "pp2_vpp2"):
        for field in ("loss", "grad_norm"):
            assert [m[field] for m in runs[name]] == pytest.approx([m[field] for m in runs["tp1pp1"]], rel=1e-4), \
                (name, field)
        first = {w["tp"]: w["embedding"] for w in weights[name] if "embedding" in w}
        last = {w["tp"]: w["output"] for w in weights[name] if "output" in w}
        assert first.keys() == last.keys() and all(torch.equal(first[tp], last[tp]) for tp in first), name
    full = torch.cat([first[tp] for tp in sorted(first)], 0)  # TP2 PP2, after training
    assert torch.allclose(full, weights["tp1pp1"][0]["embedding"], rtol=1e-4, atol=1e-6)


def test_kill_and_resume_continues_the_same_trajectory(setup, tmp_path):
    """Chained jobs, a kill, a damaged checkpoint, a relaunch of a finished run, another run's
    flags on the same --save (issue 15 items 8, 12, 16)."""
    full = _train(setup, tmp_path, "full", 2, "--use-distributed-optimizer")
    save = os.path.join(tmp_path, "resumed")
    latest = os.path.join(save, "latest_checkpointed_iteration.txt")
    # a chained job: --exit-interval saves where it stops (Megatron-LM does too)
    argv = aligndistil_argv(setup, save, "--use-distributed-optimizer", "--save-interval", "2",
                            "--exit-interval", "3")
    assert run_distributed(run_train, 2, args=(argv,), timeout=600) == [0, 0]
    assert open(latest).read().strip() == "3"
    # the iteration-3 checkpoint is damaged (a .distcp cut short): refused, naming the last good one
    shard = sorted(f for f in os.listdir(os.path.join(save, "iter_0000003")) if f.endswith(".distcp"))[0]
    with open(os.path.join(save, "iter_0000003", shard), "r+b") as f:
        f.truncate(100)
    argv = aligndistil_argv(setup, save, "--use-distributed-optimizer", "--save-interval", "2")
    r = launch_train(argv, nproc=1)
    assert r.returncode == 2 and f"{shard} is truncated" in r.stderr, r.stderr[-2000:]
    assert f"the latest complete checkpoint is {os.path.join(save, 'iter_0000002')}: write 2 into" in r.stderr
    # as the message says: back to iteration 2 (the progress past it is lost, as after a kill) ...
    with open(latest, "w") as f:
        f.write("2")
    os.makedirs(os.path.join(save, "iter_0000004.tmp"))  # ... and a save of iteration 4 that died half-way
    r = launch_train(argv, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from iteration 2" in r.stdout
    resumed = read_metrics(os.path.join(save, "metrics.jsonl"))
    assert [m["iteration"] for m in resumed] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in full], rel=1e-6)
    assert [m["lr"] for m in resumed] == pytest.approx([m["lr"] for m in full], rel=1e-9)
    # Megatron's warmup: iteration 1 runs at lr 0, iteration 2 at lr / W (W = 1 here)
    assert resumed[0]["lr"] == 0 and resumed[1]["lr"] == pytest.approx(1e-3)
    release = os.path.join(save, "release", "qwen_arch.json")
    assert os.path.exists(release)
    # relaunching the finished run trains nothing and rewrites nothing
    stamp = os.stat(release).st_mtime_ns, os.stat(os.path.join(save, "iter_0000005")).st_mtime_ns
    r = launch_train(argv, nproc=1)
    assert r.returncode == 0 and "is complete (iteration 5 of 5); nothing to train" in r.stdout, r.stderr[-2000:]
    assert (os.stat(release).st_mtime_ns, os.stat(os.path.join(save, "iter_0000005")).st_mtime_ns) == stamp
    # an intermediate checkpoint exports like the release (here the same iteration: equal tensors),
    # and the converter resolves a run directory to its release/
    import subprocess
    import sys

    from safetensors.torch import load_file

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                        "convert_megatron_to_hf.py")
    hf = {}
    for name, src in (("iter5", os.path.join(save, "iter_0000005")), ("run", save)):
        r = subprocess.run([sys.executable, tool, "--load", src, "--save", os.path.join(tmp_path, name)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        hf[name] = {k: v for f in sorted(os.listdir(os.path.join(tmp_path, name))) if f.endswith(".safetensors")
                    for k, v in load_file(os.path.join(tmp_path, name, f)).items()}
    assert hf["iter5"].keys() == hf["run"].keys() and len(hf["run"]) > 10
    assert all(torch.equal(hf["iter5"][k], hf["run"][k]) for k in hf["run"])
    assert os.path.exists(os.path.join(tmp_path, "iter5", "tokenizer.json")) == \
        os.path.exists(os.path.join(tmp_path, "run", "tokenizer.json"))
    # another run's flags on the same --save: refused before anything is built or written
    other = aligndistil_argv(setup, save, "--use-distributed-optimizer", "--tensor-model-parallel-size", "2")
    other[other.index("--rev-load") + 1] = setup["policy"]
    r = launch_train(other, nproc=2)
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and "holds" in r.stderr and "--rev-load" in r.stderr, r.stderr[-2000:]
    assert "--tensor-model-parallel-size 1 (saved) vs 2 (now)" in r.stderr


def test_bad_data_and_mismatched_teacher_fail_with_a_clear_message(setup, tmp_path):
    import dataclasses
    import subprocess
    import sys

    from megatron_aligndistil.models.qwen import QwenArch
    from megatron_aligndistil.core.weights import check_compatible

    bad = tmp_path / "bad.jsonl"
    lines = open(setup["data"]).read().splitlines()
    lines[3] = json.dumps({"prompt_ids": [1, 2], "response_ids": [5000]})
    bad.write_text("\n".join(lines) + "\n")
    argv = aligndistil_argv(dict(setup, data=str(bad)), str(tmp_path / "run"))
    r = subprocess.run([sys.executable, "-m", "megatron_aligndistil.train", *argv], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{bad}:4:" in r.stderr and "outside the vocabulary" in r.stderr and "Traceback" not in r.stderr
    # --skip-bad-records trains on the rest and says what it skipped
    r = launch_train(aligndistil_argv(dict(setup, data=str(bad)), str(tmp_path / "skip"), "--skip-bad-records",
                                      "--no-export", iters=1))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"--skip-bad-records: skipped 1 of 24 records of {bad} (1 field 'response_ids' has token id 5000" \
        in r.stdout, r.stdout[-2000:]
    assert "aligndistil iteration 1/1 | loss " in r.stdout  # --no-progress: a log line per --log-interval
    r = launch_train(aligndistil_argv(setup, str(tmp_path / "long"), "--seq-length", "100000"))
    assert r.returncode == 2 and "--seq-length 100000 exceeds the model's max_position_embeddings" in r.stderr
    # a stop id past the tokenizer's ids (1001 here) is refused by the trainer before any model is built
    r = launch_train(aligndistil_argv(setup, str(tmp_path / "stop"), "--rollout", "on-policy", "--stop-token-ids",
                                      "1001"))
    assert r.returncode == 2 and "--stop-token-ids 1001: outside the 1001 ids of the tokenizer" in r.stderr, \
        r.stderr[-2000:]

    other = tmp_path / "other_teacher"
    shutil.copytree(setup["dpo"], other)
    arch = QwenArch.from_json_file(os.path.join(setup["policy"], "qwen_arch.json"))
    (other / "qwen_arch.json").write_text(dataclasses.replace(arch, vocab_size=2000).to_json())
    check_compatible(arch, setup["policy"], str(other), "dpo")  # the same tokenizer: compared over its ids
    os.remove(other / "tokenizer.json")  # which ids the two share is unknown
    with pytest.raises(ValueError, match="--dpo-load .* vocab_size 2000 differs from the policy's 1001"):
        check_compatible(arch, setup["policy"], str(other), "dpo")


@pytest.mark.parametrize("role,flag,layout", [("policy", "--load", []),
                                               ("dpo", "--dpo-load", ["--tensor-model-parallel-size", "2"])])
def test_nan_logits_stop_before_the_optimizer_step_naming_the_model(setup, tmp_path, role, flag, layout):
    """A model whose logits are NaN: one clear line naming the iteration and that model, exit 2, no
    checkpoint, printed once even with two ranks (issue 15 items 4 and 15)."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / f"nan_{role}"
    shutil.copytree(setup[role], broken)
    for f in broken.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name in tensors:
            if name.endswith("final_layernorm.weight"):
                tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, str(f), metadata={"format": "pt"})
    save = tmp_path / "run"
    argv = aligndistil_argv(dict(setup, **{role: str(broken)}), str(save), *layout, iters=2)
    r = launch_train(argv, nproc=2 if layout else 1)
    assert r.returncode == (1 if layout else 2), r.stderr[-2000:]  # torchrun exits 1 when a rank exits 2
    assert f"iteration 1: non-finite loss (NaN/inf logits at response positions from: {role} ({flag} {broken}))" \
        in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("error:") == 1, r.stderr[-3000:]
    assert "megatron_aligndistil/" not in r.stderr.split("error:")[0]  # no traceback of ours (torchrun adds its own)
    assert not (save / "metrics.jsonl").exists() or not (save / "metrics.jsonl").read_text().strip()
    assert not (save / "latest_checkpointed_iteration.txt").exists()


def test_bf16_follows_the_fp32_trajectory(setup, tmp_path):
    """bf16 policy (fp32 master weights) and bf16 teachers: same path on CPU as on GPU."""
    fp32 = _train(setup, tmp_path, "fp32", 1, iters=3)
    bf16 = _train(setup, tmp_path, "bf16", 2, "--bf16", "--tensor-model-parallel-size", "2", iters=3)
    assert [m["loss"] for m in bf16] == pytest.approx([m["loss"] for m in fp32], rel=2e-2)
    assert [m["loss"] for m in bf16] != [m["loss"] for m in fp32]  # it really ran in bf16


def test_on_policy_runs_logs_rollouts_and_is_layout_independent(setup, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": json.loads(line)["prompt_ids"]}) + "\n"
                               for line in open(setup["data"])))
    onp = dict(setup, data=str(prompts))
    # 150 of the 1001 ids end a response, so responses stop at different lengths (1 to 6)
    stops = [str(i) for i in range(0, 1001, 7)][:150]
    extra = ["--rollout", "on-policy", "--max-new-tokens", "6", "--stop-token-ids", *stops, "--lr", "3e-3"]
    tp1 = _train(onp, tmp_path, "onp_tp1", 1, *extra, iters=4)
    # TP2 with sequence parallelism: sampling runs with it off (a decode step has one position)
    tp2 = _train(onp, tmp_path, "onp_tp2", 2, *extra, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                 iters=4)
    # each replica samples its half; responses packed into rows (issue 17)
    dp2 = _train(onp, tmp_path, "onp_dp2", 2, *extra, "--pack-sequences", iters=4)
    for m in tp1:
        assert {"rollout_s", "response_len_mean", "eos_rate", "kl", "alpha_mean"} <= set(m)
        assert 1 <= m["response_len_mean"] <= 6 and 0 <= m["eos_rate"] <= 1
    assert 0 < min(m["eos_rate"] for m in tp1) and max(m["eos_rate"] for m in tp1) < 1  # lengths differ
    # same samples and the same losses at TP2 and DP2: sampling is seeded per sequence (its global
    # sample index), not per rank or iteration
    for other in (tp2, dp2):
        assert [m["response_len_mean"] for m in other] == [m["response_len_mean"] for m in tp1]
        assert [m["loss"] for m in other] == pytest.approx([m["loss"] for m in tp1], rel=1e-4)
    assert tp1[-1]["loss"] < tp1[0]["loss"]


def test_rollout_sequence_ids_are_global_sample_indices():
    """Each rollout sequence is seeded by its global sample index: distinct across DP ranks and
    iterations, the same at any layout (issue 19 item 6)."""
    from megatron_aligndistil.config import AlignDistilLossConfig, TrainingConfig
    from megatron_aligndistil.data.records import Dataset
    from megatron_aligndistil.train.aligndistil import AlignDistil
    from megatron_aligndistil.train.loop import Trainer

    cfg = TrainingConfig("policy", "save", "prompts.jsonl", global_batch_size=8, seq_length=16, lr=1e-5,
                         micro_batch_size=2, seed=3)
    seen = []

    def fake_rollout(prompts, first_sample):
        seen.extend(range(first_sample, first_sample + len(prompts)))
        return [dict(p, response_ids=[1]) for p in prompts], {}

    for dp_size in (1, 2, 4):
        seen.clear()
        for consumed in (0, 8, 16):
            for dp_rank in range(dp_size):
                trainer = Trainer.__new__(Trainer)
                trainer.cfg, trainer.rows = cfg, cfg.micro_batch_size
                trainer.method = AlignDistil(AlignDistilLossConfig(), "dpo", rev_load="rev", on_policy=True)
                trainer.data = Dataset("prompts.jsonl", "prompt", records=[{"prompt_ids": [i + 1]} for i in range(20)])
                trainer.dp_rank, trainer.dp_size, trainer.consumed = dp_rank, dp_size, consumed
                trainer._rollout = fake_rollout
                trainer._local_micro_batches()
        assert sorted(seen) == list(range(24)), dp_size


def rng_round_trip(argv):
    """Inside a run_distributed rank: save a checkpoint, disturb every RNG, load it back. Returns
    whether torch's and Megatron's tracker states came back bit for bit."""
    from megatron.core import tensor_parallel

    from megatron_aligndistil.train import build_trainer, checkpointing
    from megatron_aligndistil.train.arguments import parse_args

    trainer = build_trainer(parse_args(argv))
    trainer.train_step()  # the optimizer has state to save
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(11)
    with tracker.fork():
        torch.rand(3)  # dropout under TP draws here
    want_torch, want_tracker = torch.get_rng_state(), {k: v.clone() for k, v in tracker.get_states().items()}
    path = checkpointing.save_training_state(trainer.cfg.save, 1, 8, trainer.policy_chunks, trainer.optimizer, trainer.scheduler)
    torch.manual_seed(99)
    with tracker.fork():
        torch.rand(5)
    assert not torch.equal(torch.get_rng_state(), want_torch)
    checkpointing.load_training_state(path, trainer.policy_chunks, trainer.optimizer, trainer.scheduler)
    got_tracker = tracker.get_states()
    return (torch.equal(torch.get_rng_state(), want_torch) and want_tracker.keys() == got_tracker.keys()
            and all(torch.equal(want_tracker[k], got_tracker[k]) for k in want_tracker))


def test_rng_states_round_trip_through_a_checkpoint(setup, tmp_path):
    """Nothing draws from the global RNGs today (no dropout, own sampling generators), but a model
    with dropout would: the restore must give back torch's and the TP tracker's states (issue 19 item 7)."""
    argv = aligndistil_argv(setup, str(tmp_path / "rng"), "--tensor-model-parallel-size", "2", iters=1)
    assert run_distributed(rng_round_trip, 2, args=(argv,), timeout=600) == [True, True]


def test_degenerate_teachers_are_refused(setup, tmp_path, capsys):
    """Issue 26 item 5: a reverse teacher that is the DPO teacher (the same path, or a copy of its
    weights) is refused naming both flags; teachers whose weights differ only where no probability
    lives (padding rows) agree everywhere (TVD 0): iteration 1 stops before its update."""
    from safetensors.torch import load_file, save_file

    from megatron_aligndistil.train.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(aligndistil_argv(dict(setup, rev=setup["dpo"] + "/"), str(tmp_path / "same_path")))
    assert f"--rev-load {setup['dpo']}/ is the DPO teacher (--dpo-load {setup['dpo']})" in capsys.readouterr().err

    copy = tmp_path / "rev_copy"
    shutil.copytree(setup["dpo"], copy)
    r = launch_train(aligndistil_argv(dict(setup, rev=str(copy)), str(tmp_path / "copy"), iters=1))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"--dpo-load {setup['dpo']} and --rev-load {copy} hold the same weights" in r.stderr, r.stderr[-2000:]

    padded = tmp_path / "rev_padding_only"
    shutil.copytree(setup["dpo"], padded)
    for f in padded.glob("*.safetensors"):
        tensors = load_file(str(f))
        if "output_layer.weight" in tensors:
            tensors["output_layer.weight"][1001:] = 1.0  # rows past the 1001 ids: masked in every softmax
            save_file(tensors, str(f), metadata={"format": "pt"})
    save = tmp_path / "tvd0"
    r = launch_train(aligndistil_argv(dict(setup, rev=str(padded)), str(save), iters=1))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "iteration 1: the DPO teacher" in r.stderr and "give the same distribution at all" in r.stderr
    assert "the token weight beta0/alpha is 100" in r.stderr and "stopped before the optimizer step" in r.stderr
    assert not (save / "latest_checkpointed_iteration.txt").exists()


def test_wandb_offline_run_holds_every_metric_and_continues_on_resume(setup, tmp_path, monkeypatch):
    """--wandb-project (Megatron-LM's flags) with WANDB_MODE=offline: a job stopped at iteration 2
    (--exit-interval) and relaunched is one W&B run (its id kept in <save>/wandb_run_id), and its
    log holds every numeric field of every metrics.jsonl line (W&B writes values as JSON text)."""
    import glob

    monkeypatch.setenv("WANDB_MODE", "offline")
    save = str(tmp_path / "wb")
    flags = ["--wandb-project", "aligndistil-test", "--wandb-exp-name", "resumed", "--no-export"]
    assert run_distributed(run_train, 2, args=(aligndistil_argv(setup, save, *flags, "--exit-interval", "2",
                                                                iters=3),)) == [0, 0]
    run_id = open(os.path.join(save, "wandb_run_id")).read()
    assert run_distributed(run_train, 2, args=(aligndistil_argv(setup, save, *flags, iters=3),)) == [0, 0]
    assert open(os.path.join(save, "wandb_run_id")).read() == run_id
    logs = sorted(glob.glob(os.path.join(save, "wandb", "offline-run-*", f"run-{run_id}.wandb")))
    assert len(logs) == 2  # one per launch, the same run
    data = b"".join(open(f, "rb").read() for f in logs)
    metrics = read_metrics(os.path.join(save, "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for key, value in m.items():
            if key != "iteration" and isinstance(value, float):
                assert f"train/{key}".encode() in data and json.dumps(value).encode() in data, (m["iteration"], key)
