"""Full (TP1, all layers) Megatron state dicts <-> the local shards of a TP/PP-parallel GPT model.

Names are Megatron-Core's with *global* layer numbers, e.g. ``decoder.layers.7.mlp.linear_fc1.weight``.
Tensor-parallel parameters carry Megatron's ``tensor_model_parallel``/``partition_dim`` attributes;
the SwiGLU ``linear_fc1`` is the one whose shard is not a plain chunk: the full tensor is
``[gate; up]`` and each rank holds ``[gate_k; up_k]``. QKV needs no special case: Megatron's full
layout is grouped per KV group, and TP splits whole groups.

MoE experts (``decoder.layers.L.mlp.experts.local_experts.J.*``, J the *global* expert index in
full names) live on one expert-parallel rank each: rank r of EP holds experts
``[r E/EP, (r+1) E/EP)`` as its local experts 0.. E/EP-1, and their tensor-parallel shards are cut
over the expert-tensor-parallel group (``--expert-tensor-parallel-size``), not the TP group. The
router and the shared expert are ordinary (replicated / TP-sharded) parameters.
"""

from __future__ import annotations

import re

import torch
from .errors import UserError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"


def layer_offset(model) -> int:
    """Global index of this pipeline stage's first transformer layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def to_global_name(local_name: str, offset: int) -> str:
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local_name)


def is_expert(name: str) -> bool:
    """Whether ``name`` is a routed expert's tensor (sharded over EP and expert-TP)."""
    return ".mlp.experts." in name


