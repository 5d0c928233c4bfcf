"""AlignDistil on top of the shared trainer: two frozen teachers, the vocab-parallel loss.

Per sequence: mean over its response tokens of ``weight_t * KL_t`` (SPEC section 1); the trainer
averages over the sequences of the global batch. Metrics: ``kl``, ``alpha_mean``, ``tvd_mean``
are means over all response tokens of the global batch; ``tokens`` is that token count.
"""

from __future__ import annotations

from ..data.batching import make_micro_batch, masked
from ..loss import vocab_parallel_aligndistil
from .loop import FrozenSpec, Method


class AlignDistil(Method):
    name = "aligndistil"
    data_kind = "distill"
    stat_names = ("tokens", "kl", "alpha", "tvd")

    def __init__(self, args):
        super().__init__(args)
        self.on_policy = getattr(args, "rollout", "off-policy") == "on-policy"
        if self.on_policy:
            self.data_kind = "prompt"  # responses come from the policy at every iteration

    def frozen_models(self):
        a = self.args
        second = FrozenSpec("rev", a.rev_load) if a.rev_load else FrozenSpec("ref", a.ref_load)
        return [FrozenSpec("dpo", a.dpo_load), second]

    def record_length(self, record) -> int:
        return len(record["prompt_ids"]) + len(record["response_ids"]) - 1

    def micro_batch(self, records, seq_len: int):
        return make_micro_batch([(r["prompt_ids"], r["response_ids"]) for r in records], seq_len)

    def loss(self, logits, batch, vocab_size):
        a = self.args
        policy, dpo, rev = logits
        mask = batch.loss_mask.to(policy.device)
        out = vocab_parallel_aligndistil(
            policy, dpo, rev, r=a.r, eps=a.eps, beta0=a.beta0, token_weight=a.token_weight,
            direction=a.kl_direction, constant_alpha=a.constant_alpha,
            tvd_half=not a.tvd_without_half, plausibility_threshold=a.plausibility_threshold,
            vocab_size=vocab_size,
        )
        tokens_per_seq = mask.sum(-1)
        per_seq = masked(out.loss, mask).sum(-1) / tokens_per_seq
        stats = {"tokens": tokens_per_seq.sum(), "kl": masked(out.kl, mask).sum(),
                 "alpha": masked(out.alpha, mask).sum(), "tvd": masked(out.tvd, mask).sum()}
        return per_seq.sum(), batch.num_sequences, stats

    def metrics(self, sums):
        n = max(sums["tokens"], 1.0)
        return {"tokens": int(sums["tokens"]), "kl": sums["kl"] / n, "alpha_mean": sums["alpha"] / n,
                "tvd_mean": sums["tvd"] / n}
