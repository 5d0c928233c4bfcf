"""Driving Megatron's pipeline schedule for forward-only passes (evaluation, log-prob scoring).

Megatron's schedules move one activation tensor between stages and call a loss function on the
last stage. :func:`forward_only` runs one micro-batch through a model (a GPTModel or a
:class:`~megatron_aligndistil.models.lockstep.LockstepStage`) at any TP/PP and returns what
``score`` computed from the last stage's logits, or None on other stages.
"""

from __future__ import annotations

import torch

from .. import platform


def forward_only(model, batch, score, micro_batch_size: int):
    """``batch``: a MicroBatch (``tokens``/``positions`` ``[b, s]``). ``score(logits)`` gets the last
    stage's output (a list of logits ``[b, s, V/TP]`` for a LockstepStage) and returns a tensor.
    ``micro_batch_size``: rows of the packed activation (b x models of a LockstepStage)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    picked = {}

    def forward_step(data_iter, m):
        next(data_iter)
        out = m(batch.tokens.to(platform.device()), batch.positions.to(platform.device()), None)
        if not parallel_state.is_pipeline_last_stage():
            return out, None

        def loss_func(first):
            logits = [first] + list(out[1:]) if isinstance(out, list) else [first]
            picked["value"] = score(logits)
            return torch.zeros((), device=first.device), {}

        return (out[0] if isinstance(out, list) else out), loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([0]), model=[model], num_microbatches=1,
        seq_length=batch.tokens.shape[1], micro_batch_size=micro_batch_size, forward_only=True,
    )
    return picked.get("value")
