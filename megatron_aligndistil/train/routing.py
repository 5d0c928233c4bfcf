"""The policy's MoE routing, per step, as metrics (the method's ``loss`` stays the method's):

* ``moe_load_balancing_loss``: the routers' auxiliary loss without its coefficient, as
  Megatron-LM logs ``load_balancing_loss``: per MoE layer the mean over micro-batches and
  data-parallel ranks, then the mean over MoE layers. Only with a balancing loss
  (``--moe-router-load-balancing-type aux_loss|seq_aux_loss`` and ``--moe-aux-loss-coeff > 0``).
* ``moe_expert_load_max_mean``: per MoE layer, the most tokens routed to one expert over the mean
  per expert (1: balanced; at most ``num_experts / top-k``), then the mean over MoE layers;
  ``moe_expert_load_max_mean_worst``: the largest layer's.

Counted in the training forward only (grad enabled: a recomputed forward counts once, sampling
and evaluation not at all), padding left out. The counts join the step's one statistics
reduction (:class:`StepStatistics`): ``[moe layers x experts]`` token counts and the per-layer
balancing loss, summed over TP shards of the sequence (sequence parallelism) and over
data-parallel ranks (expert-parallel ranks included); pipeline stages add their own layers.
"""

from __future__ import annotations

import torch

from .statistics import REPLICA, SHARD

METRICS = ("moe_load_balancing_loss", "moe_expert_load_max_mean", "moe_expert_load_max_mean_worst")
# the name under which Megatron's routers record each balancing loss, without its coefficient
TRACKER_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}


class RoutingStatistics:
    """Forward hooks on the routers of the policy's ``chunks``; ``moe_layers`` the global
    0-based indices of the model's MoE layers, ``num_experts`` E. ``sequence_parallel``: each
    TP rank routes its own slice of the sequence (counts summed over TP), else every TP rank
    routes the same tokens (TP rank 0 counts). ``balancing_type``: the routers' balancing loss
    (a key of :data:`TRACKER_NAMES`), None without one."""

    def __init__(self, chunks: list, moe_layers: tuple, num_experts: int, sequence_parallel: bool,
                 balancing_type: str | None):
        from megatron.core.transformer.moe.router import TopKRouter

        self.tracker_name = TRACKER_NAMES[balancing_type] if balancing_type else None
        self.moe_layers = tuple(moe_layers)
        self.num_experts = num_experts
        self._row = {layer: i for i, layer in enumerate(self.moe_layers)}
        self._how = SHARD if sequence_parallel else REPLICA
        self._counts: torch.Tensor | None = None  # [moe layers, E] tokens routed this step, this rank
        self._calls: torch.Tensor | None = None  # [moe layers] training forwards this step, this rank
        self._hooks = [module.register_forward_hook(self._count, with_kwargs=True)
                       for chunk in chunks for module in chunk.modules() if isinstance(module, TopKRouter)]

    def _count(self, router, args, kwargs, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return
        _, routing_map = output  # [tokens, E] bool, tokens in [s, b] order
        padding = args[1] if len(args) > 1 else kwargs.get("padding_mask")
        if padding is not None:  # [s, b], True at padding
            routing_map = routing_map[~padding.reshape(-1)]
        if self._counts is None:
            self._counts = torch.zeros(len(self.moe_layers), self.num_experts, dtype=torch.float64,
                                       device=routing_map.device)
            self._calls = torch.zeros(len(self.moe_layers), dtype=torch.float64, device=routing_map.device)
        row = self._row[router.layer_number - 1]  # Megatron's layer numbers are global, from 1
        self._counts[row] += routing_map.sum(0).double()
        self._calls[row] += 1

    def groups(self) -> dict:
        """The statistics groups to reduce with the step's others."""
        names = [f"{layer}.{e}" for layer in self.moe_layers for e in range(self.num_experts)]
        return {"moe_tokens": (tuple(names), self._how),
                "moe_balancing": (tuple(f"{layer}" for layer in self.moe_layers), self._how),
                "moe_calls": (tuple(f"{layer}" for layer in self.moe_layers), REPLICA)}

    def add_to(self, statistics) -> None:
        """This rank's counts of the step, into ``statistics``; resets them and Megatron's
        tracker of the balancing loss for the next step."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        if self._counts is None:  # a stage without MoE layers, or no training forward
            return
        tracker = get_moe_layer_wise_logging_tracker().get(self.tracker_name) if self.tracker_name else None
        balancing = torch.zeros(len(self.moe_layers), dtype=torch.float64, device=self._counts.device)
        if tracker is not None:
            per_layer = tracker["values"].detach().double()  # [num_layers], summed over this step's forwards
            balancing = per_layer[list(self.moe_layers)].to(balancing.device)
            tracker["values"].zero_()
        statistics.add(moe_tokens=self._counts.flatten(), moe_balancing=balancing, moe_calls=self._calls)
        self._counts = self._calls = None

    def metrics(self, reduced: dict) -> dict:
        """metrics.jsonl fields from the reduced groups (see the module's docstring)."""
        tokens = torch.tensor([reduced["moe_tokens"][f"{layer}.{e}"] for layer in self.moe_layers
                               for e in range(self.num_experts)], dtype=torch.float64)
        tokens = tokens.view(len(self.moe_layers), self.num_experts)
        ratio = tokens.amax(1) / tokens.mean(1).clamp_min(1e-12)
        out = {"moe_expert_load_max_mean": float(ratio.mean()), "moe_expert_load_max_mean_worst": float(ratio.max())}
        if self.tracker_name:
            per_layer = [reduced["moe_balancing"][f"{layer}"] / max(reduced["moe_calls"][f"{layer}"], 1.0)
                         for layer in self.moe_layers]
            out["moe_load_balancing_loss"] = sum(per_layer) / len(per_layer)
        return out

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