def expert_offset(model) -> int:
    """Global index of this expert-parallel rank's first expert (0 for dense models and EP 1)."""
    experts = getattr(getattr(model, "config", None), "num_moe_experts", None)
    if not experts:
        return 0
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_rank() * (
        experts // parallel_state.get_expert_model_parallel_world_size())


def is_glu_fc1(name: str) -> bool:
    return name.endswith("linear_fc1.weight") or name.endswith("linear_fc1.bias")


def _tp(name: str = ""):
    """(rank, size) of the group that shards ``name``: expert-TP for experts, else TP."""
    from megatron.core import parallel_state

    if is_expert(name):
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _tp_group(name: str):
    from megatron.core import parallel_state

    if is_expert(name):
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def shard_ranges(name: str, full_shape, param: torch.Tensor, tp_rank: int, tp: int):
    """``[(dim, start, stop), ...]`` of the full tensor that make this rank's shard (concatenated
    along ``dim``). One range for plain chunks; two for the SwiGLU fc1 (gate part, up part)."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return [(0, 0, full_shape[0])]
    dim = param.partition_dim
    if is_glu_fc1(name):
        half = full_shape[dim] // 2
        size = half // tp
        return [(dim, tp_rank * size, (tp_rank + 1) * size),
                (dim, half + tp_rank * size, half + (tp_rank + 1) * size)]
    size = full_shape[dim] // tp
    return [(dim, tp_rank * size, (tp_rank + 1) * size)]


def shard(name: str, full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """The part of ``full`` that TP rank ``tp_rank`` of ``tp`` holds for parameter ``param``."""
    ranges = shard_ranges(name, full.shape, param, tp_rank, tp)
    parts = [full.narrow(dim, a, b - a) for dim, a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=ranges[0][0])


def unshard(name: str, parts: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from the shards of all TP ranks (in rank order)."""
    if len(parts) == 1 or not getattr(param, "tensor_model_parallel", False):
        return parts[0]
    dim = param.partition_dim
    if is_glu_fc1(name):
        gates, ups = zip(*(p.chunk(2, dim=dim) for p in parts))
        return torch.cat([torch.cat(gates, dim=dim), torch.cat(ups, dim=dim)], dim=dim)
    return torch.cat(parts, dim=dim)


# TransformerEngine's spec fuses each norm into the following linear layer; checkpoints and the
# HF mapping use the local spec's names, so TE names are translated to them.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def canonical_name(name: str) -> str:
    """The local-spec name of a parameter name from either layer spec."""
    for te, local in _TE_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def full_name(model, local_name: str) -> str:
    """Global name of a local parameter; a tied output-layer copy maps to the embedding."""
    name = canonical_name(to_global_name(local_name, layer_offset(model)))
    if ".local_experts." in name:
        offset = expert_offset(model)
        name = _LOCAL_EXPERT.sub(lambda m: f".mlp.experts.local_experts.{int(m.group(1)) + offset}.", name)
    if name == OUTPUT and getattr(model, "share_embeddings_and_output_weights", False):
        return EMBEDDING
    return name


def _vocab_rows_reader(read, stored_rows: int):
    """``read`` of a vocab tensor with ``stored_rows`` rows as if it had any number: rows past
    the stored ones read as zeros, stored rows past the model's are never read."""
    def read_rows(name, dim, a, b):
        part = read(name, dim, min(a, stored_rows), min(b, stored_rows))
        if part.shape[0] == b - a:
            return part
        out = part.new_zeros((b - a,) + tuple(part.shape[1:]))
        out[: part.shape[0]] = part
        return out
    return read_rows


@torch.no_grad()
def _load(model, has, full_shape, read, source: str, strict: bool, vocab_rows: bool = False) -> None:
    for local_name, param in model.named_parameters():
        name = full_name(model, local_name)
        tp_rank, tp = _tp(name)
        if not has(name):
            if strict:
                raise UserError(f"{source}: tensor {name!r} (for parameter {local_name}) is missing")
            continue
        shape, read_part = full_shape(name), read
        if vocab_rows and name in (EMBEDDING, OUTPUT):  # the model's rows, whatever the source's
            rows = param.shape[0] * (tp if getattr(param, "tensor_model_parallel", False) else 1)
            read_part = _vocab_rows_reader(read, shape[0])
            shape = (rows,) + tuple(shape[1:])
        ranges = shard_ranges(name, shape, param, tp_rank, tp)
        parts = [read_part(name, dim, a, b) for dim, a, b in ranges]
        part = parts[0] if len(parts) == 1 else torch.cat(parts, dim=ranges[0][0])
        if part.shape != param.shape:
            raise UserError(
                f"{source}: tensor {name!r}: shard shape {tuple(part.shape)} does not match the "
                f"model's {tuple(param.shape)} (full {tuple(shape)}, TP {tp})"
            )
        param.copy_(part.to(param.dtype))


def load_full_state_dict(model, full: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy the local shards of ``full`` into ``model`` (this rank's TP/PP part).

    Raises KeyError naming the missing tensor and ValueError on a shape mismatch.
    """
    _load(model, full.__contains__, lambda n: full[n].shape,
          lambda n, dim, a, b: full[n].narrow(dim, a, b - a), "state dict", strict)


def load_from_store(model, store, strict: bool = True, vocab_rows: bool = False) -> None:
    """Like :func:`load_full_state_dict`, reading only this rank's slices from a
    :class:`~megatron_aligndistil.core.store.TensorStore` (memory: one shard at a time).
    ``vocab_rows``: the embedding / output layer may have more or fewer rows than the model;
    the model's rows are read, zeros past the stored ones (for a model whose vocab_size differs
    from the one it is built with, compared over a shared tokenizer's ids only)."""
    _load(model, store.__contains__, store.shape, store.get_slice, store.path, strict, vocab_rows)


@torch.no_grad()
def gather_tensor_parallel(name: str, param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Collective over the TP group: the full tensor of ``name`` from every rank's ``tensor``
    (``param``'s shard, or its gradient), in Megatron's full layout (see :func:`unshard`)."""
    _, tp = _tp(name)
    tensor = tensor.detach().contiguous()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor
    if param.partition_dim == 0 and not is_glu_fc1(name):
        # rank-order concatenation on dim 0 is the gathered buffer itself: no second full copy
        full = tensor.new_empty((tp * tensor.shape[0], *tensor.shape[1:]))
        torch.distributed.all_gather_into_tensor(full, tensor, group=_tp_group(name))
        return full
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    torch.distributed.all_gather(parts, tensor, group=_tp_group(name))
    return unshard(name, parts, param)


def full_shape(name: str, param: torch.Tensor) -> list[int]:
    """The shape of ``name``'s full tensor, from this rank's shard ``param``."""
    shape = list(param.shape)
    _, tp = _tp(name)
    if tp > 1 and getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return shape


@torch.no_grad()
def tensor_parallel_pieces(name: str, param: torch.Tensor, tensor: torch.Tensor):
    """Collective over the TP group (every rank must exhaust it): yields the full tensor of
    ``name`` as consecutive pieces of its row-major bytes, from every rank's ``tensor``.

    A tensor split on its first dimension arrives one TP rank's shard at a time, broadcast from
    that rank (the SwiGLU fc1: every rank's gate half, then every rank's up half), so a writer
    holds one shard, never the full tensor; a tensor split on its last dimension (row-parallel)
    interleaves the shards in every row and arrives whole (:func:`gather_tensor_parallel`)."""
    _, tp = _tp(name)
    tensor = tensor.detach().contiguous()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        yield tensor
        return
    if param.partition_dim != 0:
        yield gather_tensor_parallel(name, param, tensor)
        return
    group = _tp_group(name)
    ranks = torch.distributed.get_process_group_ranks(group)
    me = torch.distributed.get_rank()
    halves = tensor.chunk(2, dim=0) if is_glu_fc1(name) else (tensor,)
    for half in halves:
        half = half.contiguous()
        for src in ranks:
            piece = half if src == me else torch.empty_like(half)
            torch.distributed.broadcast(piece, src=src, group=group)
            yield piece


@torch.no_grad()
def gather_full_state_dict(model, use_grad: bool = False) -> dict[str, torch.Tensor]:
    """The full state dict (or full gradients with ``use_grad``) on every rank, as CPU tensors.

    Collective over TP and PP groups. For gradients of tied embeddings under PP, the two copies'
    gradients are summed (what Megatron's embedding-group all-reduce does). Meant for tests and
    small models: it materialises the whole model on each rank.
    """
    from megatron.core import parallel_state

    local: dict[str, torch.Tensor] = {}
    for local_name, param in model.named_parameters():
        t = param.main_grad if use_grad and hasattr(param, "main_grad") else (
            param.grad if use_grad else param.data
        )
        if t is None:
            t = torch.zeros_like(param)
        name = full_name(model, local_name)
        value = gather_tensor_parallel(name, param, t).cpu()
        if name in local:  # tied output copy on the same stage (PP=1): one tensor, not two
            if local_name.startswith("output_layer") and use_grad:
                local[name] = local[name] + value
            continue
        local[name] = value
    ep = parallel_state.get_expert_model_parallel_world_size()
    if ep > 1:  # each expert-parallel rank holds its own experts: every rank gets all of them
        mine = {n: v for n, v in local.items() if is_expert(n)}
        ranks: list = [None] * ep
        torch.distributed.all_gather_object(ranks, mine, group=parallel_state.get_expert_model_parallel_group())
        for part in ranks:
            local.update(part)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    stages: list = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(stages, local, group=pp_group)
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, value in stage.items():
            if name in merged:
                if use_grad:
                    merged[name] = merged[name] + value
            else:
                merged[name] = value
    return merged
