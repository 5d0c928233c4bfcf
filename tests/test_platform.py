"""The platform module: CPU routing of Megatron's CUDA calls, and that it is the only such place."""

import pathlib
import re

import pytest
import torch

from megatron_aligndistil import platform
from megatron_aligndistil.core.parallel import Layout
from megatron_aligndistil.testing import DistributedError, run_distributed

PACKAGE = pathlib.Path(platform.__file__).parent


def _shim_checks():
    from megatron.core import tensor_parallel

    assert platform.shims_active()
    assert platform.backend() == "gloo"
    assert torch.distributed.get_backend() == "gloo"
    out = {}
    out["current_device"] = str(torch.cuda.current_device())
    out["zeros"] = str(torch.zeros(3, device="cuda").device)
    out["empty_dev"] = str(torch.empty(2, device=torch.device("cuda", 0)).device)
    out["tensor_cuda"] = str(torch.ones(2).cuda().device)
    out["to_cuda"] = str(torch.ones(2).to("cuda").device)
    out["type_name"] = torch.ones(1).type()
    out["type_convert"] = torch.ones(1).type(torch.float64).dtype  # with an argument: untouched
    class AllocatesInside(torch.autograd.Function):  # e.g. Megatron's activation recompute
        @staticmethod
        def forward(ctx, x):
            return x + torch.ones(1, device="cuda")

        @staticmethod
        def backward(ctx, g):
            return g

    out["inside_function"] = str(AllocatesInside.apply(torch.zeros(2, requires_grad=True)).device)
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(torch.cuda.current_stream())
    # torch.cuda.Stream stays a class: annotations like transformers' "torch.cuda.Stream | None"
    # must still import after the shims (the reward-model judge loads transformers in-process)
    side = torch.cuda.Stream(device="cuda", priority=-1)
    out["stream_is_class"] = isinstance(side, torch.cuda.Stream) and (torch.cuda.Stream | None) is not None
    from transformers.generation.continuous_batching import utils as cb_utils  # noqa: F401
    # RNG tracker: forked region has its own reproducible stream; default stream resumes after it
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    with tracker.fork():
        forked_a = torch.rand(3)
    after = torch.rand(3)
    with tracker.fork():
        forked_b = torch.rand(3)
    out["default_stream_untouched"] = bool(torch.equal(before, after))
    out["fork_advances"] = not torch.equal(forked_a, forked_b)
    out["seed_with_tracker"] = forked_a
    return out


def test_cpu_shims_route_cuda_calls_to_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU shims are only installed without CUDA")
    r0, r1 = run_distributed(_shim_checks, 2, layout=Layout(tp=2, pp=1), seed=3)
    for r in (r0, r1):
        assert r["current_device"] == "cpu"
        assert r["zeros"] == r["empty_dev"] == r["tensor_cuda"] == r["to_cuda"] == "cpu"
        assert r["inside_function"] == "cpu"
        assert r["type_name"] == "torch.cuda.FloatTensor"
        assert r["type_convert"] == torch.float64
        assert r["default_stream_untouched"] and r["fork_advances"] and r["stream_is_class"]
    # the model-parallel RNG stream differs between TP ranks (Megatron's seed + 2718 + tp_rank)
    assert not torch.equal(r0["seed_with_tracker"], r1["seed_with_tracker"])


def test_no_shims_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    assert platform.install_cpu_shims() is False
    assert not platform.shims_active()
    assert platform.backend() == "nccl"


def _raise_on_rank_one():
    if torch.distributed.get_rank() == 1:
        raise RuntimeError("boom on rank one")
    torch.distributed.barrier()  # rank 0 would hang here without the harness killing it


def test_harness_reports_rank_traceback_and_kills_hung_ranks():
    with pytest.raises(DistributedError, match="boom on rank one"):
        run_distributed(_raise_on_rank_one, 2, timeout=120)


def test_platform_is_the_only_cuda_routing_module():
    """No other module assigns to torch.cuda.* or patches Megatron's CUDA RNG helpers."""
    patch = re.compile(r"^\s*(torch\.cuda\.\w+|cuda\.\w+|\w+\._(get|set)_cuda_rng_state)\s*=", re.M)
    offenders = [
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
        if p.name != "platform.py" and patch.search(p.read_text())
    ]
    assert offenders == []
    assert patch.search((PACKAGE / "platform.py").read_text())


def test_te_parameter_names_map_to_the_checkpoint_names():
    from megatron_aligndistil.models.qwen import use_transformer_engine
    from megatron_aligndistil.core.sharding import canonical_name

    assert canonical_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.weight") == "decoder.layers.0.mlp.linear_fc1.weight"
    if not torch.cuda.is_available():
        assert use_transformer_engine() is False  # CPU: always the local spec


