"""Small building blocks shared by the vocab-parallel losses: TP group, shard ranges, collectives.

A logits shard is ``[N, V_local]``; TP rank k holds global vocab ids ``[k*V_local, (k+1)*V_local)``
(Megatron's ColumnParallel layout). Entries at or beyond the real ``vocab_size`` are padding: they
sit at the end of the global vocab, so on every rank the valid entries are a prefix of the shard.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Temporaries per chunk are a few [chunk, V_local] float32 tensors; this bounds one of them.
# GPUs want big chunks (few kernel launches); CPUs want cache-sized ones (no page faults).
GPU_CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32
CPU_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32
# A fused (compiled) kernel that streams rows and keeps no [chunk, V_local] temporary: bigger
# chunks only save calls (measured best on CPU for the step-major loss; docs/loss.md).
CPU_STREAMING_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class Shard:
    """Where this rank's vocab shard sits. ``valid`` entries (a prefix) are real vocab ids."""

    group: object
    rank: int
    world: int
    start: int
    size: int
    valid: int

    def collectives(self) -> bool:
        return self.world > 1


def resolve_group(group):
    """The TP group: ``group`` if given, else Megatron's TP group if initialised, else None (1 rank)."""
    if group is not None:
        return group
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_tensor_model_parallel_group()
    except ImportError:  # the loss does not need Megatron to run
        pass
    return None


def shard_info(local_vocab: int, vocab_size: int | None, group) -> Shard:
    group = resolve_group(group)
    if group is None or not dist.is_initialized():
        rank, world, group = 0, 1, None
    else:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    start = rank * local_vocab
    if vocab_size is None:
        valid = local_vocab
    else:
        if vocab_size > local_vocab * world:
            raise ValueError(
                f"vocab_size {vocab_size} exceeds the vocab of the logits ({local_vocab} x {world} TP ranks)"
            )
        valid = max(0, min(local_vocab, vocab_size - start))
    return Shard(group, rank, world, start, local_vocab, valid)


def all_gather_rows(values: torch.Tensor, shard: Shard) -> torch.Tensor:
    """``[N, k]`` per rank -> ``[world, N, k]`` (one all-gather). No collective with one rank."""
    if not shard.collectives():
        return values.unsqueeze(0)
    values = values.contiguous()
    out = values.new_empty((shard.world * values.shape[0],) + tuple(values.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.13
    gather(out, values, group=shard.group)  # gloo wants the flat [world * N, ...] layout
    return out.view((shard.world,) + tuple(values.shape))


def all_reduce_sum(values: torch.Tensor, shard: Shard) -> torch.Tensor:
    if shard.collectives():
        dist.all_reduce(values, group=shard.group)
    return values


def combine_lse(local_lse: torch.Tensor) -> torch.Tensor:
    """Global log-sum-exp from per-rank ones ``[world, ...]`` (ranks with only -inf are fine)."""
    return torch.logsumexp(local_lse, dim=0)


def chunks(n_tokens: int, local_vocab: int, chunk_size: int | None, streaming: bool = False):
    """Token ranges ``(begin, end)`` so one float32 temporary stays within the chunk budget.

    ``streaming``: the per-chunk work is a fused kernel without chunk-sized temporaries.
    """
    if chunk_size is None:
        if torch.cuda.is_available():
            budget = GPU_CHUNK_ELEMENTS
        else:
            budget = CPU_STREAMING_CHUNK_ELEMENTS if streaming else CPU_CHUNK_ELEMENTS
        chunk_size = max(1, budget // max(1, local_vocab))
    for begin in range(0, n_tokens, chunk_size):
        yield begin, min(n_tokens, begin + chunk_size)


# exp(x) for x below this is under float32's smallest normal number (e^-87.34): such results are
# flushed to exactly 0, as GPUs do, because CPU arithmetic on subnormal floats is ~20x slower
# (extrapolated teacher logits z* span hundreds of nats, so most of their exps would be subnormal).
EXP_FLUSH_BELOW = -87.0


def flushed_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x), with 0 wherever it would be a float32 subnormal (error < 1.2e-38 per entry)."""
    return torch.exp(torch.where(x < EXP_FLUSH_BELOW, float("-inf"), x))


def local_logsumexp(z: torch.Tensor, flush: bool = False) -> torch.Tensor:
    """log-sum-exp over the last dim; -inf for an empty or fully masked (all -inf) row.

    Written with elementwise ops so torch.compile fuses it into the loss kernels.
    """
    if z.shape[-1] == 0:
        return z.new_full(z.shape[:-1], float("-inf"))
    m = z.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)  # all-masked row; a comparison (isfinite is scalar in Inductor)
    return (flushed_exp(z - m) if flush else torch.exp(z - m)).sum(-1).log() + m.squeeze(-1)


def use_compile() -> bool:
    """Whether the loss kernels are fused with torch.compile when the config leaves it open
    (``AlignDistilLossConfig.compile`` None, ``--loss-compile auto``): on with CUDA (Triton), off
    on CPU (Inductor's C++ compile takes ~20 s per kernel the first time)."""
    return torch.cuda.is_available()


_COMPILED: dict = {}  # (eager kernel, variant) -> its compiled runner
_FAILED: set = set()  # eager kernels whose compilation failed (they run eager from then on)


def compiled(fn, variant=None):
    """``torch.compile(fn, dynamic=True)``, made once per process and variant; eager if compiling fails.

    ``variant`` (hashable: the Python-level settings ``fn`` branches on) gets its own copy of
    ``fn``'s code object, so each variant has its own Dynamo cache: a process that runs several
    loss variants never exhausts Dynamo's recompile limit and silently falls back to eager.
    """
    if (fn, variant) not in _COMPILED:
        target = fn
        if variant is not None:
            target = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                        fn.__defaults__, fn.__closure__)
        fast = torch.compile(target, dynamic=True)

        def run(*args):
            if fn in _FAILED:
                return fn(*args)
            try:
                return fast(*args)
            except torch.OutOfMemoryError:
                raise  # the batch does not fit: eager would not either, and must not become the default
            except Exception as exc:  # noqa: BLE001 - no compiler / unsupported backend: stay eager
                import warnings

                warnings.warn(f"torch.compile of {fn.__name__} failed ({exc!r:.200}); using eager kernels")
                _FAILED.add(fn)
                return fn(*args)

        _COMPILED[(fn, variant)] = run
    return _COMPILED[(fn, variant)]


def compile_failures() -> list[str]:
    """Names of kernels whose torch.compile failed in this process (they run eager)."""
    return sorted(fn.__name__ for fn in _FAILED)
