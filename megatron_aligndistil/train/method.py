"""What a training method supplies to the shared trainer, and the one place its per-token terms
become the micro-batch loss.

A method (``aligndistil.py``, ``sft.py``, ``dpo.py``) says which frozen models it needs, which
sequences a record contributes, its per-token terms and its per-sequence reduction. The trainer
builds micro-batches (packed or not) and calls :func:`score_micro_batch`, which sums every term
per sequence (``loss.objectives.sequence_sums``) and applies the method's reduction: nothing in a
method assumes one row is one sequence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..data.batching import build_micro_batch, input_length, pack_records, padded_length
from ..loss.objectives import sequence_sums, token_mean


@dataclass
class FrozenSpec:
    role: str  # e.g. "dpo", "rev", "ref"
    path: str


class Method:
    """Subclasses set ``name``, ``data_kind``, ``stat_names`` and implement ``frozen_models``,
    ``token_terms``, ``reduce`` and ``metrics``."""

    name = "method"
    data_kind = "distill"
    sequences_per_record = 1  # DPO: chosen + rejected
    stat_names: tuple = ()  # summed statistics ``reduce`` reports besides loss and example count

    on_policy = False  # responses sampled by the rollout engine at every iteration

    def frozen_models(self) -> list[FrozenSpec]:
        raise NotImplementedError

    def sequences(self, record) -> list[tuple]:
        """The (prompt_ids, response_ids) sequences of a record, in a fixed order; an on-policy
        record sampled by an engine that reports log-probs adds them as a third element."""
        if "sampler_logprobs" in record:
            return [(record["prompt_ids"], record["response_ids"], record["sampler_logprobs"])]
        return [(record["prompt_ids"], record["response_ids"])]

    def token_terms(self, logits: dict, batch, vocab_size: int) -> dict:
        """``logits``: role -> ``[b, s, V/TP]`` ("policy" and each frozen role). Returns name ->
        per-token float tensor ``[b, s]``; only loss positions of ``batch`` are ever summed."""
        raise NotImplementedError

    def reduce(self, sums: dict):
        """``sums``: name -> ``[n]`` per-sequence sums of each term, plus ``tokens`` (response
        tokens per sequence). Returns (per-example losses ``[e]``, differentiable; dict of 0-dim
        summed ``stat_names``)."""
        raise NotImplementedError

    def metrics(self, sums: dict) -> dict:
        """metrics.jsonl fields from global sums of ``stat_names`` (plus loss, sequences)."""
        return {}

    def identity(self) -> dict:
        """The method's fields that change the trajectory, keyed by flag dests (frozen models'
        paths absolute): part of the run identity checked on resume."""
        return {spec.role + "_load": os.path.realpath(spec.path) for spec in self.frozen_models()}

    def check_first_step(self, sums: dict) -> None:
        """Called with the global sums of the run's first iteration, before its optimizer step:
        raise a ``UserError`` when they show the method cannot learn anything (degenerate inputs)."""

    def micro_batches(self, records, rows: int, multiple: int = 1, pack_length: int | None = None,
                      at_least: int = 0):
        """This rank's micro-batches for ``records``. Unpacked: ``rows`` // sequences per record
        records per micro-batch, one sequence per row, all rows padded to the longest sequence.
        Packed (``pack_length``): rows of up to ``pack_length`` positions holding whole sequences,
        ``rows`` rows per micro-batch. Row length rounded up to ``multiple`` (TP under sequence
        parallelism); the same for every micro-batch, as the pipeline needs one shape, and at least
        ``at_least`` (the longest of the ranks whose tokens meet in an expert-parallel dispatch)."""
        per_record = [self.sequences(r) for r in records]
        if pack_length is None:
            k = rows // self.sequences_per_record
            groups = [[[(i, j)] for i in range(lo, min(lo + k, len(records))) for j in range(len(per_record[i]))]
                      for lo in range(0, len(records), k)]
        else:
            groups = pack_records(per_record, rows, pack_length)
        longest = max(sum(input_length(per_record[i][j]) for i, j in row) for g in groups for row in g if row)
        seq_len = max(padded_length([longest], multiple), at_least)
        out = []
        for group in groups:
            records_here = sorted({i for row in group for i, _ in row})  # numbered by record, then j
            number = {i: n * self.sequences_per_record for n, i in enumerate(records_here)}
            group = group + [[]] * (rows - len(group))  # a short last micro-batch gets empty rows
            out.append(build_micro_batch([[(number[i] + j, per_record[i][j]) for i, j in row] for row in group],
                                         seq_len, packed=pack_length is not None))
        return out, seq_len


class TokenMeanMethod(Method):
    """Per sequence: the mean over its response tokens of the ``objective`` term (AlignDistil,
    SFT); every other term is summed into a statistic of the same name."""

    def reduce(self, sums):
        losses = token_mean(sums["objective"], sums["tokens"])
        return losses, {k: v.sum() for k, v in sums.items() if k != "objective"}


def score_micro_batch(method: Method, logits: dict, batch, vocab_size: int):
    """The loss of one micro-batch and its statistics, on the logits' device.

    ``logits``: role -> ``[b, s, V/TP]`` in the trainer's role order (policy first). Returns
    ``(loss, n_examples, stats, bad)``: ``loss`` (0-dim, differentiable) is the sum of the
    per-example losses, or 0 with zero gradient if it is not finite (the caller stops the run
    before the optimizer step); ``n_examples`` a 0-dim int tensor (Megatron's ``num_tokens``);
    ``stats`` the float32 vector [loss, examples, *method.stat_names]; ``bad`` float32
    ``[len(logits)]``: per model, the response positions whose logits hold NaN or inf (counted
    only when the loss is not finite, as this needs a pass over the logits). A micro-batch without
    sequences (all padding: the empty ones an expert-parallel rank runs to keep step with the
    others) scores a zero loss of zero examples whose backward still runs through the model.
    """
    dev = logits["policy"].device
    if not bool((batch.seq_index >= 0).any()):
        zero = logits["policy"].float().sum() * 0.0  # a zero gradient, through every layer
        vec = torch.zeros(2 + len(method.stat_names), dtype=torch.float32, device=dev)
        return zero, torch.zeros((), dtype=torch.int, device=dev), vec, torch.zeros(len(logits), device=dev)
    terms = method.token_terms(logits, batch, vocab_size)
    names = list(terms)
    mask = batch.loss_mask.to(dev)
    per_sequence = sequence_sums(torch.stack([terms[k].float() for k in names] + [mask], -1), batch)
    sums = {k: per_sequence[:, i] for i, k in enumerate(names)} | {"tokens": per_sequence[:, -1]}
    losses, stats = method.reduce(sums)
    loss_sum = losses.sum()
    finite = torch.isfinite(loss_sum)
    bad = torch.zeros(len(logits), dtype=torch.float32, device=dev)
    if dev.type != "meta" and not bool(finite):  # one host sync per micro-batch (Megatron checks its loss too)
        rows = mask.reshape(-1) > 0
        for i, z in enumerate(logits.values()):
            bad[i] = (~torch.isfinite(z.reshape(-1, z.shape[-1])[rows])).any(-1).sum()
    vec = torch.stack([loss_sum.detach().float(), torch.tensor(float(losses.numel()), device=dev)]
                      + [stats[k].detach().float().to(dev) for k in method.stat_names])
    loss = torch.where(finite, loss_sum, torch.zeros_like(loss_sum))  # zero gradient if not finite
    return loss, torch.tensor(losses.numel(), dtype=torch.int, device=dev), vec, bad
