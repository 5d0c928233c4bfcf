"""Does the rollout engine sample from the policy? Checked, not assumed.

An engine with weights of its own (vLLM) can serve a model that is not the policy: a weight sync
that misses a tensor (a tied output layer, a renamed bias) leaves the engine with stale or
random values, and on-policy training then distils responses from another model without any
error. Two guards:

* :func:`check_engine_agreement`, after the first weight sync of each policy (a start, a resume,
  each policy of the evaluator): the engine scores a few fixed sequences
  (:func:`probe_sequences`), the policy's own forward scores the same, and a mean
  ``|log p_policy - log p_engine|`` per token past the tolerance of the policy's dtype
  (:data:`TOLERANCE`) stops the run before it samples anything, naming the engine and the size of
  the disagreement (:class:`EngineDisagreement`).
* during on-policy training, the mismatch of the sampled responses (``rollout_logp_diff_mean``,
  computed by the trainer from the tokens the engine sampled) past ``--max-rollout-logp-diff``
  stops the step before the optimizer update (or warns, with ``--rollout-mismatch warn``).

Tolerances, in nats per token (mean over tokens): measured on this project's fixtures, see
docs/robustness.md. fp32: vLLM vs Megatron agree to ~1e-6 (max 3e-6); a broken tied-embedding sync
gave 0.16 - 0.95. bf16 agrees to ~1e-2 (the sum order of two different kernels in an 8-bit
mantissa).
"""

from __future__ import annotations

import torch

from ..core.errors import UserError

# mean |log p_policy - log p_engine| per token allowed, by the policy's parameter dtype
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


class EngineDisagreement(UserError):
    """The rollout engine's log-probs differ from the policy's beyond the tolerance."""


def tolerance(dtype: torch.dtype) -> float:
    """The default mean per-token tolerance for a policy of ``dtype`` (:data:`TOLERANCE`)."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])


def probe_sequences(vocab_size: int, max_len: int = 24, lengths=(7, 12, 17, 24), seed: int = 0) -> list[list[int]]:
    """Fixed token sequences over ids ``[0, vocab_size)`` (the same on every rank and every run),
    none longer than ``max_len`` (>= 2) tokens: random ids, plus the ids at both ends of the
    vocabulary, so a wrong row anywhere shows."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(0, vocab_size, (n,), generator=g).tolist()[:max_len] for n in lengths]
    out[0][-2:] = [0, vocab_size - 1]
    return out


def engine_mismatch(engine, policy, vocab_size: int, sequences: list[list[int]]) -> dict:
    """``engine.score(sequences)`` (each pipeline stage's engine replica, when it has several)
    against the policy's own forward (``policy``: this rank's pipeline stage or its model chunks) over the tokens
    after the first of each sequence. Collective over the world; every rank gets the same
    ``{"mean": mean |d|, "max": max |d|, "tokens": n}`` (d in nats per token)."""
    from megatron.core import parallel_state

    from ..data.batching import build_micro_batch
    from ..core.lockstep import LockstepStage
    from ..core.schedule import drive, model_chunks, pipeline_rows
    from .base import logprob_mismatch

    scores = engine.score(sequences)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    replicas = [scores]
    if pp > 1:  # every stage's engine replica scored: all of them are checked on the last stage
        replicas = [None] * pp
        torch.distributed.all_gather_object(replicas, scores, group=parallel_state.get_pipeline_model_parallel_group())
    rows = [[(0, (seq[:1], seq[1:], logprobs))] for replica in replicas for seq, logprobs in zip(sequences, replica)]
    batch = build_micro_batch(rows, max(len(s) for s in sequences) - 1)
    chunks = model_chunks(policy)
    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        got = drive([LockstepStage(chunk) for chunk in chunks], [batch],
                    lambda outputs, b: logprob_mismatch(outputs["policy"], b, vocab_size),
                    forward_only=True, seq_length=batch.tokens.shape[1], rows=pipeline_rows(batch.rows))
    finally:
        for chunk, was_training in zip(chunks, modes):
            chunk.train(was_training)
    dev = next(chunks[0].parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=dev)  # sum |d|, tokens
    worst = torch.zeros(1, dtype=torch.float64, device=dev)
    if got and parallel_state.get_tensor_model_parallel_rank() == 0:  # last stage; TP ranks hold equal values
        (s, m), = got
        sums += s[:2].to(dev)
        worst = m[:1].to(dev)
    torch.distributed.all_reduce(sums)
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    total, tokens = sums.tolist()
    return {"mean": total / max(tokens, 1.0), "max": worst.item(), "tokens": int(tokens)}


def check_engine_agreement(engine, policy, vocab_size: int, name: str, limit: float | None = None,
                           max_len: int = 24) -> dict:
    """Raise :class:`EngineDisagreement` on every rank when ``engine`` (called ``name`` in the
    message) scores :func:`probe_sequences` (at most ``max_len`` tokens: the engine's context) with
    a mean per-token log-prob difference from ``policy`` above ``limit`` (default
    :func:`tolerance` of the policy's dtype). Collective over the world. Returns the measurement."""
    from ..core.schedule import model_chunks

    dtype = next(model_chunks(policy)[0].parameters()).dtype
    limit = tolerance(dtype) if limit is None else limit
    got = engine_mismatch(engine, policy, vocab_size, probe_sequences(vocab_size, max_len))
    if not got["mean"] <= limit:  # NaN fails too
        raise EngineDisagreement(
            f"the {name} rollout engine does not serve the policy's weights: on {got['tokens']} fixed tokens its "
            f"log-probs differ from the policy's by {got['mean']:.3g} nats/token on average (max {got['max']:.3g}); "
            f"the tolerance for {str(dtype).removeprefix('torch.')} is {limit:g}. Stopped before any rollout. "
            "The weight sync missed or mangled a tensor: report it, or use --rollout-engine megatron")
    return got
