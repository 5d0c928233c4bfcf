"""Judging with a Hugging Face sequence-classification reward model: scores and win rates.

For real data there is no exact rule: a reward model (e.g. a Skywork / ArmoRM-style
``AutoModelForSequenceClassification`` with one output) scores each (prompt, response) rendered
with its own chat template, and a policy's *win rate* against a baseline is the share of
(prompt, sample) slots where the policy's response scores higher (ties count one half), with a
95% interval over prompts. Runs on one process (rank 0 in a launch), GPU when present.
"""

from __future__ import annotations

import math

import torch

from .stats import mean_ci, per_cluster_means
from ..core.errors import UserError


class RewardModelJudge:
    def __init__(self, path: str, batch_size: int = 16, device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..hub import local_or_hub

        path = local_or_hub(path, "--reward-model")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model, info = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                                             output_loading_info=True)
        self.model.eval()
        if info.get("missing_keys"):  # e.g. a causal LM: its new score head would judge at random
            missing = sorted(info["missing_keys"])
            raise UserError(f"{path}: not a trained sequence-classification reward model: "
                            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                            f"{'is' if len(missing) == 1 else 'are'} not in the checkpoint and would be newly "
                            f"initialised (its architectures: {self.model.config.architectures})")
        # stored so, or left uninitialised by the loader: every score would be NaN (a buffer may be
        # an attention mask of -inf, so buffers are checked for NaN only)
        bad = [name for name, t in self.model.named_parameters() if not bool(torch.isfinite(t).all())]
        bad += [name for name, t in self.model.named_buffers() if t.is_floating_point() and bool(t.isnan().any())]
        if bad:
            raise UserError(f"{path}: the reward model's {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} "
                            f"hold{'s' if len(bad) == 1 else ''} NaN or inf values after loading")
        if self.model.config.num_labels != 1:
            raise UserError(f"{path}: a reward model needs one output (num_labels 1), "
                             f"this one has {self.model.config.num_labels}")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.batch_size = batch_size

    def _render(self, prompt: str, response: str) -> str:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{prompt}\n{response}"

    @torch.no_grad()
    def scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One scalar reward per (prompt, response)."""
        out = []
        self.tokenizer.padding_side = "right"
        for b in range(0, len(prompts), self.batch_size):
            texts = [self._render(p, r) for p, r in zip(prompts[b: b + self.batch_size],
                                                        responses[b: b + self.batch_size])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            out += self.model(**enc).logits[:, 0].float().cpu().tolist()
        return out


def win_rate(policy_scores: list[float], baseline_scores: list[float], prompt_index: list[int]) -> dict:
    """Share of slots where the policy's score beats the baseline's (ties 0.5), with a 95% interval
    over prompts: ``{"mean", "lo", "hi", "n"}``."""
    if len(policy_scores) != len(baseline_scores) or len(policy_scores) != len(prompt_index):
        raise ValueError("win_rate: policy, baseline and prompt index lists differ in length")
    broken = [(who, i, x) for who, scores in (("policy", policy_scores), ("baseline", baseline_scores))
              for i, x in enumerate(scores) if not math.isfinite(x)]
    if broken:  # NaN compares false both ways: it would count as a loss, not as an error
        who, i, x = broken[0]
        raise UserError(f"the reward model scored {len(broken)} responses {x} (first: the {who}'s response "
                        f"{i}): a reward model that gives non-finite scores cannot rank them")
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy_scores, baseline_scores)]
    return mean_ci(per_cluster_means(wins, prompt_index))
