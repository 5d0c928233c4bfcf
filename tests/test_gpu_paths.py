"""GPU-only branches that CPU runs never enter, tested with their inputs made by hand: vLLM's
memory share and wake, the RNG state a vLLM start-up must not change, and an out-of-memory
inside a compiled loss kernel. And the first-GPU check itself, as CI runs it (--cpu-rehearsal)."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_aligndistil.core.errors import UserError

GIB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vllm_share_leaves_room_for_the_optimizer_state_still_to_come():
    from megatron_aligndistil.rollout.vllm import VLLM_RESERVE_BYTES, vllm_memory_share

    assert VLLM_RESERVE_BYTES == 2 * GIB
    # 80 GiB card, 50 GiB free after models, Adam moments of 12 GiB still to come: (50 - 12 - 2) / 80
    assert vllm_memory_share(50 * GIB, 80 * GIB, 12 * GIB) == 0.45
    assert vllm_memory_share(79 * GIB, 80 * GIB, 0) == 0.9  # capped
    assert vllm_memory_share(6 * GIB, 80 * GIB, 0) == 0.05  # exactly the least: 4 / 80
    assert vllm_memory_share(int(6.01 * GIB), 80 * GIB, 0) == 0.05  # 4.01 / 80 rounds down to 0.050
    with pytest.raises(UserError, match="--offload-frozen-models.*--rollout-engine megatron"):
        vllm_memory_share(int(5.99 * GIB), 80 * GIB, 0)  # 3.99 / 80 < 0.05
    with pytest.raises(UserError, match=r"40.0 GiB of 80.0 GiB are free.*39.0 GiB more"):
        vllm_memory_share(40 * GIB, 80 * GIB, 39 * GIB)


def test_vllm_memory_arguments_size_the_share_only_when_not_given(monkeypatch):
    """None: torch's cache is emptied, then the free memory is read; a given share is kept as is."""
    from megatron_aligndistil.rollout.vllm import gpu_memory_kwargs

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: calls.append("mem_get_info") or (50 * GIB, 80 * GIB))
    assert gpu_memory_kwargs(None, 12 * GIB) == {"gpu_memory_utilization": 0.45, "enable_sleep_mode": True}
    assert calls == ["empty_cache", "mem_get_info"]
    assert gpu_memory_kwargs(0.3, 12 * GIB) == {"gpu_memory_utilization": 0.3, "enable_sleep_mode": True}
    assert calls == ["empty_cache", "mem_get_info"]


def test_pending_optimizer_bytes_counts_moments_not_yet_made():
    """Two fp32 moments per parameter without state; none once the optimizer has stepped; the
    parameters of every optimizer of a chained (Megatron) one."""
    from megatron_aligndistil.rollout.vllm import pending_optimizer_bytes

    a, b = torch.nn.Linear(10, 6), torch.nn.Linear(3, 2, bias=False)
    opt_a, opt_b = torch.optim.AdamW(a.parameters()), torch.optim.AdamW(b.parameters())
    assert pending_optimizer_bytes(None) == 0
    assert pending_optimizer_bytes(opt_a) == 8 * 66

    class Megatron:  # MegatronOptimizer holds the torch optimizer as .optimizer
        def __init__(self, inner):
            self.optimizer = inner

    class Chained:
        chained_optimizers = [Megatron(opt_a), Megatron(opt_b)]

    assert pending_optimizer_bytes(Chained()) == 8 * 72
    a(torch.ones(1, 10)).sum().backward()
    opt_a.step()
    assert pending_optimizer_bytes(Chained()) == 8 * 6


class _FakeLLM:
    def __init__(self, calls):
        self.calls = calls

    def wake_up(self, tags):
        self.calls.append(("wake_up", tags))


def test_vllm_wake_frees_the_allocator_cache_first(monkeypatch):
    """On a GPU, each wake returns the trainer's cached blocks to the device before vLLM allocates
    outside torch's allocator; an awake engine does nothing."""
    from megatron_aligndistil.rollout.vllm import VLLMEngine

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.cuda, engine._awake, engine.llm = True, set(), _FakeLLM(calls)
    engine._wake("weights")
    engine._wake("weights")
    engine._wake("kv_cache")
    assert calls == ["empty_cache", ("wake_up", ["weights"]), "empty_cache", ("wake_up", ["kv_cache"])]


