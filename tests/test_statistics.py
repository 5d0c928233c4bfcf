"""A step's statistics (train/statistics.py): each group counted as its kind says, over real ranks."""

import pytest

from megatron_aligndistil.core.parallel import Layout
from megatron_aligndistil.testing import run_distributed


def _reduce_on_each_rank():
    import torch
    import torch.distributed as dist

    from megatron_aligndistil.train.statistics import MAX, REPLICA, SHARD, StepStatistics

    rank = dist.get_rank()  # TP2 x DP2: ranks 0, 1 one replica, ranks 2, 3 the other
    stats = StepStatistics({"terms": (("loss", "n"), REPLICA), "nonfinite": (("policy", "dpo"), SHARD),
                            "worst": (("d",), MAX), "unused": (("u",), REPLICA)})
    for k in range(2):  # two micro-batches
        stats.add(terms=torch.tensor([1.0 + rank, 10.0]), nonfinite=torch.tensor([float(rank), 1.0]),
                  worst=torch.tensor([float(rank * 3 + k)]))
    return stats.reduce()


def test_each_group_is_counted_as_its_kind_says():
    """REPLICA: TP rank 0 of each replica (ranks 0 and 2), summed over micro-batches; SHARD: every
    rank; MAX: the largest on any rank; a group nothing was added to: zeros."""
    got = run_distributed(_reduce_on_each_rank, 4, layout=Layout(tp=2))
    want = {"terms": {"loss": 2 * (1 + 3), "n": 2 * (10 + 10)}, "nonfinite": {"policy": 2 * (0 + 1 + 2 + 3), "dpo": 8},
            "worst": {"d": 3 * 3 + 1}, "unused": {"u": 0.0}}
    assert got == [want] * 4


def test_an_unknown_reduction_is_refused():
    from megatron_aligndistil.train.statistics import StepStatistics

    with pytest.raises(ValueError, match="unknown reduction 'mean'"):
        StepStatistics({"x": (("a",), "mean")})
