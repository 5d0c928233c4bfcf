"""Batched autoregressive sampling from a Megatron policy under TP and PP.

Each step runs Megatron's forward-only schedule over the current sequences (right-padded; a
sequence's next-token logits are read at its own last position, which padding after it cannot
change under causal attention), gathers only the *last position's* logits over the TP group,
masks the vocab padding, and samples on the logits' device (only the sampled ids go to the host).
The forward passes go through the trainer's schedule driver (``core/schedule.drive``); the
rollout engine of ``rollout/megatron.py`` wraps this module. Randomness is per sequence and step
(``seed``, the record's global index, the step), so a run samples the same tokens at any
TP/PP/DP layout and batch composition. The last pipeline stage samples and broadcasts the tokens
to the other stages.

With ``kv_cache=True`` (default) every stage keeps its layers' keys and values in Megatron's
``StaticInferenceContext``: one prefill over the shortest prompt, then one token per step for all
sequences, feeding prompt tokens to sequences whose prompt is still longer (Megatron's classic
text-generation scheme). ``kv_cache=False`` recomputes the prefix each step (the reference the
tests compare against). Both sample identical tokens: sequence i's k-th token always uses the
generator seeded by (seed, id_i, k).

Under expert parallelism (MoE), the ranks of an expert-parallel group exchange their tokens in
every MoE layer, so they decode in lockstep: the same number of forwards with the same shapes
(prefill to the group's shortest prompt, decode up to the group's longest sequence, stop when
every sequence of the group is done: one all-reduce of one number per step). A rank whose own
sequences are done keeps feeding its finished rows; what they sample is not kept.
"""

from __future__ import annotations

import torch

from . import platform
from .config import SamplingParams


