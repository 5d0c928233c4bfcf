"""Teacher pre-flight: is AlignDistil's teacher worth distilling, before a run spends compute on it?

The policy cannot beat its teacher (docs/alignment.md): a teacher z* that answers worse than the
DPO model it extrapolates, or that degenerates (never ends its answer, repeats itself), makes
the distilled policy worse. Before training, on prompts disjoint from the test prompts:

1. sample K responses per prompt from the DPO model (the project's sampler, any TP/PP);
2. sample K responses per prompt *from the teacher itself*: softmax(z*), with z* built at every
   decoding step by the loss's own teacher (:func:`..loss.aligndistil.dense_teacher`: the same
   alpha, TVD convention and plausibility guard as the training run), the two teachers running
   in lockstep (:class:`..core.lockstep.LockstepStage`);
3. judge both (a gold rule, or a reward model's win rate of the teacher's samples against the
   DPO model's on the same prompts), and compare length and end-of-turn rate;
4. measure the teachers' mean TVD and alpha on the DPO model's samples (vocab-parallel, the
   loss's own computation), and the r that would put mean alpha at a target.

Verdict (:func:`verdict`): ``fail`` when the teacher degenerates (mean length above
``max_length_ratio`` x the baseline's, or end-of-turn rate below ``min_eos_ratio`` x the
baseline's; the baseline is the SFT model, the policy's start, when given, else the DPO model) or
answers worse than the DPO model with the 95% interval of the paired difference entirely below 0;
``warn`` when it answers worse but the interval reaches 0; ``pass`` otherwise. A DPO model that
itself degenerates against SFT (likelihood displacement) makes every teacher built on it suspect:
with the SFT model given, such a teacher fails on length or end-of-turn rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .policy_eval import PolicyEvaluator, _all_gather_dict, resolve_checkpoint
from .stats import mean_ci, per_cluster_means


@dataclass(frozen=True)
class PreflightLimits:
    """When a teacher counts as degenerate, relative to the DPO model's own samples."""

    max_length_ratio: float = 1.3  # teacher's mean response length / the DPO model's
    min_eos_ratio: float = 0.9  # teacher's end-of-turn rate / the DPO model's


def teacher_token_stats(evaluator: PolicyEvaluator, stage, pairs: list[tuple[list[int], list[int]]],
                        loss_config) -> dict:
    """Mean TVD and alpha of the teachers over the response tokens of ``pairs`` (prompt ids,
    response ids), computed by the loss itself (vocab-parallel, no vocabulary gather). ``stage``:
    ``LockstepStage(dpo, {"other": other}, policy_role="dpo")``. Collective; the same dict on every rank."""
    from megatron.core import parallel_state

    from ..data.batching import make_micro_batch
    from ..loss.aligndistil import aligndistil_loss
    from ..loss.objectives import sequence_sums
    from ..core.schedule import drive, pipeline_rows, sum_over_replicas

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    idx = [i for i in range(rank, len(pairs), dp) if pairs[i][1]]  # responses of no token add nothing
    size = evaluator.settings.batch_size
    chunks = [idx[b: b + size] for b in range(0, len(idx), size)]
    seq_len = max((len(pairs[i][0]) + len(pairs[i][1]) - 1 for i in idx), default=1)
    batches = [make_micro_batch([pairs[i] for i in c] + [pairs[c[0]]] * (size - len(c)), seq_len) for c in chunks]

    def score(logits, batch):
        z_dpo, z_other = logits["dpo"], logits["other"]
        out = aligndistil_loss(z_dpo, z_dpo, z_other, loss_config, vocab_size=evaluator.vocab_size)
        sums = [sequence_sums(v, batch) for v in (out.tvd, out.alpha, torch.ones_like(out.tvd))]
        return torch.stack(sums).double()  # [3, n]: TVD, alpha and token sums per sequence

    got = drive(stage, batches, score, forward_only=True, seq_length=seq_len,
                rows=pipeline_rows(size, stage.num_models)) if batches else []
    totals = torch.zeros(3, dtype=torch.float64)
    for chunk, value in zip(chunks, got):
        totals += value[:, :len(chunk)].sum(-1).cpu()  # the top-up rows of the last chunk are dropped
    tvd, alpha, tokens = sum_over_replicas(totals).tolist()
    return {"tokens": int(tokens), "tvd_mean": tvd / max(tokens, 1.0), "alpha_mean": alpha / max(tokens, 1.0)}


def sample_teacher(evaluator: PolicyEvaluator, stage, loss_config, stop_ids) -> dict:
    """K samples per prompt from softmax(z*) (temperature and limits of the evaluator's
    settings). Returns ``{(prompt, k): {"response_ids", "stopped"}}`` on every rank."""
    from megatron.core import parallel_state

    from ..generation import generate
    from ..loss.aligndistil import dense_teacher

    s = evaluator.settings
    params = replace(s.sampling, stop_ids=tuple(stop_ids))
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    jobs = [(i, k) for i in range(len(evaluator.items)) for k in range(s.samples_per_prompt)]
    mine = jobs[rank::dp]
    out = {}
    for b in range(0, len(mine), s.batch_size):
        batch = mine[b: b + s.batch_size]
        res = generate(stage, [evaluator.prompts[i] for i, _ in batch], params, evaluator.vocab_size,
                       sequence_ids=[i * s.samples_per_prompt + k for i, k in batch],
                       combine=lambda rows: dense_teacher(rows["dpo"], rows["other"], loss_config)[0])
        out.update(zip(batch, res))
    return _all_gather_dict(out)