def test_vllm_start_up_leaves_every_generator_as_it_was(monkeypatch):
    """vLLM seeds Python's, NumPy's, torch's and (torch.manual_seed) the CUDA generators; all are
    restored. The CUDA state is stood in for on CPU: its get/set pair records what it holds."""
    from megatron_aligndistil.rollout import vllm

    cuda_state = {"state": ["cuda-rng-A"]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(cuda_state["state"]))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: cuda_state.update(state=list(s)))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with vllm._preserved_rng():
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        cuda_state["state"] = ["reseeded by vLLM"]
    assert (random.random(), np.random.rand(), torch.rand(1)) == before
    assert cuda_state["state"] == ["cuda-rng-A"]

    def no_cuda(*args):
        raise AssertionError("CUDA RNG touched without CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # without CUDA: not touched
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_cuda)
    random.seed(1)
    with vllm._preserved_rng():
        random.seed(0)
    assert random.random() == before[0]


def test_an_out_of_memory_in_a_compiled_kernel_is_raised_not_a_switch_to_eager(monkeypatch):
    """A compile failure falls back to eager (and says so); an out-of-memory is the batch's
    problem: it reaches the user, and the kernel stays compiled for the next step."""
    from megatron_aligndistil.loss import vocab_parallel

    def kernel(x):
        return x + 1

    behaviour = []

    def fake_compiled(*args):
        raise behaviour[-1]

    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: fake_compiled)
    run = vocab_parallel.compiled(kernel, variant=("oom-test",))
    behaviour.append(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(torch.OutOfMemoryError):
        run(torch.ones(2))
    assert "kernel" not in vocab_parallel.compile_failures()
    behaviour.append(RuntimeError("inductor: no C++ compiler"))
    try:
        with pytest.warns(UserWarning, match="torch.compile of kernel failed"):
            assert torch.equal(run(torch.ones(2)), torch.full((2,), 2.0))
        assert "kernel" in vocab_parallel.compile_failures()
    finally:
        vocab_parallel._FAILED.discard(kernel)
        vocab_parallel._COMPILED.pop((kernel, ("oom-test",)), None)


def test_gpu_check_rehearsal_passes_every_check(tmp_path):
    """What CI runs: scripts/gpu_check.sh --cpu-rehearsal writes results.json and results.md with
    every check ok (transformer_engine skipped, with its reason)."""
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--cpu-rehearsal", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=900)
    report = json.load(open(tmp_path / "results.json"))
    names = [c["name"] for c in report["checks"]]
    assert names == ["env", "loss_float64", "loss_vs_megatron_ce", "train_3_iters", "step_1p5b", "sampler",
                     "transformer_engine"]
    failed = {c["name"]: c.get("error") for c in report["checks"] if not c["ok"]}
    assert r.returncode == 0 and not failed, (failed, r.stdout[-3000:], r.stderr[-3000:])
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks["train_3_iters"]) >= {"sft", "dpo", "aligndistil", "aligndistil_on_policy"}
    assert checks["train_3_iters"]["tied_embeddings"] and checks["train_3_iters"]["qk_layernorm"]
    assert all(len(checks["train_3_iters"][m]["device_loss"]) == 3 for m in ("sft", "dpo", "aligndistil"))
    assert checks["step_1p5b"]["aligndistil"]["tokens_per_s"] > 0 and checks["sampler"]["new_tokens"] > 0
    assert [checks["step_1p5b"][k]["recompute"] for k in ("sft", "aligndistil_recompute")] == [None, "full"]
    assert "TransformerEngine" in checks["transformer_engine"]["skipped"]
    assert "| train_3_iters | yes |" in (tmp_path / "results.md").read_text()


def test_gpu_check_reports_a_failing_check_and_exits_1(tmp_path, monkeypatch):
    """A check that raises is reported (error, traceback) and the others still run; exit 1. Without
    CUDA and without --cpu-rehearsal the script refuses at once (exit 2)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_check

    def boom(ctx):
        raise RuntimeError("the device fell off")

    monkeypatch.setitem(gpu_check.CHECKS, "loss_float64", boom)
    assert gpu_check.main(["--out", str(tmp_path), "--cpu-rehearsal", "--only", "loss_float64", "env"]) == 1
    report = json.load(open(tmp_path / "results.json"))
    assert [(c["name"], c["ok"]) for c in report["checks"]] == [("loss_float64", False), ("env", True)]
    assert "the device fell off" in report["checks"][0]["error"]
    assert "| loss_float64 | **NO** |" in (tmp_path / "results.md").read_text()
    assert gpu_check.main(["--out", str(tmp_path / "x")]) == 2
