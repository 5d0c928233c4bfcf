"""DPO (Rafailov et al.) and reverse DPO on top of the shared trainer.

One record = one (prompt, chosen, rejected) pair: two sequences, always in the same micro-batch
(packed or not); the frozen reference model runs in lockstep like AlignDistil's teachers.
Per pair: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` with summed response
log-probabilities from the vocab-parallel log-prob helper. ``--reverse`` swaps chosen and
rejected (the reverse-DPO teacher of AlignDistil). Rewards are ``beta * (pi - ref)``.
"""

from __future__ import annotations

import torch

from ..config import DPOConfig
from ..loss import vocab_parallel_logprobs
from ..loss.objectives import dpo_pair_losses
from .method import FrozenSpec, Method


class DPO(Method):
    name = "dpo"
    data_kind = "dpo"
    sequences_per_record = 2
    stat_names = ("tokens", "correct", "chosen_reward", "rejected_reward")

    def __init__(self, config: DPOConfig, ref_load: str):
        self.config = config
        self.ref_load = ref_load

    @classmethod
    def from_args(cls, args) -> "DPO":
        config = DPOConfig.from_args(args)
        return cls(config, config.ref_load or args.load)

    def frozen_models(self):
        return [FrozenSpec("ref", self.ref_load)]

    def identity(self):
        return super().identity() | self.config.identity()

    def sequences(self, record):
        chosen, rejected = record["chosen_ids"], record["rejected_ids"]
        if self.config.reverse:
            chosen, rejected = rejected, chosen
        return [(record["prompt_ids"], chosen), (record["prompt_ids"], rejected)]

    def token_terms(self, logits, batch, vocab_size):
        labels = batch.labels.to(logits["policy"].device)
        policy = vocab_parallel_logprobs(logits["policy"], labels, vocab_size=vocab_size)
        with torch.no_grad():
            ref = vocab_parallel_logprobs(logits["ref"], labels, vocab_size=vocab_size)
        return {"policy_logp": policy, "ref_logp": ref}

    def reduce(self, sums):
        losses, rewards = dpo_pair_losses(sums["policy_logp"], sums["ref_logp"], self.config.beta)
        stats = {"tokens": sums["tokens"].sum(), "correct": (rewards[:, 0] > rewards[:, 1]).float().sum(),
                 "chosen_reward": rewards[:, 0].sum(), "rejected_reward": rewards[:, 1].sum()}
        return losses, stats

    def metrics(self, sums):
        n = max(sums["sequences"], 1.0)
        return {"tokens": int(sums["tokens"]), "reward_accuracy": sums["correct"] / n,
                "chosen_reward": sums["chosen_reward"] / n, "rejected_reward": sums["rejected_reward"] / n}
