"""The in-framework rollout engine: Megatron's own TP/PP forward with a KV cache
(``generation.generate``), sampling on the device that holds the logits."""

from __future__ import annotations

from ..config import SamplingParams
from .base import Rollout, RolloutEngine


class MegatronEngine(RolloutEngine):
    """Samples from ``model`` (this rank's pipeline stage of the policy, or its list of model
    chunks) in place: the trained weights are the sampled weights, so :meth:`sync_weights` only
    rebinds the model (the evaluator samples several policies with one engine)."""

    def __init__(self, model, vocab_size: int, params: SamplingParams, kv_cache: bool = True):
        self.model = model
        self.vocab_size = vocab_size
        self.params = params
        self.kv_cache = kv_cache

    def generate(self, prompts, sequence_ids=None, max_new_tokens=None) -> list[Rollout]:
        from ..core.schedule import model_chunks
        from ..generation import generate

        modes = [(chunk, chunk.training) for chunk in model_chunks(self.model)]
        out = generate(self.model, prompts, self.params, self.vocab_size, sequence_ids=sequence_ids,
                       kv_cache=self.kv_cache, max_new_tokens=max_new_tokens)
        for chunk, was_training in modes:
            chunk.train(was_training)
        return [Rollout(o["response_ids"], o["stopped"]) for o in out]

    def sync_weights(self, policy) -> None:
        self.model = policy
