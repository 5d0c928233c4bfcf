"""One step's statistics: named values each rank adds per micro-batch, reduced over the world once
per step by :meth:`StepStatistics.reduce` (one sum all-reduce, and one max all-reduce when a group
asks for it).

How a group is counted:

* ``REPLICA``: once per model replica. The values come from the last pipeline stage, where every
  TP rank holds the same copy; TP rank 0 adds it (the loss, the method's sums, the rollout mismatch).
* ``SHARD``: over every rank, each TP shard adding its own part (the per-model counts of
  non-finite logits, which each rank finds in its own vocabulary shard).
* ``MAX``: the maximum over every rank.
"""

from __future__ import annotations

import torch

from .. import platform

REPLICA, SHARD, MAX = "replica", "shard", "max"


class StepStatistics:
    """``groups``: ``{group: (names, how)}``; ``how`` one of :data:`REPLICA`, :data:`SHARD`,
    :data:`MAX`. A group no micro-batch added to counts zeros."""

    def __init__(self, groups: dict[str, tuple[tuple[str, ...], str]]):
        for group, (_, how) in groups.items():
            if how not in (REPLICA, SHARD, MAX):
                raise ValueError(f"statistics group {group!r}: unknown reduction {how!r}")
        self.groups = groups
        self._added: dict[str, list[torch.Tensor]] = {group: [] for group in groups}

    def add(self, **values: torch.Tensor) -> None:
        """One micro-batch's values, ``group=tensor [len(names)]`` for any of the groups."""
        for group, tensor in values.items():
            self._added[group].append(tensor.detach().double())

    def _local(self, group: str, device) -> torch.Tensor:
        names, how = self.groups[group]
        added = self._added[group]
        if not added:
            return torch.zeros(len(names), dtype=torch.float64, device=device)
        stacked = torch.stack(added).to(device)
        return stacked.amax(0) if how == MAX else stacked.sum(0)

    def reduce(self) -> dict[str, dict[str, float]]:
        """Collective (every rank, once per step): ``{group: {name: global value}}``."""
        from megatron.core import parallel_state

        dev = platform.device()
        tp_rank0 = parallel_state.get_tensor_model_parallel_rank() == 0
        summed = [g for g, (_, how) in self.groups.items() if how != MAX]
        maxed = [g for g, (_, how) in self.groups.items() if how == MAX]
        out = {}
        for groups, op in ((summed, torch.distributed.ReduceOp.SUM), (maxed, torch.distributed.ReduceOp.MAX)):
            if not groups:
                continue
            parts = [self._local(g, dev) if tp_rank0 or self.groups[g][1] != REPLICA
                     else torch.zeros(len(self.groups[g][0]), dtype=torch.float64, device=dev) for g in groups]
            flat = torch.cat(parts)
            torch.distributed.all_reduce(flat, op=op)
            values = iter(flat.cpu().tolist())
            for g in groups:
                out[g] = {name: next(values) for name in self.groups[g][0]}
        return out
