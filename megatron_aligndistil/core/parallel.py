"""torch.distributed and Megatron parallel state from a layout (TP, PP, virtual stages, CP, EP; DP is
what remains)."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import torch

from .. import platform
from .errors import UserError


@dataclass(frozen=True)
class Layout:
    """A parallel layout, Megatron's axes: ``tp`` tensor, ``pp`` pipeline, ``vpp`` virtual
    pipeline stages (model chunks) per pipeline rank, ``cp`` context, ``ep`` expert and ``etp``
    expert-tensor parallel (None: ``tp``, as Megatron-LM). ``dp`` is derived:
    world_size // (tp * cp * pp); experts are data-parallel over world_size // (etp * ep * pp)."""

    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None

    # the flag that sets each axis, for messages
    FLAGS = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
             "vpp": "--num-virtual-stages-per-pipeline-rank", "cp": "--context-parallel-size",
             "ep": "--expert-model-parallel-size", "etp": "--expert-tensor-parallel-size"}

    def __post_init__(self):
        for axis, flag in self.FLAGS.items():
            size = getattr(self, axis)
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
                raise UserError(f"{flag} {size} must be a positive integer")
        if self.vpp > 1 and self.pp == 1:
            raise UserError(f"{self.FLAGS['vpp']} {self.vpp}: virtual pipeline stages interleave the stages of a "
                            "pipeline; they need --pipeline-model-parallel-size > 1")

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def data_parallel_size(self, world_size: int) -> int:
        """Raises :class:`UserError` naming the flags when ``world_size`` does not fit the layout."""
        mp = self.tp * self.cp * self.pp
        if world_size % mp:
            axes = ("tp", "cp", "pp") if self.cp > 1 else ("tp", "pp")
            sizes = " x ".join(f"{self.FLAGS[a]} {getattr(self, a)}" for a in axes)
            raise UserError(f"world size {world_size} is not divisible by {sizes} = {mp}")
        expert_mp = self.expert_tp * self.ep * self.pp
        if world_size % expert_mp:
            raise UserError(f"world size {world_size} is not divisible by the expert layout: "
                            f"{self.FLAGS['etp']} {self.expert_tp} x {self.FLAGS['ep']} {self.ep} x "
                            f"{self.FLAGS['pp']} {self.pp} = {expert_mp}")
        return world_size // mp


def init_distributed(timeout_s: float = 600.0) -> None:
    """Initialise ``torch.distributed`` from torchrun's environment (RANK, WORLD_SIZE, MASTER_*).

    Without those variables (a plain ``python`` call) it starts a one-process group on a free
    local port, so every entry point runs the same code with or without torchrun.
    """
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    platform.setup_platform()
    torch.distributed.init_process_group(
        backend=platform.backend(),
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel(layout: Layout, seed: int = 1234) -> None:
    """Create Megatron's process groups for ``layout`` and seed every RNG Megatron uses.

    Raises :class:`UserError` (naming the flags) when the world size does not fit the layout.
    """
    from megatron.core import parallel_state, tensor_parallel

    init_distributed()
    layout.data_parallel_size(torch.distributed.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    set_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def set_seed(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is optional for the core
        pass
    torch.manual_seed(seed)


def destroy() -> None:
    """Tear down Megatron groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except ValueError:  # already destroyed (vLLM's engine tears the world group down on its way out)
            pass
