"""What every rollout engine shares: the :class:`Rollout` it returns, the :class:`RolloutEngine`
interface (documented in :mod:`megatron_aligndistil.rollout`), and the training-inference mismatch
of the log-probs an engine reports."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    response_ids: list  # sampled ids, the stop id included when one ended the response
    stopped: bool  # a stop id ended it (else the length limit did)
    logprobs: list | None = None  # the sampler's log-prob of each response id, if the engine reports them


class RolloutEngine:
    """The interface (see the module doc)."""

    reports_logprobs = False  # Rollout.logprobs is filled

    def generate(self, prompts: list[list[int]], sequence_ids: list[int] | None = None,
                 max_new_tokens: list[int] | None = None) -> list[Rollout]:
        raise NotImplementedError

    def sync_weights(self, policy) -> None:
        raise NotImplementedError

    def offload(self) -> None:
        pass


MISMATCH_SUMS = ("abs_diff", "tokens", "seq_ratio", "sequences")  # summed over micro-batches and ranks
MISMATCH_MAXES = ("abs_diff_max", "seq_log_ratio_max")  # max-reduced


@torch.no_grad()
def logprob_mismatch(policy_logits: torch.Tensor, batch, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-inference mismatch of one micro-batch whose sequences carry the sampler's log-probs
    (``batch.sampler_logprobs [b, s]``, aligned with ``loss_mask``): per response token
    d = log p_megatron - log p_sampler, from the policy's (vocab-parallel) logits ``[b, s, V/TP]``.

    Returns float64 ``sums`` (:data:`MISMATCH_SUMS`: sum |d|, tokens, sum over sequences of the
    sequence ratio exp(sum_t d) = p_megatron(y) / p_sampler(y), sequences) and ``maxes``
    (:data:`MISMATCH_MAXES`: max |d|, max over sequences of |sum_t d|)."""
    from ..data.batching import masked
    from ..loss import vocab_parallel_logprobs
    from ..loss.objectives import sequence_sums

    dev = policy_logits.device
    mask = batch.loss_mask.to(dev)
    logp = vocab_parallel_logprobs(policy_logits.detach(), batch.labels.to(dev), vocab_size=vocab_size)
    d = masked(logp.double() - batch.sampler_logprobs.to(dev).double(), mask)
    per_sequence = sequence_sums(torch.stack([d, mask.double()], -1), batch)
    present = per_sequence[:, 1] > 0  # sequences with response tokens (masks, not indexing: no host sync)
    seq_log_ratio = torch.where(present, per_sequence[:, 0], torch.zeros_like(per_sequence[:, 0]))
    sums = torch.stack([d.abs().sum(), mask.double().sum(), torch.where(present, seq_log_ratio.exp(), 0.0).sum(),
                        present.double().sum()])
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    maxes = torch.stack([d.abs().max() if d.numel() else zero,
                         seq_log_ratio.abs().max() if seq_log_ratio.numel() else zero])
    return sums, maxes


def mismatch_metrics(sums: dict, maxes: dict) -> dict:
    """metrics.jsonl fields from the global sums and maxes of :func:`logprob_mismatch`."""
    return {"rollout_logp_diff_mean": sums["abs_diff"] / max(sums["tokens"], 1.0),
            "rollout_logp_diff_max": maxes["abs_diff_max"],
            "rollout_seq_ratio_mean": sums["seq_ratio"] / max(sums["sequences"], 1.0),
            "rollout_seq_log_ratio_max": maxes["seq_log_ratio_max"]}
