"""The one driver of Megatron's forward(-backward) schedule: training steps, evaluation and
log-prob passes, and each sampling step of the Megatron rollout engine.

Megatron's schedules move one activation tensor ``[s, rows, h]`` between pipeline stages and call
a loss function on the last stage. :func:`pipeline_rows` is the only place that knows ``rows``
(a micro-batch's rows times the models run in lockstep); the memory planner uses it too.
:func:`drive` feeds a list of micro-batches through one schedule call, so stages overlap over
micro-batches in training and in forward-only passes alike.
"""

from __future__ import annotations

import torch

from .. import platform
from .errors import UserError


def pipeline_rows(rows: int, num_models: int = 1) -> int:
    """Rows of the activation sent between pipeline stages: a micro-batch's rows for each model
    of a :class:`~megatron_aligndistil.core.lockstep.LockstepStage` (policy + frozen)."""
    return rows * num_models


def block_causal_mask(batch) -> torch.Tensor | None:
    """Megatron's attention mask ``[b, 1, s, s]`` (True = masked out) for a packed micro-batch:
    causal inside each sequence, nothing across sequences; None when unpacked (plain causal)."""
    if not batch.packed:
        return None
    b, s = batch.tokens.shape
    allowed = torch.zeros(b, s, s, dtype=torch.bool)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i, spans in enumerate(batch.segments):
        for start, n in spans:
            allowed[i, start: start + n, start: start + n] = causal[:n, :n]
        end = spans[-1][0] + spans[-1][1] if spans else 0
        allowed[i, end:, end:] = causal[: s - end, : s - end]  # padding attends to padding (no NaN rows)
    return ~allowed.unsqueeze(1)


def attention_kwargs(batch, thd: bool = False) -> dict:
    """How a micro-batch tells the model which positions attend to which. Unpacked: nothing
    (Megatron's causal mask). Packed: a block-diagonal causal ``attention_mask`` for the local
    attention (CPU and the tested path), or, with TransformerEngine (``thd``), ``packed_seq_params``
    with ``cu_seqlens`` over the row's sequences (one row per micro-batch in that format)."""
    if not getattr(batch, "packed", False):
        return {}
    if not thd:
        return {"attention_mask": block_causal_mask(batch).to(platform.device())}
    from megatron.core.packed_seq_params import PackedSeqParams

    if batch.rows != 1:
        raise ValueError("TransformerEngine's packed (THD) format takes one row per micro-batch: "
                         "use --micro-batch-size 1 with --pack-sequences")
    s = batch.tokens.shape[1]
    bounds = [0] + [start + n for start, n in batch.segments[0]]
    if bounds[-1] < s:
        bounds.append(s)  # the row's padding is one more segment
    cu = torch.tensor(bounds, dtype=torch.int32, device=platform.device())
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))  # from the host list: no device sync
    return {"packed_seq_params": PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                 max_seqlen_q=longest, max_seqlen_kv=longest)}


def sum_over_replicas(local: torch.Tensor) -> torch.Tensor:
    """Collective over all ranks: the sum of the values a forward-only :func:`drive` collected on
    each model replica's last stage (``local``; zeros on the other stages), counted once per
    replica: TP rank 0 adds its copy, its TP peers (which hold the same values) add zeros. A CPU
    tensor, the same on every rank."""
    from megatron.core import parallel_state

    mine = local if parallel_state.get_tensor_model_parallel_rank() == 0 else torch.zeros_like(local)
    mine = mine.to(platform.device())
    torch.distributed.all_reduce(mine)
    return mine.cpu()


