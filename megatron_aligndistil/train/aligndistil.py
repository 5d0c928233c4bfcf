"""AlignDistil on top of the shared trainer: two frozen teachers, the vocab-parallel loss.

Per sequence: mean over its response tokens of ``weight_t * KL_t`` (SPEC section 1); the trainer
averages over the sequences of the global batch. Metrics: ``kl``, ``alpha_mean``, ``tvd_mean``
are means over all response tokens of the global batch; ``tokens`` is that token count.
"""

from __future__ import annotations

from ..config import AlignDistilConfig, AlignDistilLossConfig
from ..loss.aligndistil import aligndistil_loss
from .method import FrozenSpec, TokenMeanMethod


# mean TVD per token at or below which two teachers count as the same model (float noise of equal logits)
IDENTICAL_TVD = 1e-7


class AlignDistil(TokenMeanMethod):
    name = "aligndistil"
    data_kind = "distill"
    stat_names = ("tokens", "kl", "alpha", "tvd")

    def __init__(self, loss: AlignDistilLossConfig, dpo_load: str, rev_load: str | None = None,
                 ref_load: str | None = None, on_policy: bool = False):
        """Teachers: the DPO model and the reverse-DPO model (``rev_load``), or the reference
        model (``ref_load``: the vanilla DPO-reward teacher). ``on_policy``: the records are
        prompts, responses come from the policy at every iteration."""
        if bool(rev_load) == bool(ref_load):
            raise ValueError("give exactly one of rev_load (AlignDistil) or ref_load (vanilla DPO teacher)")
        self.loss_config = loss
        second = FrozenSpec("rev", rev_load) if rev_load else FrozenSpec("ref", ref_load)
        self.teachers = [FrozenSpec("dpo", dpo_load), second]
        self.on_policy = on_policy
        if on_policy:
            self.data_kind = "prompt"

    @classmethod
    def from_args(cls, args) -> "AlignDistil":
        run = AlignDistilConfig.from_args(args)
        return cls(AlignDistilLossConfig.from_args(args), run.dpo_load, run.rev_load, run.ref_load,
                   on_policy=run.rollout == "on-policy")

    def frozen_models(self):
        return list(self.teachers)

    def token_terms(self, logits, batch, vocab_size):
        second = logits["rev"] if "rev" in logits else logits["ref"]
        out = aligndistil_loss(logits["policy"], logits["dpo"], second, self.loss_config, vocab_size=vocab_size)
        return {"objective": out.loss, "kl": out.kl, "alpha": out.alpha, "tvd": out.tvd}

    def identity(self):
        return super().identity() | self.loss_config.identity() | {
            "rollout": "on-policy" if self.on_policy else "off-policy"}

    def check_first_step(self, sums):
        """Teachers that agree at every response token (TVD 0) carry no preference signal: alpha is
        eps, the token weight beta0/eps (100 by default) and the teacher the DPO model itself."""
        from ..core.errors import UserError

        if self.teachers[1].role == "rev" and sums["tokens"] > 0 and sums["tvd"] <= IDENTICAL_TVD * sums["tokens"]:
            weight = (f"; the token weight beta0/alpha is {self.loss_config.beta0 / self.loss_config.eps:g}"
                      if self.loss_config.constant_alpha is None else "")
            raise UserError(
                f"iteration 1: the DPO teacher (--dpo-load {self.teachers[0].path}) and the reverse-DPO teacher "
                f"(--rev-load {self.teachers[1].path}) give the same distribution at all {int(sums['tokens'])} "
                f"response tokens (mean TVD {sums['tvd'] / sums['tokens']:.3g}): the teacher is the DPO model "
                f"itself{weight}. Check that --rev-load is the reverse-DPO model (DPO trained with --reverse); "
                "stopped before the optimizer step")

    def metrics(self, sums):
        n = max(sums["tokens"], 1.0)
        return {"tokens": int(sums["tokens"]), "kl": sums["kl"] / n, "alpha_mean": sums["alpha"] / n,
                "tvd_mean": sums["tvd"] / n}
