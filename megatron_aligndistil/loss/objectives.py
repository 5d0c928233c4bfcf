"""Per-token terms in, per-sequence values out: the one reduction every method goes through.

Methods compute per-token quantities ``[b, s]`` (AlignDistil's ``weight * KL``, SFT's negative
log-likelihood, DPO's log-probabilities). :func:`sequence_sums` adds them up per *sequence*
through the micro-batch's ``seq_index``, so a row may hold several sequences (packing) and a
sequence may be split over the ranks of a context-parallel group; then a per-sequence reduction
(:func:`token_mean`, :func:`dpo_pair_losses`) gives one loss per example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.batching import MicroBatch, masked


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group`` in forward. Backward is the identity: every rank of the group computes
    the same loss from the summed value, and each rank's partial sum came from its own tokens,
    so the gradient of a rank's partial is the gradient of the sum."""

    @staticmethod
    def forward(ctx, value, group):
        value = value.clone()
        torch.distributed.all_reduce(value, group=group)
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sequence_sums(values: torch.Tensor, batch: MicroBatch, group=None) -> torch.Tensor:
    """Sums of ``values`` (``[b, s]`` or ``[b, s, k]``) over each sequence's loss positions:
    ``[n]`` or ``[n, k]`` with n = ``batch.num_sequences``. Positions outside the loss mask add
    exactly 0 whatever their value (NaN included). ``group``: a context-parallel group holding
    the other parts of the sequences; the sums are all-reduced over it (differentiable)."""
    mask = batch.loss_mask.to(values.device)
    index = batch.seq_index.to(values.device).clamp(min=0).reshape(-1)  # padding adds 0 to sequence 0
    flat = masked(values, mask if values.dim() == 2 else mask.unsqueeze(-1)).reshape(index.numel(), -1)
    sums = flat.new_zeros(batch.num_sequences, flat.shape[1]).index_add(0, index, flat)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        sums = _AllReduceSum.apply(sums, group)
    return sums if values.dim() == 3 else sums.squeeze(-1)


def token_mean(term_sums: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over its response tokens (AlignDistil, SFT): ``[n]``."""
    return term_sums / token_counts


def dpo_pair_losses(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: float):
    """DPO per pair from summed response log-probs ``[2n]`` ordered (chosen, rejected) per pair:
    ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``. Returns (losses ``[n]``, detached
    rewards ``[n, 2]`` = beta * (pi - ref), chosen in column 0)."""
    rewards = (beta * (policy_logp - ref_logp)).view(-1, 2)
    return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards.detach()
