"""Deterministic sampling of global batches and micro-batch tensors with loss masks.

Token alignment (SPEC section 1): the logits at position i predict token i+1; loss positions are
exactly those whose *target* is a response token, from the first response token through the last
(the end-of-turn token). Sequences are right-padded; with a causal model, padding after a sequence
never changes its logits, and padded positions have mask 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    """``tokens``/``positions``/``labels``/``loss_mask``: ``[b, s]``; ``num_sequences``: b (real)."""

    tokens: torch.Tensor  # int64 model inputs
    positions: torch.Tensor  # int64
    labels: torch.Tensor  # int64 targets (tokens shifted by one)
    loss_mask: torch.Tensor  # float32, 1 where the target is a response token

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]


def sample_order(num_records: int, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
    """Record order for one epoch: a permutation seeded by (seed, epoch), the same on every rank."""
    if not shuffle:
        return list(range(num_records))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_records, generator=g).tolist()


def global_batch_indices(num_records: int, consumed: int, global_batch: int, seed: int,
                         shuffle: bool = True) -> list[int]:
    """Record indices of the global batch that starts after ``consumed`` samples (epochs wrap)."""
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(consumed + len(out), num_records)
        order = sample_order(num_records, epoch, seed, shuffle)
        out.extend(order[offset: offset + global_batch - len(out)])
    return out


def padded_length(lengths, multiple: int = 1) -> int:
    """Longest input length, rounded up to ``multiple`` (TP size under sequence parallelism)."""
    longest = max(lengths)
    return -(-longest // multiple) * multiple


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask`` > 0, else exactly 0 (not ``values * mask``: NaN * 0 is NaN, so a
    padding position's value, whatever it is, never reaches a sum)."""
    return torch.where(mask > 0, values, torch.zeros_like(values))


def make_micro_batch(pairs, seq_len: int, pad_id: int = 0) -> MicroBatch:
    """``pairs``: list of (prompt_ids, response_ids). Inputs are prompt+response minus the last
    token, right-padded to ``seq_len``; the mask marks targets inside the response."""
    b = len(pairs)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, seq_len), dtype=torch.float32)
    for i, (prompt, response) in enumerate(pairs):
        ids = list(prompt) + list(response)
        n = len(ids) - 1
        if n > seq_len:
            raise ValueError(f"sequence of {n} input tokens exceeds the micro-batch length {seq_len}")
        tokens[i, :n] = torch.tensor(ids[:-1])
        labels[i, :n] = torch.tensor(ids[1:])
        mask[i, len(prompt) - 1: n] = 1.0  # targets ids[len(prompt)] ... ids[-1]
    positions = torch.arange(seq_len).unsqueeze(0).expand(b, -1).contiguous()
    return MicroBatch(tokens, positions, labels, mask)
