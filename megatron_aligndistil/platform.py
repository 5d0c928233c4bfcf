"""Device and backend choice, and the only place that routes Megatron-Core's CUDA calls to the CPU.

Megatron-Core 0.16.1 assumes CUDA in a handful of places (RNG tracker, ``device="cuda"`` buffers,
``torch.cuda.current_device()`` as a device, stream/synchronize calls, ``Tensor.cuda()``, and
``param.type() == "torch.cuda.FloatTensor"`` checks in its optimizers). On a machine with CUDA,
:func:`setup_platform` does nothing but pick the device and NCCL. On a CPU-only machine it installs
the shims below, once per process, so the *same* Megatron code paths run with gloo:

* ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` (used as a ``device=`` argument);
* ``torch.cuda.synchronize``/``empty_cache``/``set_device`` are no-ops; ``current_stream``/
  ``default_stream``/``stream`` return a do-nothing stream;
* the CUDA RNG used by Megatron's RNG tracker is the CPU default generator
  (``torch.cuda.get_rng_state``/``set_rng_state``/``manual_seed`` and the tracker's private
  ``_get_cuda_rng_state``/``_set_cuda_rng_state``);
* the tensor factories in the ``torch`` namespace (``torch.zeros``, ``torch.empty``, ...) map
  ``device="cuda"`` to the CPU; ``Tensor.cuda()`` returns the tensor, ``Tensor.to("cuda")`` stays
  on the CPU, and ``Tensor.type()`` (no argument) reports the ``torch.cuda.*Tensor`` name
  Megatron's optimizers check for. (Plain wrappers, not a TorchFunctionMode: a mode is switched
  off inside ``autograd.Function``s such as activation recompute, where Megatron also allocates.)

One shim is vLLM's (its CPU build, ``--rollout-engine vllm``), installed by
:func:`name_vllm_cpu_shared_memory` when the engine starts on a CPU-only machine:

* vLLM's CPU tensor-parallel communicator names its shared-memory segments after the launch's
  init method, which is the same (``env://``) for every torchrun job: two jobs on one host, or a
  job after one that was killed (its segments are left in ``/dev/shm``), fail with ``create shm in
  SHMManager failed. errno: 17``. The segments are named after this job's rendezvous
  (``MASTER_ADDR:MASTER_PORT``) instead.

One shim is not about the CPU but about TransformerEngine being absent (on any machine):
Megatron-Core 0.16.1's MoE router reads ``te_general_gemm`` in ``moe_utils`` whether or not TE
imported, so without TE it raises ``NameError``; :func:`define_missing_te_names` defines it as
None, which is the value Megatron's own code tests for (its fallback is ``torch.matmul``).

One shim changes how a number is computed, to make it exact: the gradient norm (clipping and the
logged ``grad_norm``) sums squares in float64 (:func:`_accurate_l2_norm`) where Megatron would
call torch's float32 CPU ``norm``, which is off by about 1% on a 68M-element embedding gradient.

Nothing else here changes numerics: every other shim only changes *where* a tensor lives. Tests in
``tests/test_platform.py`` cover each shim; on a CUDA machine they assert that nothing is patched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

_INSTALLED = False



def quiet_known_warnings() -> None:
    """Silence Megatron-Core's import-time notes that say nothing to the user of this package.

    Called by the package's ``__init__``, so it runs before any module imports Megatron. "Transformer
    Engine and Apex are not installed" matters only on a GPU, and there only once: it is kept on
    rank 0 of a machine with CUDA and silenced everywhere else. Deprecation notes that Megatron's
    own calls trigger in this torch version are silenced too.
    """
    if not torch.cuda.is_available() or os.environ.get("RANK", "0") != "0":
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=".*torch.cuda.amp.custom_(fwd|bwd).*")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated.*")


quiet_known_warnings()

_FACTORY_NAMES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "as_tensor", "linspace", "eye", "empty_strided", "randperm",
)


def has_cuda() -> bool:
    """True when a usable CUDA device is present (then no shim is ever installed)."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on: its local CUDA device, else the CPU."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend() -> str:
    """``torch.distributed`` backend that follows the device: NCCL on GPUs, gloo on CPU."""
    return "nccl" if has_cuda() else "gloo"


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    return False


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream`` on CPU: every call is a no-op (CPU work is in order).

    Installed as the class itself (not a factory function), so code that uses it in annotations,
    e.g. transformers' ``torch.cuda.Stream | None``, still imports after the shims are in."""

    def __init__(self, *_a, **_k):
        pass

    def wait_stream(self, *_a, **_k):
        return None

    def wait_event(self, *_a, **_k):
        return None

    def record_event(self, *_a, **_k):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


