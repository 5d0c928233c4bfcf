"""Rollout engines: what samples on-policy responses (and evaluation / ``tools/generate.py``
samples) from the current policy.

An engine has two methods:

* ``generate(prompts, sequence_ids, max_new_tokens) -> list[Rollout]``: one response per prompt
  (token ids, whether a stop id ended it, optionally the sampler's per-token log-probs).
  Collective over the model-parallel group of the calling data-parallel replica; every rank of
  the replica gets the same list. ``sequence_ids`` (global sample indices) seed the randomness,
  so samples do not depend on the layout or on how prompts are batched.
* ``sync_weights(policy)``: make the engine sample from ``policy``'s current weights; called by
  the trainer after every optimizer step (a no-op for engines that read the policy in place).

:class:`~megatron_aligndistil.rollout.megatron.MegatronEngine` (``--rollout-engine megatron``) is
the in-framework TP/PP KV-cached sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RolloutConfig, SamplingParams


@dataclass
class Rollout:
    response_ids: list  # sampled ids, the stop id included when one ended the response
    stopped: bool  # a stop id ended it (else the length limit did)
    logprobs: list | None = None  # the sampler's log-prob of each response id, if the engine reports them


class RolloutEngine:
    """The interface (see the module doc)."""

    def generate(self, prompts: list[list[int]], sequence_ids: list[int] | None = None,
                 max_new_tokens: list[int] | None = None) -> list[Rollout]:
        raise NotImplementedError

    def sync_weights(self, policy) -> None:
        raise NotImplementedError


def make_engine(config: RolloutConfig, policy, vocab_size: int) -> RolloutEngine:
    """The engine ``config.engine`` names, sampling from ``policy`` (this rank's pipeline stage)."""
    if config.engine == "megatron":
        from .megatron import MegatronEngine

        return MegatronEngine(policy, vocab_size, config.sampling)
    raise ValueError(f"unknown rollout engine {config.engine!r}")


__all__ = ["Rollout", "RolloutEngine", "RolloutConfig", "SamplingParams", "make_engine"]
