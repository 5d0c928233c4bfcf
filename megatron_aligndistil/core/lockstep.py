"""A pipeline stage that runs the trained policy and frozen models (teachers / reference) together.

Megatron's schedules move one activation tensor between pipeline stages. This stage packs the
policy's and the frozen models' hidden states along the batch dimension, ``[s, (1+F)*b, h]``, so
the frozen models run in lockstep with the policy inside the *same* 1F1B schedule: same
micro-batch, same stage, no second pipeline. Frozen models run under ``no_grad``; on the last
stage their logits exist only for the micro-batch being scored and are freed after its loss.
Backward flows through the policy slice only (the frozen slices of the gradient sent upstream
are zeros).

Give the schedule ``core.schedule.pipeline_rows(rows, num_models)`` rows so its p2p buffers fit
the stacked tensor.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.module import MegatronModule


class LockstepStage(MegatronModule):
    """policy + frozen models of one pipeline stage (or model chunk). Only the policy's parameters
    require grad. ``frozen``: ``{role: model}``; ``policy_role``: the first model's role (the one
    that trains; an evaluator may run any model there)."""

    def __init__(self, policy, frozen: dict | None = None, policy_role: str = "policy"):
        super().__init__(config=policy.config)
        frozen = dict(frozen or {})
        if policy_role in frozen:
            raise ValueError(f"role {policy_role!r} given twice")
        self.policy = policy
        self.roles = (policy_role, *frozen)
        self.frozen = torch.nn.ModuleList(frozen.values())
        for model in self.frozen:
            model.requires_grad_(False)
            model.eval()
        self.pre_process = policy.pre_process
        self.post_process = policy.post_process
        self.model_type = policy.model_type  # read by Megatron's schedules
        # the chunk's virtual stage (None without them), read by Megatron's wrappers (Float16Module
        # casts inputs on the first and outputs on the last virtual stage only)
        self.vp_stage = getattr(policy, "vp_stage", None)
        # read by finalize_model_grads (embedding-group all-reduce of the policy's tied weights)
        self.share_embeddings_and_output_weights = policy.share_embeddings_and_output_weights
        self._input = None

    @property
    def num_models(self) -> int:
        return 1 + len(self.frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        for model in self.frozen:
            model.eval()  # frozen models never leave eval mode
        return self

    def shared_embedding_or_output_weight(self):
        return self.policy.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor):
        """Called by Megatron's schedule with the packed activation received from upstream."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self._input = input_tensor

    def forward(self, tokens, positions, attention_mask=None, **kwargs):
        """First/middle stages: packed hidden states ``[s, (1+F)*b, h]``. Last stage: ``{role:
        logits [b, s, V/TP]}``, the policy's first (requires grad), then each frozen model's.
        ``attention_mask`` and every keyword (``packed_seq_params``, ``loss_mask``, ...) reach
        every model unchanged: all models see the same micro-batch."""
        if not self.pre_process:
            parts = self._input.chunk(self.num_models, dim=1)
            self.policy.set_input_tensor(parts[0])
            for model, part in zip(self.frozen, parts[1:]):
                model.set_input_tensor(part.detach())
        policy_out = self.policy(tokens, positions, attention_mask, **kwargs)
        with torch.no_grad():
            frozen_out = [model(tokens, positions, attention_mask, **kwargs) for model in self.frozen]
        if self.post_process:
            return dict(zip(self.roles, [policy_out] + frozen_out))
        return torch.cat([policy_out] + frozen_out, dim=1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoints hold the policy only (frozen models are loaded from their own paths)."""
        return self.policy.sharded_state_dict(prefix, sharded_offsets, metadata)

    def state_dict(self, *args, **kwargs):
        return self.policy.state_dict(*args, **kwargs)
