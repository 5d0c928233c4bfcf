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

from dataclasses import replace

from ..config import RolloutConfig, SamplingParams
from .base import MISMATCH_MAXES, MISMATCH_SUMS, Rollout, RolloutEngine, logprob_mismatch, mismatch_metrics


def make_engine(config: RolloutConfig, policy, arch, vocab_size: int, max_model_len: int,
                checkpoint: str | None = None, optimizer=None) -> RolloutEngine:
    """The engine ``config.engine`` names, sampling from ``policy`` (this rank's pipeline stage of
    a model of ``arch``) over ids ``[0, vocab_size)`` (the tokenizer's:
    ``weights.tokenizer_vocab_size``); ``max_model_len``: the longest prompt + response;
    ``checkpoint``: where the policy came from (vLLM reads the original HF config there);
    ``optimizer``: the trainer's (vLLM's memory share leaves room for its state still to come).
    Collective for ``vllm``."""
    if config.engine == "megatron":
        from .megatron import MegatronEngine

        return MegatronEngine(policy, vocab_size, config.sampling)
    if config.engine == "vllm":
        from .vllm import VLLMEngine, engine_hf_config, pending_optimizer_bytes

        # vLLM holds only the tokenizer's rows of the embedding and output layer, so it samples
        # and reports log-probs over the same ids as the trainer
        arch = replace(arch, vocab_size=vocab_size)
        return VLLMEngine(policy, arch, config.sampling, max_model_len, hf_config=engine_hf_config(arch, checkpoint),
                          gpu_memory_utilization=config.gpu_memory_utilization,
                          pending_bytes=pending_optimizer_bytes(optimizer))
    raise ValueError(f"unknown rollout engine {config.engine!r}")


__all__ = ["MISMATCH_MAXES", "MISMATCH_SUMS", "Rollout", "RolloutEngine", "RolloutConfig", "SamplingParams", "make_engine", "logprob_mismatch",
           "mismatch_metrics"]
