"""Rollout engines: what samples on-policy responses (and evaluation / ``tools/generate.py``
samples) from the current policy.

An engine has two methods:

* ``generate(prompts, sequence_ids, max_new_tokens) -> list[Rollout]``: one response per prompt
  (token ids, whether a stop id ended it, optionally the sampler's per-token log-probs).
  Collective over the model-parallel group of the calling data-parallel replica; every rank of
  the replica gets the same list. ``sequence_ids`` (global sample indices) seed the randomness,
  so samples do not depend on the layout or on how prompts are batched.
* ``sync_weights(policy)``: make the engine sample from ``policy``'s current weights; called by
  the trainer after every optimizer step (engines that read the policy in place only rebind it).
* ``offload()``: free what the engine holds until the next ``sync_weights`` (the trainer calls it
  after each rollout; a no-op unless the engine has memory of its own to give back).

Engines that report the sampler's log-probs (``reports_logprobs``) let the trainer measure the
training-inference mismatch (:func:`logprob_mismatch`).

:class:`~megatron_aligndistil.rollout.megatron.MegatronEngine` (``--rollout-engine megatron``) is
the in-framework TP/PP KV-cached sampler; :class:`~megatron_aligndistil.rollout.vllm.VLLMEngine`
(``--rollout-engine vllm``) is vLLM colocated with training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import RolloutConfig, SamplingParams


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


def make_engine(config: RolloutConfig, policy, arch, vocab_size: int, max_model_len: int,
                checkpoint: str | None = None) -> RolloutEngine:
    """The engine ``config.engine`` names, sampling from ``policy`` (this rank's pipeline stage of
    a model of ``arch``) over ids ``[0, vocab_size)`` (the tokenizer's:
    ``checkpointing.tokenizer_vocab_size``); ``max_model_len``: the longest prompt + response;
    ``checkpoint``: where the policy came from (vLLM reads the original HF config there).
    Collective for ``vllm``."""
    if config.engine == "megatron":
        from .megatron import MegatronEngine

        return MegatronEngine(policy, vocab_size, config.sampling)
    if config.engine == "vllm":
        from .vllm import VLLMEngine, engine_hf_config

        # vLLM holds only the tokenizer's rows of the embedding and output layer, so it samples
        # and reports log-probs over the same ids as the trainer
        arch = replace(arch, vocab_size=vocab_size)
        return VLLMEngine(policy, arch, config.sampling, max_model_len, hf_config=engine_hf_config(arch, checkpoint),
                          gpu_memory_utilization=config.gpu_memory_utilization)
    raise ValueError(f"unknown rollout engine {config.engine!r}")


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


__all__ = ["Rollout", "RolloutEngine", "RolloutConfig", "SamplingParams", "make_engine", "logprob_mismatch",
           "mismatch_metrics"]
