"""Supervised fine-tuning on response tokens: the AlignDistil trainer without teachers.

Used as the baseline of ``tools/bench_step.py`` (same data, same loop, one model) and available
as ``python -m megatron_aligndistil.train sft``. Per sequence: mean negative log-likelihood of its
response tokens.
"""

from __future__ import annotations

from ..data.batching import masked
from ..loss import vocab_parallel_logprobs
from .aligndistil import AlignDistil


class SFT(AlignDistil):
    name = "sft"
    stat_names = ("tokens",)

    def frozen_models(self):
        return []

    def loss(self, logits, batch, vocab_size):
        (policy,) = logits
        mask = batch.loss_mask.to(policy.device)
        logp = vocab_parallel_logprobs(policy, batch.labels.to(policy.device), vocab_size=vocab_size)
        tokens_per_seq = mask.sum(-1)
        per_seq = -masked(logp, mask).sum(-1) / tokens_per_seq
        return per_seq.sum(), batch.num_sequences, {"tokens": tokens_per_seq.sum()}

    def metrics(self, sums):
        return {"tokens": int(sums["tokens"])}