def _signed(c: int) -> int:
    """A 64-bit constant as torch's (signed) int64."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def draw_keys(seed: int, sequence_ids, made: torch.Tensor) -> torch.Tensor:
    """The counter of each sequence's next draw, int64 ``[n]`` on ``made``'s device: a function of
    the seed, the sequence id and how many tokens it has made, so a sequence's tokens do not
    depend on its batch, its rank or the layout."""
    ids = torch.as_tensor(list(sequence_ids), dtype=torch.long, device=made.device)
    return (seed * 1_000_003) + ids * 7_919 + made.long()


def uniforms(keys: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1), one per int64 key: output number ``key`` of the SplitMix64
    stream seeded with 0 (its state after key + 1 steps is (key + 1) x the golden gamma, then
    mixed), a counter-based generator: the same numbers on every device and for any batch (int64
    multiplication wraps like uint64). One kernel per step for the whole batch, no generator
    objects."""
    z = (keys + 1) * _signed(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() * 2.0 ** -53


def _select(logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor) -> torch.Tensor:
    """Next token per row of float32 ``logits [b, V]`` (padding already -inf), on their device;
    ``keys``: the rows' :func:`draw_keys`. A sampled row takes the first token whose cumulative
    probability (float64) passes its uniform times the row's total (inverse CDF: P(token) = its
    probability), batched: no per-row generator, no host sync."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    z = logits / params.temperature
    if params.top_k and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches p (a token whose predecessors already reach p
        # is dropped, also when they hit p exactly: HF and vLLM do the same)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return inverse_cdf(probs, uniforms(keys.to(probs.device)))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row i's token: the first whose float64 cumulative probability exceeds ``u[i]`` times the
    row's total (``probs [b, V]`` unnormalised, >= 0; ``u [b]`` in [0, 1)). A zero-probability
    token is never chosen: at a rounding of ``u * total`` up to the total, the last token that
    has probability is."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, u[:, None] * total, right=True)
    last = (cdf < total).sum(-1, keepdim=True)  # the index of the last token with probability
    return torch.minimum(idx, last)[:, 0]


def _run_forward(model, tokens, positions, n, seq_len, vocab_size, rows_at=None, inference_context=None,
                 combine=None):
    """Forward-only schedule over ``tokens [n, seq_len]``. Returns, on the last stage, the float32
    full-vocab logits ``[n, V]`` (padding -inf) of row i at position ``rows_at[i]`` (default: the
    last position); None on other stages. Only those rows are gathered over TP (with a cache,
    Megatron gathers the decode step's logits itself). ``combine``: for a model whose last stage
    returns several models' logits (``LockstepStage``), maps their ``{role: [n, vocab_size]}`` rows (the
    vocab padding cut off) to the logits to sample from."""
    from types import SimpleNamespace

    from megatron.core import parallel_state

    from .core.schedule import drive, model_chunks, pipeline_rows

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    kwargs = {}
    if inference_context is not None:
        kwargs = {"inference_context": inference_context, "runtime_gather_output": True}

    def rows_of(logits):
        if rows_at is None:
            rows = logits[:, -1]
        else:
            rows = logits[torch.arange(n, device=logits.device), rows_at.to(logits.device)]
        rows = rows.float().contiguous()
        if tp > 1 and inference_context is None:
            parts = [torch.empty_like(rows) for _ in range(tp)]
            torch.distributed.all_gather(parts, rows, group=tp_group)
            rows = torch.cat(parts, -1)
        return rows

    def collect(outputs, _batch):
        named = outputs if isinstance(outputs, dict) else {"policy": outputs}
        rows = rows_of(next(iter(named.values())))
        if combine is not None:
            rows[:, :vocab_size] = combine({role: rows_of(o)[:, :vocab_size] for role, o in named.items()})
        rows[:, vocab_size:] = float("-inf")  # Megatron's vocab padding is never sampled
        return rows

    step = SimpleNamespace(tokens=tokens, positions=positions)
    got = drive(model, [step], collect, forward_only=True, seq_length=seq_len,
                rows=pipeline_rows(n, getattr(model_chunks(model)[0], "num_models", 1)), model_kwargs=kwargs)
    return got[0] if got else None


def _broadcast_from_last_stage(new: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    new = new.to(platform.device())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(new, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return new.cpu()


def _token_exchange_group():
    """The ranks whose tokens meet in every MoE layer (expert-parallel x expert-TP): they run each
    forward together. None without expert parallelism."""
    from megatron.core import parallel_state

    if parallel_state.get_expert_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_expert_tensor_and_model_parallel_group()


class _Batch:
    """The sampling state of n sequences: ``tokens [n, total]`` (prompts, then sampled ids),
    tokens made so far, which sequences are done and which hit a stop id. ``group``: ranks that
    decode in lockstep (:func:`_token_exchange_group`), None alone."""

    def __init__(self, prompts, params: SamplingParams, sequence_ids, max_new_tokens, group=None):
        n = len(prompts)
        self.params = params
        self.group = group
        self.ids = sequence_ids if sequence_ids is not None else list(range(n))
        self.plen = torch.tensor([len(p) for p in prompts])
        self.limit = torch.tensor(max_new_tokens if max_new_tokens is not None else [params.max_new_tokens] * n)
        self.total = self.agree(int((self.plen + self.limit).max()), max)
        self.tokens = torch.zeros(n, self.total, dtype=torch.long)
        for i, p in enumerate(prompts):
            self.tokens[i, : len(p)] = torch.tensor(p)
        self.made = torch.zeros(n, dtype=torch.long)
        self.done = self.limit <= 0
        self.stopped = torch.zeros(n, dtype=torch.bool)
        self.stop = torch.tensor(list(params.stop_ids) or [-1])

    def agree(self, value: int, op) -> int:
        """``op`` (``min`` or ``max``) of ``value`` over the lockstep group (``value`` alone)."""
        if self.group is None:
            return value
        t = torch.tensor([value if op is max else -value], device=platform.device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(t) if op is max else -int(t)

    def all_done(self) -> bool:
        """Whether every sequence (of the lockstep group) is done."""
        return not self.agree(int(not bool(self.done.all())), max)

    def choose(self, logits, last_stage: bool) -> torch.Tensor:
        """The next token of every sequence, sampled on the last stage (on the logits' device:
        only the n ids leave it) and broadcast to the other stages."""
        new = torch.zeros(len(self.ids), dtype=torch.long)
        if last_stage:
            p = self.params
            new = _select(logits, p, draw_keys(p.seed, self.ids, self.made.to(logits.device))).long()
        return _broadcast_from_last_stage(new)

    def accept(self, new, rows, where):
        """Write sampled tokens of ``rows`` at positions ``where``; update stop bookkeeping."""
        self.tokens[rows, where[rows]] = new[rows]
        self.made[rows] += 1
        hit = rows & torch.isin(new, self.stop)
        self.stopped.logical_or_(hit)
        self.done.logical_or_(hit | (self.made >= self.limit))


def _decode_recomputing(model, state: _Batch, vocab_size: int, last_stage: bool, combine=None) -> torch.Tensor:
    """The reference decoder: the whole prefix every step. Returns each sequence's end."""
    dev = platform.device()
    n = len(state.ids)
    lengths = state.plen.clone()
    while not state.all_done():
        cur = state.agree(int(lengths.max()), max)
        positions = torch.arange(cur, device=dev).unsqueeze(0).expand(n, -1)
        # each row's next-token logits sit at its own last position: gather those rows' logits
        logits = _run_forward(model, state.tokens[:, :cur].to(dev), positions, n, cur, vocab_size, rows_at=lengths - 1,
                              combine=combine)
        new = state.choose(logits, last_stage)
        rows = ~state.done
        state.accept(new, rows, lengths)
        lengths[rows] += 1
    return lengths


def _decode_cached(model, state: _Batch, vocab_size: int, last_stage: bool) -> torch.Tensor:
    """KV-cached decoding: prefill the shortest prompt, then one position per step for all
    sequences (prompt tokens fed to sequences whose prompt is longer). Returns each end."""
    from megatron.core.inference.contexts import StaticInferenceContext

    dev = platform.device()
    n, plen, total = len(state.ids), state.plen, state.total
    ctx = StaticInferenceContext(n, total)
    start = state.agree(int(plen.min()), min)
    logits = _run_forward(model, state.tokens[:, :start].to(dev),
                          torch.arange(start, device=dev).unsqueeze(0).expand(n, -1), n, start,
                          vocab_size, inference_context=ctx)
    ctx.sequence_len_offset += start
    end = plen.clone()
    for t in range(start, total):
        generating = (plen <= t) & ~state.done  # rows whose position t is a sampled token
        new = state.choose(logits, last_stage)
        state.accept(new, generating, torch.full((n,), t))
        end[generating] = t + 1
        if state.all_done() or t + 1 == total:
            break
        logits = _run_forward(model, state.tokens[:, t:t + 1].to(dev), torch.full((n, 1), t, device=dev), n, 1,
                              vocab_size, inference_context=ctx)
        ctx.sequence_len_offset += 1
    return end


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams, vocab_size: int,
             sequence_ids: list[int] | None = None, kv_cache: bool = True,
             max_new_tokens: list[int] | None = None, combine=None) -> list[dict]:
    """Sample a response for each prompt. ``model``: this rank's pipeline stage (a GPTModel, or
    anything whose last stage returns logits ``[b, s, V/TP]``), or its list of model chunks
    (virtual pipeline stages: each forward goes around the ring of chunks, which share one KV
    cache, keyed by their global layer numbers). ``sequence_ids``: global indices
    seeding each sequence's randomness (default 0..n-1). ``max_new_tokens``: a per-sequence limit
    (default ``params.max_new_tokens`` for all). ``combine``: sample from a function of several
    models' logits ``{role: [n, vocab_size]}`` (``model`` a ``LockstepStage``), e.g. AlignDistil's
    teacher z*; it decodes without a KV cache (the models would share one cache). Collective over
    the TP and PP groups.

    Returns ``[{"response_ids": [...], "stopped": bool}]`` on every rank.
    """
    from .core.schedule import model_chunks

    chunks = model_chunks(model)
    config = getattr(chunks[0], "config", None)
    if getattr(config, "sequence_parallel", False):
        # a decode step has one position, which sequence parallelism cannot split across TP ranks:
        # sample with it off (same weights, all-reduce instead of reduce-scatter), as Megatron's own
        # inference does, and turn it back on for training
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        for chunk in chunks:
            set_model_to_sequence_parallel(chunk, False)
        try:
            return generate(model, prompts, params, vocab_size, sequence_ids, kv_cache, max_new_tokens, combine)
        finally:
            for chunk in chunks:
                set_model_to_sequence_parallel(chunk, True)
    from megatron.core import parallel_state

    state = _Batch(prompts, params, sequence_ids, max_new_tokens, group=_token_exchange_group())
    for chunk in chunks:
        chunk.eval()
    last_stage = parallel_state.is_pipeline_last_stage()
    if combine is not None:
        end = _decode_recomputing(model, state, vocab_size, last_stage, combine)
    else:
        end = (_decode_cached if kv_cache else _decode_recomputing)(model, state, vocab_size, last_stage)
    return [{"response_ids": state.tokens[i, len(prompts[i]): int(end[i])].tolist(), "stopped": bool(state.stopped[i])}
            for i in range(len(prompts))]
