"""Vocab-parallel per-token log-probabilities of given targets (for DPO's sequence log-probs).

One collective on the TP group in forward (an all-gather of 2 floats per token: the local
log-sum-exp and the target logit if this rank holds it), none in backward. Padding entries
(at or beyond ``vocab_size``) take no probability. Megatron's ``vocab_parallel_cross_entropy``
needs three all-reduces and does not know about vocab padding; this is a drop-in for it.
"""

from __future__ import annotations

import torch

from .vocab_parallel import Shard, all_gather_rows, chunks, combine_lse, flushed_exp, local_logsumexp, shard_info


class _VocabParallelLogProbs(torch.autograd.Function):
    """logits ``[N, V_local]``, target ``[N]`` (global ids) -> log p(target) ``[N]`` float32."""

    @staticmethod
    def forward(ctx, logits, target, shard: Shard, chunk_size):
        n, v = logits.shape[0], shard.valid
        local = target - shard.start
        here = (local >= 0) & (local < v)
        local_idx = torch.where(here, local, torch.zeros_like(local))
        rows = torch.zeros(n, 2, dtype=torch.float32, device=logits.device)
        rows[:, 0] = float("-inf")
        spans = list(chunks(n, shard.size, chunk_size)) if v else []  # v = 0: all padding here
        for b, e in spans:
            z = logits[b:e, :v].float()
            rows[b:e, 0] = local_logsumexp(z)
            picked = z.gather(-1, local_idx[b:e, None]).squeeze(-1)
            rows[b:e, 1] = torch.where(here[b:e], picked, torch.zeros_like(picked))
        gathered = all_gather_rows(rows, shard)
        lse = combine_lse(gathered[..., 0])
        logp = gathered[..., 1].sum(0) - lse
        if ctx.needs_input_grad[0]:
            # d log p(y) / dz = onehot(y) - softmax(z), formed in float32 and then stored in the
            # logits' dtype: adding the 1 after a bf16 cast would form 1 - p by cancellation
            # (0 or a multiple of 2^-8 for p >= 0.996, exactly the confident tokens)
            # a row whose log p is not finite (NaN / inf logits) gets a zero gradient, so a caller
            # that masks it out gets exactly nothing from it
            finite = (logp.abs() < float("inf"))[:, None]
            grad = torch.zeros_like(logits)
            for b, e in spans:
                g = -flushed_exp(logits[b:e, :v].float() - lse[b:e, None])
                g.scatter_add_(1, local_idx[b:e, None], here[b:e, None].float())
                grad[b:e, :v] = torch.where(finite[b:e], g, 0.0).to(grad.dtype)
            ctx.save_for_backward(grad)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("this loss was already backpropagated once (its gradient buffer is reused)")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_out.to(grad.dtype)[:, None]), None, None, None  # in place, as above


def vocab_parallel_logprobs(logits: torch.Tensor, target: torch.Tensor, vocab_size: int | None = None,
                            group=None, chunk_size: int | None = None) -> torch.Tensor:
    """log softmax(logits)[target] for vocab-sharded ``logits [..., V_local]``, ``target [...]``.

    Returns float32 ``[...]``, differentiable w.r.t. ``logits``. Targets must be real vocab ids.
    """
    lead, v_local = logits.shape[:-1], logits.shape[-1]
    if target.shape != lead:
        raise ValueError(f"target shape {tuple(target.shape)} must equal logits' leading shape {tuple(lead)}")
    shard = shard_info(v_local, vocab_size, group)
    out = _VocabParallelLogProbs.apply(logits.reshape(-1, v_local), target.reshape(-1).long(), shard, chunk_size)
    return out.reshape(lead)
