"""Issue 2: a Megatron GPT (Qwen-shaped) model under TP2 PP2 matches TP1 PP1: loss and gradients."""

import dataclasses

import pytest
import torch

from megatron_aligndistil.core.parallel import Layout
from megatron_aligndistil.testing import run_distributed

from conftest import tiny_arch


def _cross_entropy_step(arch_fields, full_weights, tokens, num_microbatches):
    """Runs on every rank: build the local stage, load weights, one fwd/bwd through the schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_aligndistil.models import qwen
    from megatron_aligndistil.core import sharding

    arch = qwen.QwenArch(**arch_fields)
    config = qwen.transformer_config(arch)
    model = qwen.build_model(arch, config)
    if full_weights is None:
        full_weights = sharding.gather_full_state_dict(model)
    else:
        sharding.load_full_state_dict(model, full_weights)

    micro = list(zip(tokens.chunk(num_microbatches), tokens.chunk(num_microbatches)))
    seq = tokens.shape[1] - 1

    def forward_step(data_iter, model):
        batch, _ = next(data_iter)
        inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        positions = torch.arange(seq).unsqueeze(0).expand_as(inputs)
        per_token = model(inputs, positions, None, labels=labels)

        def loss_func(output):
            loss = output.float().sum() / output.numel()
            return loss, {"loss": loss.detach()}

        return per_token, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
        num_microbatches=num_microbatches, seq_length=seq,
        micro_batch_size=tokens.shape[0] // num_microbatches, forward_only=False,
    )
    grads = sharding.gather_full_state_dict(model, use_grad=True)
    loss = sum(x["loss"] for x in losses) if losses else None
    is_last = parallel_state.is_pipeline_last_stage()
    return {"loss": loss if is_last else None, "grads": grads, "weights": full_weights}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tp2_pp2_matches_tp1_pp1(tied):
    arch = tiny_arch(tied=tied, vocab_size=1001)  # padded vocab split over TP ranks
    fields = dataclasses.asdict(arch)
    tokens = torch.randint(0, arch.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
    ref = run_distributed(_cross_entropy_step, 1, args=(fields, None, tokens, 2), layout=Layout(1, 1))[0]
    out = run_distributed(
        _cross_entropy_step, 4, args=(fields, ref["weights"], tokens, 2), layout=Layout(tp=2, pp=2)
    )
    losses = [o["loss"] for o in out if o["loss"] is not None]
    assert len(losses) == 2  # the two TP ranks of the last stage
    for loss in losses:
        torch.testing.assert_close(loss, ref["loss"], rtol=0, atol=1e-5)
    assert set(out[0]["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        assert g.abs().sum() > 0, name
        for rank in range(4):
            torch.testing.assert_close(out[rank]["grads"][name], g, rtol=0, atol=1e-5, msg=name)