@torch.no_grad()
def preflight(evaluator: PolicyEvaluator, dpo_load: str, other_load: str, loss_config,
              target_alpha: float | None = None, sft_load: str | None = None) -> dict:
    """Judge the DPO model and the teacher it makes with ``other_load`` (the reverse-DPO model, or
    the reference for the vanilla teacher) under ``loss_config``; see the module docstring.
    Collective; the same dict on every rank: ``dpo`` and ``teacher`` (gold, length, EOS rate and
    their per-prompt values), ``teacher_minus_dpo`` (paired, 95% interval over prompts),
    ``token_stats`` (on the DPO model's samples) and ``r_for_target_alpha``; with ``sft_load``
    also ``sft`` (the policy's start, the baseline of the degeneracy checks)."""
    from ..core.lockstep import LockstepStage

    s = evaluator.settings
    dpo_result = evaluator.evaluate("dpo", dpo_load)
    dpo_path = resolve_checkpoint(dpo_load, evaluator.scratch)
    stage = LockstepStage(evaluator._build(dpo_path), {"other": evaluator._build(resolve_checkpoint(other_load, evaluator.scratch))},
                          policy_role="dpo")
    stage.eval()
    jobs = [(i, k) for i in range(len(evaluator.items)) for k in range(s.samples_per_prompt)]
    dpo_pairs = [(evaluator.prompts[i], ids) for (i, _), ids in zip(jobs, dpo_result["sample_response_ids"])]
    stats = teacher_token_stats(evaluator, stage, dpo_pairs, loss_config)
    stop_ids = evaluator._stop_ids(dpo_path)
    samples = sample_teacher(evaluator, stage, loss_config, stop_ids)
    texts = [evaluator._text(samples[j]["response_ids"], stop_ids) for j in jobs]
    gold = [evaluator.judge(evaluator.items[i]["instruction"], t) for (i, _), t in zip(jobs, texts)]
    prompt_of = [i for i, _ in jobs]
    teacher = {"name": "teacher", "gold": mean_ci(per_cluster_means(gold, prompt_of)),
               "per_prompt_gold": per_cluster_means(gold, prompt_of),
               "response_len_mean": sum(len(samples[j]["response_ids"]) for j in jobs) / len(jobs),
               "eos_rate": sum(samples[j]["stopped"] for j in jobs) / len(jobs), "sample_outputs": texts}
    teacher["gold_rate"] = teacher["gold"]["mean"]
    diffs = [a - b for a, b in zip(teacher["per_prompt_gold"], dpo_result["per_prompt_gold"])]
    r_target = None
    if target_alpha is not None and stats["tvd_mean"] > 0:
        r_target = (target_alpha - loss_config.eps) / stats["tvd_mean"]
    out = {"dpo": dpo_result, "teacher": teacher, "teacher_minus_dpo": mean_ci(diffs, bounds=(-1.0, 1.0)),
           "token_stats": stats, "target_alpha": target_alpha, "r_for_target_alpha": r_target}
    if sft_load is not None:
        out["sft"] = evaluator.evaluate("sft", sft_load)
    return out


def verdict(result: dict, limits: PreflightLimits = PreflightLimits()) -> tuple[str, list[str]]:
    """(``pass`` / ``warn`` / ``fail``, reasons) of a :func:`preflight` result (see the module
    docstring). The comparison uses ``teacher_minus_dpo``: the gold rates, or the reward model's
    win rate minus one half when the caller put that there."""
    dpo, teacher, diff = result["dpo"], result["teacher"], result["teacher_minus_dpo"]
    base, who = (result["sft"], "SFT") if result.get("sft") else (dpo, "DPO")
    reasons, level = [], "pass"
    ratio = teacher["response_len_mean"] / max(base["response_len_mean"], 1e-9)
    if ratio > limits.max_length_ratio:
        reasons.append(f"degenerate: the teacher's responses are {ratio:.2f}x as long as the {who} model's "
                       f"({teacher['response_len_mean']:.1f} vs {base['response_len_mean']:.1f} tokens; limit "
                       f"{limits.max_length_ratio}x)")
        level = "fail"
    if teacher["eos_rate"] < limits.min_eos_ratio * base["eos_rate"]:
        reasons.append(f"degenerate: the teacher ends {teacher['eos_rate']:.0%} of its responses, the {who} model "
                       f"{base['eos_rate']:.0%} (limit {limits.min_eos_ratio}x)")
        level = "fail"
    if who == "SFT" and level == "fail" and (dpo["eos_rate"] < limits.min_eos_ratio * base["eos_rate"] or
                                             dpo["response_len_mean"] > limits.max_length_ratio * base["response_len_mean"]):
        reasons.append(f"the DPO model itself degenerates against SFT (length {dpo['response_len_mean']:.1f} vs "
                       f"{base['response_len_mean']:.1f}, end-of-turn {dpo['eos_rate']:.0%} vs {base['eos_rate']:.0%}): "
                       "every teacher built on it inherits that")
    if diff["mean"] < 0:
        sure = diff["hi"] < 0
        reasons.append(f"the teacher answers worse than the DPO model: {diff['mean']:+.3f} "
                       f"[{diff['lo']:+.3f}, {diff['hi']:+.3f}]" + ("" if sure else " (the interval reaches 0)"))
        level = "fail" if sure else ("warn" if level == "pass" else level)
    if not math.isfinite(diff["mean"]):
        reasons.append("no comparison: non-finite scores")
        level = "fail"
    return level, reasons