def test_megatron_import_notes_are_quiet_on_cpu():
    """'Transformer Engine and Apex are not installed' is for GPU users (once, rank 0): importing
    the package first keeps Megatron's import-time notes off a CPU run's stderr (issue 15 item 5)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    code = "import megatron_aligndistil, megatron.core.optimizer, megatron.core.tensor_parallel"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    if not torch.cuda.is_available():
        assert "Apex" not in r.stderr and "Transformer Engine" not in r.stderr, r.stderr[-2000:]


def test_a_step_scores_micro_batches_on_the_compute_device():
    """The host-side code of a training step (method loss + statistics) with every logit on a
    non-CPU device ('meta' here, CUDA on a GPU): a tensor made without a device (the CPU) mixed
    into it fails here, not at a user's first GPU step (issue 15 item 18)."""
    from megatron_aligndistil.config import AlignDistilLossConfig, DPOConfig
    from megatron_aligndistil.train.aligndistil import AlignDistil
    from megatron_aligndistil.train.dpo import DPO
    from megatron_aligndistil.train.method import score_micro_batch
    from megatron_aligndistil.train.sft import SFT

    record = {"prompt_ids": [1, 2, 3], "response_ids": [4, 5], "chosen_ids": [4, 5], "rejected_ids": [6]}
    aligndistil = AlignDistil(AlignDistilLossConfig(plausibility_threshold=0.1), "dpo", rev_load="rev")
    for method, roles in ((aligndistil, ("policy", "dpo", "rev")), (SFT(), ("policy",)),
                          (DPO(DPOConfig(), "ref"), ("policy", "ref"))):
        for pack in (None, 16):
            (batch,), _ = method.micro_batches([record, record], 2 * method.sequences_per_record, pack_length=pack)
            rows = batch.tokens.shape
            logits = {r: torch.empty(*rows, 64, device="meta", requires_grad=r == "policy") for r in roles}
            loss, n_examples, stats, bad = score_micro_batch(method, logits, batch, vocab_size=60)
            for t in (loss, n_examples, stats, bad):
                assert t.device.type == "meta", (method.name, t)
            assert stats.shape == (2 + len(method.stat_names),) and bad.shape == (len(roles),)
            assert loss.requires_grad


def test_vllm_cpu_shared_memory_is_named_after_the_job(monkeypatch):
    """Two torchrun jobs on one host (or one after a killed job) must not share vLLM's CPU
    shared-memory segment names: they are named after the job's rendezvous."""
    import importlib.util

    from megatron_aligndistil import platform

    if importlib.util.find_spec("vllm") is None or torch.cuda.is_available():
        assert platform.name_vllm_cpu_shared_memory() is False
        return
    from types import SimpleNamespace

    from vllm.distributed.device_communicators import cpu_communicator

    monkeypatch.setattr(cpu_communicator._CPUSHMDistributed, "make_group_name",
                        cpu_communicator._CPUSHMDistributed.make_group_name)  # restored after the test
    monkeypatch.setattr(cpu_communicator._CPUSHMDistributed, "_aligndistil_named", False, raising=False)
    monkeypatch.setenv("VLLM_DIST_IDENT", "//")  # what vLLM derives from the env:// of every torchrun job
    assert platform.name_vllm_cpu_shared_memory() is True
    assert platform.name_vllm_cpu_shared_memory() is True  # once: a second call does not wrap it again
    comm = SimpleNamespace(unique_name="tp:0", ranks=[0, 1])
    names = set()
    for port in ("29500", "29501"):
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", port)
        names.add(cpu_communicator._CPUSHMDistributed.make_group_name(comm))
    assert names == {"aligndistil-127.0.0.1:29500-tp:0-[0-1]-cpushm", "aligndistil-127.0.0.1:29501-tp:0-[0-1]-cpushm"}


def test_vllm_shared_memory_naming_is_a_no_op_where_it_does_not_apply(monkeypatch):
    """With CUDA, without vLLM's CPU communicator, or without its shared-memory class: nothing is
    patched and the call says so."""
    import sys

    from megatron_aligndistil import platform

    pytest.importorskip("vllm")
    from vllm.distributed.device_communicators import cpu_communicator

    shm = cpu_communicator._CPUSHMDistributed
    before = shm.make_group_name
    monkeypatch.setattr(shm, "_aligndistil_named", False, raising=False)
    monkeypatch.setattr(platform, "has_cuda", lambda: True)
    assert platform.name_vllm_cpu_shared_memory() is False
    monkeypatch.setattr(platform, "has_cuda", lambda: False)
    monkeypatch.setitem(sys.modules, "vllm.distributed.device_communicators.cpu_communicator", None)
    monkeypatch.delattr(sys.modules["vllm.distributed.device_communicators"], "cpu_communicator")
    assert platform.name_vllm_cpu_shared_memory() is False  # an ImportError
    monkeypatch.undo()
    monkeypatch.setattr(cpu_communicator, "_CPUSHMDistributed", None)
    assert platform.name_vllm_cpu_shared_memory() is False
    assert shm.make_group_name is before and not getattr(shm, "_aligndistil_named", False)


def test_the_gradient_norm_is_accurate_on_large_tensors():
    """torch's float32 CPU norm is ~0.6% off on a 68M-element tensor; Megatron's gradient norm
    (clipping, logged grad_norm) goes through the float64-accumulating replacement on CPU."""
    from megatron_aligndistil import platform

    platform.setup_platform()
    from megatron.core.optimizer import clip_grads

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(152_576 * 448, generator=g) * 1e-5, torch.randn(1000, generator=g) * 1e-5]
    exact = float(torch.sqrt(sum((t.double() ** 2).sum() for t in grads)))
    norm, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, torch.zeros(1, dtype=torch.int), [grads], False)
    assert float(norm) == pytest.approx(exact, rel=1e-6)
    if not torch.cuda.is_available():  # what torch's own float32 norm gives here
        assert abs(float(torch.sqrt(grads[0].norm() ** 2 + grads[1].norm() ** 2)) / exact - 1) > 1e-3
