"""Batched autoregressive sampling from a Megatron policy under TP and PP.

Each step runs Megatron's forward-only schedule over the current sequences (right-padded; a
sequence's next-token logits are read at its own last position, which padding after it cannot
change under causal attention), gathers only the *last position's* logits over the TP group,
masks the vocab padding, and samples. Randomness is per sequence and step
(``seed``, the record's global index, the step), so a run samples the same tokens at any
TP/PP/DP layout and batch composition. The last pipeline stage samples and broadcasts the tokens
to the other stages.

This version recomputes the prefix at every step (no KV cache yet): O(n^2) in the response
length. Correct and layout-independent; the cached version is the next step of issue 7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import platform


@dataclass
class SamplingParams:
    max_new_tokens: int = 1024
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop_ids: tuple = ()  # end-of-turn / EOS ids; the stop token is kept in the response
    seed: int = 1234


def _select(logits: torch.Tensor, params: SamplingParams, generators) -> torch.Tensor:
    """Next token per row of float32 ``logits [b, V]`` (padding already -inf)."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    z = logits / params.temperature
    if params.top_k and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest prefix reaching p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs.cpu(), generators)])


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams, vocab_size: int,
             sequence_ids: list[int] | None = None) -> list[dict]:
    """Sample a response for each prompt. ``model``: this rank's pipeline stage (a GPTModel, or
    anything whose last stage returns logits ``[b, s, V/TP]``). ``sequence_ids``: global indices
    seeding each sequence's randomness (default 0..n-1). Collective over the TP and PP groups.

    Returns ``[{"response_ids": [...], "stopped": bool}]`` on every rank.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dev = platform.device()
    n = len(prompts)
    ids = sequence_ids if sequence_ids is not None else list(range(n))
    lengths = torch.tensor([len(p) for p in prompts])
    total = int(lengths.max()) + params.max_new_tokens
    tokens = torch.zeros(n, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    done = torch.zeros(n, dtype=torch.bool)
    stopped = torch.zeros(n, dtype=torch.bool)
    stop = torch.tensor(list(params.stop_ids) or [-1])
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    last_stage = parallel_state.is_pipeline_last_stage()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
    model.eval()
    for step in range(params.max_new_tokens):
        cur = int(lengths.max())
        batch = tokens[:, :cur].to(dev)
        positions = torch.arange(cur, device=dev).unsqueeze(0).expand(n, -1)
        picked = {}

        def forward_step(data_iter, m):
            next(data_iter)
            out = m(batch, positions, None)

            def collect(logits):
                rows = logits[torch.arange(n, device=logits.device), (lengths - 1).to(logits.device)]
                rows = rows.float().contiguous()
                if tp > 1:
                    parts = [torch.empty_like(rows) for _ in range(tp)]
                    torch.distributed.all_gather(parts, rows, group=tp_group)
                    rows = torch.cat(parts, -1)
                rows[:, vocab_size:] = float("-inf")  # Megatron's vocab padding is never sampled
                picked["logits"] = rows
                return torch.zeros((), device=logits.device), {}

            return out, collect

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([0]), model=[model], num_microbatches=1,
            seq_length=cur, micro_batch_size=n, forward_only=True,
        )
        new = torch.zeros(n, dtype=torch.long)
        if last_stage:
            gens = [torch.Generator().manual_seed(params.seed * 1_000_003 + sid * 7_919 + step) for sid in ids]
            new = _select(picked["logits"].cpu(), params, gens).long()
        new = new.to(dev)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(new, src=last_rank, group=pp_group)
        new = new.cpu()
        active = ~done
        tokens[active, lengths[active]] = new[active]
        hit = active & torch.isin(new, stop)
        lengths[active] += 1
        stopped |= hit
        done |= hit
        if bool(done.all()):
            break
    return [{"response_ids": tokens[i, len(prompts[i]): int(lengths[i])].tolist(), "stopped": bool(stopped[i])}
            for i in range(n)]
