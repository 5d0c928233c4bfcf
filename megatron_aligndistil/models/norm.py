"""RMSNorm matching Hugging Face Qwen numerics, usable with Megatron's sequence parallelism."""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in float32 then cast back (as HF Qwen).

    Signature matches Megatron's norm modules so it drops into a layer spec. Under sequence
    parallelism the weight is marked ``sequence_parallel`` so Megatron all-reduces its gradient
    over the TP group (each rank saw only its sequence shard).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_init_device(config))
        )
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(in_dtype)


def _init_device(config):
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