def _cpu_factory(fn):
    """Wrap a tensor factory so ``device="cuda..."`` lands on the CPU."""

    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    factory.__wrapped__ = fn
    return factory


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _patch_tensor_methods() -> None:
    """``Tensor.cuda()`` -> self, ``Tensor.to("cuda")`` -> CPU, ``Tensor.type()`` -> cuda name."""
    orig_to, orig_type = torch.Tensor.to, torch.Tensor.type

    def cuda(self, *args, **kwargs):
        return self

    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = ("cpu",) + tuple(args[1:])
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return orig_to(self, *args, **kwargs)

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = _CUDA_TYPE_NAMES.get(self.dtype)
            if name is not None:
                return name
            return orig_type(self)
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.cuda = cuda
    torch.Tensor.to = to
    torch.Tensor.type = type_


class _TrackerWarningFilter(logging.Filter):
    """On CPU the tracker's "GPU" RNG *is* the CPU RNG, so its 'CPU RNG state changed' note is moot."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_get_rng_state(*_a, **_k):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, *_a, **_k):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    torch.random.default_generator.manual_seed(int(seed))


def _accurate_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Megatron's fallback for apex's ``multi_tensor_l2norm`` (the gradient norm of clipping and
    of the logged ``grad_norm``), summing squares with float64 accumulation: torch's float32 CPU
    ``norm`` loses 0.6-1.1% on tensors of 10^7+ elements (a Qwen embedding gradient)."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensor_lists[0]:
        for chunk in t.detach().reshape(-1).split(1 << 16):  # a 256 KiB temporary, not one of the gradient's size
            total += torch.sum(chunk * chunk, dtype=torch.float64)
    return total.sqrt().float().reshape(1), None


def install_cpu_shims() -> bool:
    """Install the CPU routing (idempotent). Returns True if shims are active, False on CUDA."""
    global _INSTALLED
    if has_cuda():
        return False
    if _INSTALLED:
        return True
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    stream = _CpuStream()
    cuda.current_stream = lambda *a, **k: stream
    cuda.default_stream = lambda *a, **k: stream
    cuda.Stream = _CpuStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed
    cuda.manual_seed_all = _cpu_manual_seed
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.random.set_rng_state = _cpu_set_rng_state

    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl.__name__ == "local_multi_tensor_l2_norm":  # neither apex nor TE: torch's norm
        clip_grads.l2_norm_impl = _accurate_l2_norm
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_TrackerWarningFilter())

    for name in _FACTORY_NAMES:
        if hasattr(torch, name):
            setattr(torch, name, _cpu_factory(getattr(torch, name)))
    _patch_tensor_methods()
    _INSTALLED = True
    return True


def shims_active() -> bool:
    return _INSTALLED


def define_missing_te_names() -> None:
    """``moe_utils.te_general_gemm = None`` where TransformerEngine did not import (see module doc);
    nothing where TE is present."""
    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def setup_platform() -> torch.device:
    """Pick the device, install CPU shims if there is no GPU, and quiet Megatron's CPU-only warnings.

    Call once per process before building Megatron objects. Returns the compute device.
    """
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    define_missing_te_names()
    if has_cuda():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return device()
    install_cpu_shims()
    return device()


def name_vllm_cpu_shared_memory() -> bool:
    """Name vLLM's CPU shared-memory segments after this job's rendezvous (see the module doc).
    A no-op with CUDA or when vLLM's CPU communicator is absent; returns whether it patched."""
    if has_cuda():
        return False
    try:
        from vllm.distributed.device_communicators import cpu_communicator
    except ImportError:
        return False
    shm = getattr(cpu_communicator, "_CPUSHMDistributed", None)
    if shm is None or getattr(shm, "_aligndistil_named", False):
        return shm is not None
    original = shm.make_group_name

    def make_group_name(communicator) -> str:
        job = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}".replace("/", "_")
        return f"aligndistil-{job}-{original(communicator).lstrip('/-')}"

    shm.make_group_name = staticmethod(make_group_name)
    shm._aligndistil_named = True
    return True
