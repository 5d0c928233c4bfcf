"""``--dry-run``: check the flags against the model and the world size, print the parallel plan,
allocate nothing. Launch scripts are checked with it in CI.

The architecture comes from ``--load`` (``qwen_arch.json`` of a converted checkpoint or run
directory, or an HF ``config.json`` / directory), or from ``--model-config`` when the weights are
not on this machine. The world size is torchrun's ``WORLD_SIZE`` or ``--world-size``.
"""

from __future__ import annotations

import json
import os

from ..core.weights import ARCH_FILE
from ..models.qwen import QwenArch
from ..core.errors import UserError
from ..core.schedule import pipeline_rows


def resolve_arch(path: str) -> QwenArch:
    candidates = [path, os.path.join(path, ARCH_FILE), os.path.join(path, "release", ARCH_FILE),
                  os.path.join(path, "config.json")]
    for c in candidates:
        if os.path.isfile(c):
            with open(c) as f:
                obj = json.load(f)
            return QwenArch(**obj) if "model_type" in obj and "num_layers" in obj else QwenArch.from_hf_config(obj)
    raise FileNotFoundError(f"{path}: no {ARCH_FILE} or config.json to read the architecture from "
                            "(give --model-config HF_CONFIG.json for a dry run)")


def make_plan(args, world_size: int) -> dict:
    """Validate the layout and batch flags; return the plan (raises ValueError naming the flag)."""
    from ..config import TrainingConfig

    arch = resolve_arch(args.model_config or args.load)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    vpp = TrainingConfig.from_args(args).virtual_stages(arch.num_layers)
    ep = args.expert_model_parallel_size
    arch.check_layout(tp, pp, vpp, ep, sequence_parallel=args.sequence_parallel)
    from ..core.parallel import Layout

    # the trainer's own checks
    dp = Layout(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=args.expert_tensor_parallel_size).data_parallel_size(world_size)
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")
    from .methods import get_method

    method = get_method(args.method).from_args(args)  # the method says which models run beside the policy
    frozen, per_record = len(method.frozen_models()), method.sequences_per_record
    micro_batches = args.global_batch_size // (args.micro_batch_size * dp)
    if vpp > 1:
        from ..core.schedule import interleaving_group

        interleaving_group(micro_batches, pp)  # the schedule's own refusal, before any launch
    memory = planned_memory(args, arch, tp, pp, dp, frozen, per_record, vpp)
    return {
        "method": args.method, "model_type": arch.model_type, "layers": arch.num_layers,
        "hidden": arch.hidden_size, "heads": arch.num_attention_heads, "kv_groups": arch.num_query_groups,
        "vocab": arch.vocab_size, "padded_vocab": arch.padded_vocab_size,
        "world_size": world_size, "tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": dp,
        "layers_per_stage": arch.num_layers // pp, "virtual_stages_per_pipeline_rank": vpp,
        "layers_per_model_chunk": arch.num_layers // (pp * vpp), "vocab_per_tp_rank": arch.padded_vocab_size // tp,
        "frozen_models_in_lockstep": frozen,
        "micro_batches_per_step": micro_batches,
        "sequences_per_p2p_tensor": pipeline_rows(args.micro_batch_size * per_record, 1 + frozen),
        "sequence_parallel": args.sequence_parallel, "recompute": args.recompute_granularity,
        "distributed_optimizer": args.use_distributed_optimizer, "bf16": args.bf16,
        "frozen_models_offloaded": args.offload_frozen_models,
        "seq_length": args.seq_length,
        **(_expert_plan(arch, args, tp, dp) if arch.is_moe else {}),
        **memory,
    }


def _expert_plan(arch: QwenArch, args, tp: int, dp: int) -> dict:
    """The expert layout of a MoE model's plan."""
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size or tp
    return {"experts": arch.num_experts, "experts_per_token": arch.num_experts_per_tok,
            "moe_layers": len(arch.moe_layers), "expert_parallel": ep, "expert_tensor_parallel": etp,
            "experts_per_expert_parallel_rank": arch.num_experts // ep, "expert_data_parallel": tp * dp // (etp * ep),
            "moe_token_dispatcher": args.moe_token_dispatcher_type}


def planned_memory(args, arch: QwenArch, tp: int, pp: int, dp: int, frozen: int, per_record: int,
                   vpp: int = 1) -> dict:
    """The memory planner's per-GPU prediction for these flags (GB; docs/scaling.md) and the
    pipeline bubble (idle time / compute time of a step)."""
    from .. import memory

    lay = memory.Layout(
        tp=tp, pp=pp, vpp=vpp, dp=dp, ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size, micro_batch=args.micro_batch_size, global_batch=args.global_batch_size,
        seq_length=args.seq_length, bf16=args.bf16, distributed_optimizer=args.use_distributed_optimizer,
        sequence_parallel=args.sequence_parallel,
        recompute="full" if args.recompute_granularity == "full" else None,
        frozen_models=frozen, sequences_per_record=per_record, offload_frozen=args.offload_frozen_models,
    )
    micro_batches = max(1, args.global_batch_size // (args.micro_batch_size * dp))
    total = memory.plan_memory(arch, lay)["total"]
    out = {"pipeline_bubble": round(memory.pipeline_bubble(lay, micro_batches), 4),
           "planned_gb_per_gpu": round(total / memory.GIB, 1), "planned_bytes_per_gpu": int(total)}
    if args.offload_frozen_models:
        out["planned_host_pinned_gb_per_gpu"] = round(memory.host_bytes_per_gpu(arch, lay) / memory.GIB, 1)
    return out


def print_plan(plan: dict) -> None:
    width = max(len(k) for k in plan)
    print("parallel plan (dry run, nothing allocated):")
    for k, v in plan.items():
        print(f"  {k:<{width}}  {v}")
