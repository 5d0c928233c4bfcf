"""Deterministic sampling of global batches and micro-batch tensors with loss masks.

Token alignment (SPEC section 1): the logits at position i predict token i+1; loss positions are
exactly those whose *target* is a response token, from the first response token through the last
(the end-of-turn token).

A micro-batch holds *sequences* (prompt, response) in rows of ``s`` positions. Unpacked, each row
holds one sequence, right-padded: with a causal model padding after a sequence never changes its
logits. Packed (``--pack-sequences``), a row holds several sequences back to back and attention is
block-diagonal causal (``core.schedule.block_causal_mask``), so a sequence sees only its own tokens. Nothing
downstream assumes one row is one sequence: every position carries the index of its sequence
(``seq_index``, -1 on padding) and losses are reduced per sequence through it
(``loss.objectives.sequence_sums``).

Positions stay 0..s-1 along a packed row: Megatron's RoPE rotates by the row position, and
attention scores under RoPE depend only on the distance between query and key, which is the
same inside a block as in the sequence alone (tests/test_packing.py checks packed equals unpacked).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..core.errors import UserError


@dataclass
class MicroBatch:
    """``tokens``/``positions``/``labels``/``loss_mask``/``seq_index``: ``[b, s]`` (b rows).

    ``segments``: per row, the ``(start, length)`` of each sequence it holds, for the attention
    mask (packed) or TransformerEngine's ``cu_seqlens``; ``num_sequences``: sequences in the
    micro-batch, numbered 0..n-1 in the order they were given (not the order of rows)."""

    tokens: torch.Tensor  # int64 model inputs
    positions: torch.Tensor  # int64
    labels: torch.Tensor  # int64 targets (tokens shifted by one)
    loss_mask: torch.Tensor  # float32, 1 where the target is a response token
    seq_index: torch.Tensor  # int64, the sequence each position belongs to; -1 on padding
    segments: list  # per row: [(start, length), ...]
    num_sequences: int
    packed: bool = False
    # float32 [b, s], the rollout engine's log-prob of each target where loss_mask is 1 (on-policy
    # sequences sampled by an engine that reports them; None otherwise)
    sampler_logprobs: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]


@functools.lru_cache(maxsize=2)
def sample_order(num_records: int, epoch: int, seed: int, shuffle: bool = True) -> torch.Tensor:
    """Record order for one epoch: a permutation seeded by (seed, epoch), the same on every rank
    (int64 ``[num_records]``, 8 bytes a record, kept for the epoch's next global batches)."""
    if not shuffle:
        return torch.arange(num_records)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_records, generator=g)


def global_batch_indices(num_records: int, consumed: int, global_batch: int, seed: int,
                         shuffle: bool = True) -> list[int]:
    """Record indices of the global batch that starts after ``consumed`` samples (epochs wrap)."""
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(consumed + len(out), num_records)
        order = sample_order(num_records, epoch, seed, shuffle)
        out.extend(order[offset: offset + global_batch - len(out)].tolist())
    return out


def padded_length(lengths, multiple: int = 1) -> int:
    """Longest input length, rounded up to ``multiple`` (TP size under sequence parallelism)."""
    longest = max(lengths)
    return -(-longest // multiple) * multiple


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask`` > 0, else exactly 0 (not ``values * mask``: NaN * 0 is NaN, so a
    padding position's value, whatever it is, never reaches a sum)."""
    return torch.where(mask > 0, values, torch.zeros_like(values))


def input_length(sequence) -> int:
    """Model input positions of one (prompt_ids, response_ids[, sampler_logprobs]) sequence: all
    tokens but the last."""
    return len(sequence[0]) + len(sequence[1]) - 1


def build_micro_batch(rows, seq_len: int, pad_id: int = 0, packed: bool = False) -> MicroBatch:
    """``rows``: per row, a list of (sequence number, (prompt_ids, response_ids)). Each sequence's
    inputs are prompt+response minus the last token, placed back to back from position 0; the
    mask marks targets inside the response; the rest of the row is padding. A sequence may carry
    a third element, the sampler's log-prob of each response id (``sampler_logprobs``)."""
    b = len(rows)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, seq_len), dtype=torch.float32)
    seq_index = torch.full((b, seq_len), -1, dtype=torch.long)
    sampler = None
    segments, count = [], 0
    for i, row in enumerate(rows):
        start, spans = 0, []
        for number, sequence in row:
            prompt, response = sequence[0], sequence[1]
            ids = list(prompt) + list(response)
            n = len(ids) - 1
            if start + n > seq_len:
                raise ValueError(f"sequences of {start + n} input tokens exceed the row length {seq_len}")
            tokens[i, start: start + n] = torch.tensor(ids[:-1])
            labels[i, start: start + n] = torch.tensor(ids[1:])
            mask[i, start + len(prompt) - 1: start + n] = 1.0  # targets ids[len(prompt)] ... ids[-1]
            if len(sequence) > 2:
                if len(sequence[2]) != len(response):
                    raise ValueError(f"{len(sequence[2])} sampler log-probs for {len(response)} response tokens")
                sampler = torch.zeros((b, seq_len), dtype=torch.float32) if sampler is None else sampler
                sampler[i, start + len(prompt) - 1: start + n] = torch.tensor(sequence[2], dtype=torch.float32)
            seq_index[i, start: start + n] = number
            spans.append((start, n))
            start += n
            count += 1
        segments.append(spans)
    positions = torch.arange(seq_len).unsqueeze(0).expand(b, -1).contiguous()
    return MicroBatch(tokens, positions, labels, mask, seq_index, segments, count, packed, sampler)


def make_micro_batch(sequences, seq_len: int, pad_id: int = 0) -> MicroBatch:
    """One sequence (prompt_ids, response_ids) per row, right-padded to ``seq_len``."""
    return build_micro_batch([[(i, seq)] for i, seq in enumerate(sequences)], seq_len, pad_id)


def pack_records(record_sequences: list[list], rows_per_micro_batch: int, row_length: int) -> list[list[list]]:
    """Pack records into micro-batches of ``rows_per_micro_batch`` rows of ``row_length`` input
    positions. ``record_sequences[k]``: the (prompt_ids, response_ids) sequences of record k (DPO:
    chosen, rejected). A record's sequences all land in the same micro-batch and a sequence is
    never split across rows. First fit, records taken longest first.

    Returns micro-batches as lists of rows; a row is a list of (record k, sequence j of record k).
    """
    order = sorted(range(len(record_sequences)),
                   key=lambda k: -sum(input_length(s) for s in record_sequences[k]))
    micro_batches, fill = [], []  # fill[m][r]: positions used in row r of micro-batch m
    for k in order:
        lengths = [input_length(s) for s in record_sequences[k]]
        if max(lengths) > row_length:
            raise UserError(f"a sequence of {max(lengths)} input tokens does not fit --seq-length {row_length}")
        for m in range(len(micro_batches) + 1):
            if m == len(micro_batches):
                micro_batches.append([[] for _ in range(rows_per_micro_batch)])
                fill.append([0] * rows_per_micro_batch)
            placed, trial = [], list(fill[m])
            for n in lengths:
                row = next((r for r in range(rows_per_micro_batch) if trial[r] + n <= row_length), None)
                if row is None:
                    break
                trial[row] += n
                placed.append(row)
            if len(placed) == len(lengths):
                for j, row in enumerate(placed):
                    micro_batches[m][row].append((k, j))
                fill[m] = trial
                break
    return micro_batches  # every micro-batch has the same rows (one p2p shape); some may be empty
