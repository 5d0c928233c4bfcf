"""Supervised fine-tuning on response tokens: the AlignDistil trainer without teachers.

Used as the baseline of ``tools/bench_step.py`` (same data, same loop, one model) and available
as ``python -m megatron_aligndistil.train sft``. Per sequence: mean negative log-likelihood of its
response tokens.
"""

from __future__ import annotations

from ..loss import vocab_parallel_logprobs
from .method import TokenMeanMethod


class SFT(TokenMeanMethod):
    name = "sft"
    data_kind = "distill"
    stat_names = ("tokens",)

    @classmethod
    def from_args(cls, args) -> "SFT":
        return cls()

    def frozen_models(self):
        return []

    def token_terms(self, logits, batch, vocab_size):
        policy = logits["policy"]
        return {"objective": -vocab_parallel_logprobs(policy, batch.labels.to(policy.device), vocab_size=vocab_size)}

    def metrics(self, sums):
        return {"tokens": int(sums["tokens"])}
