"""DPO (Rafailov et al.) and reverse DPO on top of the shared trainer.

One record = one (prompt, chosen, rejected) pair; a micro-batch packs its chosen sequences then
its rejected ones, and the frozen reference model runs in lockstep like AlignDistil's teachers.
Per pair: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` with summed response
log-probabilities from the vocab-parallel log-prob helper. ``--reverse`` swaps chosen and
rejected (the reverse-DPO teacher of AlignDistil). Rewards are ``beta * (pi - ref)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.batching import make_micro_batch, masked
from ..loss import vocab_parallel_logprobs
from .loop import FrozenSpec, Method


class DPO(Method):
    name = "dpo"
    data_kind = "dpo"
    sequences_per_record = 2
    stat_names = ("tokens", "correct", "chosen_reward", "rejected_reward")

    def frozen_models(self):
        return [FrozenSpec("ref", self.args.ref_load or self.args.load)]

    def _pair(self, record):
        chosen, rejected = record["chosen_ids"], record["rejected_ids"]
        return (rejected, chosen) if self.args.reverse else (chosen, rejected)

    def record_length(self, record) -> int:
        return len(record["prompt_ids"]) + max(len(record["chosen_ids"]), len(record["rejected_ids"])) - 1

    def micro_batch(self, records, seq_len: int):
        pairs = [self._pair(r) for r in records]
        seqs = [(r["prompt_ids"], c) for r, (c, _) in zip(records, pairs)]
        seqs += [(r["prompt_ids"], j) for r, (_, j) in zip(records, pairs)]
        return make_micro_batch(seqs, seq_len)

    def loss(self, logits, batch, vocab_size):
        policy, ref = logits
        labels = batch.labels.to(policy.device)
        mask = batch.loss_mask.to(policy.device)
        seq_logp = masked(vocab_parallel_logprobs(policy, labels, vocab_size=vocab_size), mask).sum(-1)
        with torch.no_grad():
            ref_logp = masked(vocab_parallel_logprobs(ref, labels, vocab_size=vocab_size), mask).sum(-1)
        n = batch.num_sequences // 2
        beta = self.args.dpo_beta
        rewards = beta * (seq_logp - ref_logp)  # [2n]: chosen then rejected
        margin = rewards[:n] - rewards[n:]
        losses = -F.logsigmoid(margin)
        r = rewards.detach()
        stats = {"tokens": mask.sum(), "correct": (r[:n] > r[n:]).float().sum(),
                 "chosen_reward": r[:n].sum(), "rejected_reward": r[n:].sum()}
        return losses.sum(), n, stats

    def metrics(self, sums):
        n = max(sums["sequences"], 1.0)
        return {"tokens": int(sums["tokens"]), "reward_accuracy": sums["correct"] / n,
                "chosen_reward": sums["chosen_reward"] / n, "rejected_reward": sums["rejected_reward"] / n}