def model_chunks(model) -> list:
    """This rank's model chunks: a list of chunks (virtual pipeline stages) as given, a model as
    ``[model]``."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _stage_flag(chunk, name: str) -> bool:
    """A (wrapped: DDP, Float16Module) model chunk's ``pre_process`` (it holds the embedding)
    or ``post_process`` (it holds the output layer; its outputs are scored)."""
    while not hasattr(chunk, name) and hasattr(chunk, "module"):
        chunk = chunk.module
    return getattr(chunk, name)


def _post_process(chunk) -> bool:
    return _stage_flag(chunk, "post_process")


def _padding_mask(chunk, batch, dev) -> torch.Tensor:
    """The padding positions ``[b, s]`` (True: padding) that ``chunk``'s MoE routers take.
    Under sequence parallelism each TP rank routes its ``s / TP`` slice of the sequence: the
    chunk holding the embedding scatters the mask itself (Megatron's GPTModel), a later chunk
    is given its slice here (GPTModel passes a later stage's mask through unchanged)."""
    from megatron.core import parallel_state

    mask = (batch.seq_index < 0).to(dev)
    config = _stage_flag(chunk, "config")
    if config.sequence_parallel and not _stage_flag(chunk, "pre_process"):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        part = mask.shape[1] // tp
        rank = parallel_state.get_tensor_model_parallel_rank()
        mask = mask[:, rank * part:(rank + 1) * part].contiguous()
    return mask


def interleaving_group(num_micro_batches: int, pp: int) -> int:
    """Megatron's ``microbatch_group_size_per_vp_stage`` for one interleaved schedule call: the
    micro-batches that pass a model chunk before the next chunk starts. Megatron-LM's PP when it
    divides the count (the least memory), else the whole count (one group: any count >= PP runs
    without a dependency bubble). Raises :class:`UserError` under PP micro-batches."""
    if num_micro_batches < pp:
        raise UserError(f"{num_micro_batches} micro-batches in a step under {pp} pipeline stages: the interleaved "
                        "schedule of virtual pipeline stages needs at least --pipeline-model-parallel-size "
                        "micro-batches per step and data-parallel rank (raise --global-batch-size, lower "
                        "--micro-batch-size, or drop --num-layers-per-virtual-pipeline-stage)")
    return pp if num_micro_batches % pp == 0 else num_micro_batches


def drive(model, micro_batches: list, score, *, forward_only: bool, seq_length: int, rows: int,
          model_kwargs: dict | None = None, thd: bool = False, padding_mask: bool = False) -> list:
    """One schedule call over ``micro_batches`` (objects with ``tokens``/``positions`` ``[b, s]``,
    optionally packed: see :func:`attention_kwargs`). ``model``: this rank's model, or its list of
    model chunks (one per virtual pipeline stage: Megatron's interleaved schedule). ``rows``:
    :func:`pipeline_rows` of a micro-batch. On the last stage ``score(outputs, batch)`` gets the
    model's outputs (a LockstepStage's ``{role: logits}``; a plain model's logits) and returns, in
    training, ``(loss, num_examples)`` (0-dim tensors; Megatron divides gradients by the global sum
    of ``num_examples``); forward-only, any value, collected. Returns the collected values in
    micro-batch order on the last stage, else ``[]``. Collective over the TP and PP groups.
    ``padding_mask``: give MoE models each micro-batch's padding positions (``seq_index < 0``),
    which their routers leave out of the load-balancing loss and the token counts."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = model_chunks(model)
    collected = []
    dev = platform.device()

    def forward_step(data_iter, m):
        batch = next(data_iter)
        kwargs = dict(model_kwargs or {})
        kwargs.update(attention_kwargs(batch, thd))
        if padding_mask:
            kwargs["padding_mask"] = _padding_mask(m, batch, dev)
        mask = kwargs.pop("attention_mask", None)
        out = m(batch.tokens.to(dev), batch.positions.to(dev), mask, **kwargs)
        if not _post_process(m):
            return out, None
        named = isinstance(out, dict)  # a LockstepStage's {role: logits}, the first model's first
        outputs = dict(out) if named else {None: out}
        first_role, first_out = next(iter(outputs.items()))

        def loss_func(first):
            outputs[first_role] = first  # the first model's logits as the schedule passes them (backward, scaling)
            result = score(outputs if named else first, batch)
            outputs.clear()  # frozen models' logits are released once this micro-batch is scored
            if forward_only:
                collected.append(result)
                return torch.zeros((), device=first.device), {}
            loss, num_examples = result
            return loss, num_examples, {}

        return first_out, loss_func

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if len(chunks) > 1 and forward_only and len(micro_batches) < pp:
        # fewer micro-batches than the interleaved schedule needs (a sampling step has one)
        _ring_forward(chunks, micro_batches, forward_step, seq_length, rows)
        return collected
    data = iter(micro_batches) if len(chunks) == 1 else [iter(micro_batches) for _ in chunks]
    if len(chunks) > 1:
        config = chunks[0].config
        config.microbatch_group_size_per_vp_stage = interleaving_group(
            len(micro_batches), pp)
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=chunks,
        num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=rows,
        forward_only=forward_only,
    )
    return collected


def _ring_forward(chunks: list, micro_batches: list, forward_step, seq_length: int, rows: int) -> None:
    """Forward-only over virtual pipeline stages, one micro-batch at a time around the ring of
    chunks: chunk v of stage p feeds chunk v of stage p + 1, and the last stage's chunk v feeds
    the first stage's chunk v + 1 (Megatron's order of layers). Unlike the interleaved schedule it
    takes any number of micro-batches (a sampling step has one); the stages do not overlap.
    Activations ``[s, rows, h]`` in the pipeline dtype travel by point-to-point send / recv in the
    pipeline group; the last stage's last chunk calls the scoring function."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model

    config = chunks[0].config
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    to_next = parallel_state.get_pipeline_model_parallel_next_rank()
    from_prev = parallel_state.get_pipeline_model_parallel_prev_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    s = seq_length // tp if config.sequence_parallel else seq_length
    shape, dtype = (s, rows, config.hidden_size), config.pipeline_dtype or config.params_dtype
    dev = platform.device()
    for batch in micro_batches:
        for v, chunk in enumerate(chunks):
            x = None
            if not (first and v == 0):
                x = torch.empty(shape, dtype=dtype, device=dev)
                torch.distributed.recv(x, src=from_prev)
            get_attr_wrapped_model(chunk, "set_input_tensor")(x)
            out, score = forward_step(iter([batch]), chunk)
            if last and v == len(chunks) - 1:
                score(out)
            else:
                torch.distributed.send(out.contiguous(), dst=to_next)
