"""Per-GPU memory of an AlignDistil / DPO / SFT run, predicted from the model and the layout.

All sizes in bytes, for the worst pipeline stage. Terms (see docs/scaling.md):

* policy weights (bf16 or fp32), fp32 main gradients (Megatron DDP, ``grad_reduce_in_fp32``),
  Adam state (fp32 master copy when bf16 + two moments; divided by DP with the distributed
  optimizer), frozen models' weights (teachers / reference; bf16 with ``--bf16``; with
  ``--offload-frozen-models`` only the two largest streamed blocks, the rest in host memory);
* activations kept for backward, per layer and in-flight micro-batch (1F1B keeps up to PP of them
  on the first stage): norms' inputs, the QKV projections, attention scores and probabilities
  (``a*s^2*b``, absent with flash attention), the SwiGLU intermediates; TP divides the
  tensor-parallel part, sequence parallelism the rest; full recompute keeps only layer inputs;
* the last stage's logits: policy + frozen models ``s*b*V/TP`` each, the loss' saved gradient
  (one more), float32 chunk temporaries.

Mixture-of-experts layers (Qwen3-MoE, Qwen2-MoE) count their parts by how they are sharded: the
router (``E x h``) and Qwen2-MoE's shared expert with the layer's dense part (TP), the routed
experts over EP and expert-TP (``E/EP`` experts of ``3 h f_moe / ETP`` each). With the distributed
optimizer the experts' optimizer state is divided by the expert-data-parallel size
``TP x DP / (ETP x EP)``, the rest by DP. A MoE layer keeps, per micro-batch, the router's fp32
input, logits and scores and, for its local experts, the ``s*b*k`` routed token copies a balanced
router sends there (their input and SwiGLU intermediates: ``h + 6 f_moe / ETP`` each, measured with
autograd's saved-tensor hooks); Qwen3's q/k norms keep their inputs and outputs. The allgather
dispatcher's two transient buffers of the expert-parallel group's tokens (``s*b*EP x h``: gathered
input and combined output) exist for one layer at a time (``moe_dispatch``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .loss.vocab_parallel import GPU_CHUNK_ELEMENTS
from .models.qwen import QwenArch
from .core.schedule import interleaving_group, pipeline_rows

GIB = 2**30


@dataclass
class Layout:
    """A launch as the planner sees it (the flags of the same meaning in brackets)."""

    tp: int = 1  # [--tensor-model-parallel-size]
    pp: int = 1  # [--pipeline-model-parallel-size]
    ep: int = 1  # expert-parallel ranks (MoE) [--expert-model-parallel-size]
    etp: int | None = None  # expert tensor parallelism, None: TP [--expert-tensor-parallel-size]
    vpp: int = 1  # model chunks per pipeline rank [--num-virtual-stages-per-pipeline-rank]
    dp: int = 1  # data-parallel replicas: world size / (tp * pp)
    micro_batch: int = 1  # records per micro-batch [--micro-batch-size]
    global_batch: int = 128  # records per optimizer step [--global-batch-size]
    seq_length: int = 2048  # positions per row [--seq-length]
    bf16: bool = True  # [--bf16]
    distributed_optimizer: bool = True  # [--use-distributed-optimizer]
    sequence_parallel: bool = False
    recompute: str | None = None  # None | "full"
    frozen_models: int = 2  # AlignDistil 2, DPO 1, SFT 0
    sequences_per_record: int = 1  # DPO 2
    flash_attention: bool = True  # TE/flash on GPU; the CPU local spec materialises scores
    chunk_elements: int = GPU_CHUNK_ELEMENTS
    offload_frozen: bool = False  # --offload-frozen-models: frozen weights streamed from host memory
    # TE/apex fused Adam (GPU clusters): no temporaries. False: torch's single-tensor AdamW (CPU),
    # whose step allocates two temporaries of each parameter's size in turn (sqrt, then division)
    fused_optimizer: bool = True


def attention_params(arch: QwenArch) -> int:
    """A layer's attention and its two norms (q/k norm included)."""
    h, d, a, g = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups
    qkv = h * (a * d + 2 * g * d) + (a * d + 2 * g * d if arch.qkv_bias else 0)
    return qkv + a * d * h + 2 * h + (2 * d if arch.qk_layernorm else 0)


def layer_params(arch: QwenArch) -> int:
    """A dense layer's parameters."""
    return attention_params(arch) + 3 * arch.hidden_size * arch.ffn_hidden_size


def _etp(lay: Layout) -> int:
    return lay.etp or lay.tp


def layer_params_per_gpu(arch: QwenArch, lay: Layout, layer: int) -> tuple[float, float]:
    """(dense, expert) parameters of layer ``layer`` (global index) on one GPU: TP shards the
    dense part (the router and the shared expert's gate are replicated), EP x expert-TP the
    routed experts."""
    h = arch.hidden_size
    if layer not in arch.moe_layers:
        return layer_params(arch) / lay.tp, 0.0
    dense = attention_params(arch) / lay.tp + arch.num_experts * h
    if arch.shared_expert_ffn_hidden_size:
        dense += 3 * h * arch.shared_expert_ffn_hidden_size / lay.tp + h
    experts = arch.num_experts / lay.ep * 3 * h * arch.moe_ffn_hidden_size / _etp(lay)
    return dense, experts


def stage_layers(arch: QwenArch, lay: Layout, stage: int) -> list[int]:
    """Global indices of the layers pipeline rank ``stage`` holds: chunk v of rank p holds
    chunk ``v PP + p`` of the model's ``PP V`` equal chunks (Megatron's interleaved order)."""
    per_chunk = arch.num_layers // (lay.pp * lay.vpp)
    return [(v * lay.pp + stage) * per_chunk + i for v in range(lay.vpp) for i in range(per_chunk)]


def stage_param_split(arch: QwenArch, lay: Layout, stage: int | None = None) -> tuple[int, int]:
    """(dense, expert) parameters on one GPU of pipeline stage ``stage`` (None: the stage with the
    most parameters). The first stage holds the embedding, the last the final norm and the
    output layer (a copy of the embedding when tied and PP > 1)."""
    if stage is None:
        return max((stage_param_split(arch, lay, p) for p in range(lay.pp)), key=sum)
    parts = [layer_params_per_gpu(arch, lay, i) for i in stage_layers(arch, lay, stage)]
    dense, experts = sum(p[0] for p in parts), sum(p[1] for p in parts)
    emb = arch.padded_vocab_size * arch.hidden_size / lay.tp
    if stage == 0:
        dense += emb
    if stage == lay.pp - 1:
        dense += arch.hidden_size + (0 if (arch.tie_word_embeddings and lay.pp == 1) else emb)
    return int(dense), int(experts)


def stage_params(arch: QwenArch, lay: Layout, stage: int | None = None) -> int:
    """Parameters on one GPU of pipeline stage ``stage`` (None: the biggest stage)."""
    return sum(stage_param_split(arch, lay, stage))


def largest_block_params(arch: QwenArch, lay: Layout) -> int:
    """Parameters of the biggest block streamed by ``--offload-frozen-models`` (a layer, or the
    embedding / output layer), on one GPU."""
    layer = max(sum(layer_params_per_gpu(arch, lay, i)) for i in range(arch.num_layers))
    return int(max(layer, arch.padded_vocab_size * arch.hidden_size / lay.tp))


def largest_param(arch: QwenArch, lay: Layout, stage: int | None = None) -> int:
    """Elements of the biggest single parameter on one GPU of ``stage`` (None: any stage): the
    embedding / output layer shard on the first and last stage, else a layer's biggest matrix."""
    h, d, a, g, f = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups, arch.ffn_hidden_size
    layer = max(h * (a * d + 2 * g * d), 2 * h * f, a * d * h, h * f) / lay.tp
    if arch.is_moe:
        layer = max(layer, 2 * h * arch.moe_ffn_hidden_size / _etp(lay), arch.num_experts * h,
                    2 * h * arch.shared_expert_ffn_hidden_size / lay.tp)
    holds_vocab = stage is None or stage == 0 or stage == lay.pp - 1
    return int(max(layer, arch.padded_vocab_size * h / lay.tp if holds_vocab else 0))


def activation_bytes_per_layer(arch: QwenArch, lay: Layout, layer: int | None = None) -> float:
    """Activations one layer keeps for backward, for one micro-batch (policy only). ``layer``:
    its global index (a MoE layer keeps its own, see the module's docstring); None: a dense one."""
    e = 2 if lay.bf16 else 4
    s, b = lay.seq_length, lay.micro_batch * lay.sequences_per_record
    h, d, a, g, f, t = (arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups,
                        arch.ffn_hidden_size, lay.tp)
    rep = 1 / t if lay.sequence_parallel else 1.0  # replicated-over-TP parts
    if lay.recompute == "full":
        return e * s * b * h * rep
    norms = 2 * e * s * b * h * rep
    attn = e * s * b * h * rep + e * s * b * (2 * a * d + 2 * g * d) / t
    if arch.qk_layernorm:  # Qwen3's q/k norms keep their inputs and outputs
        attn += 2 * e * s * b * (a + g) * d / t
    scores = 0 if lay.flash_attention else 2 * e * a * s * s * b / t
    if layer is None or layer not in arch.moe_layers:
        return norms + attn + scores + e * s * b * h * rep + 4 * e * s * b * f / t
    k, fm = arch.num_experts_per_tok, arch.moe_ffn_hidden_size
    # the router's fp32 input, logits and scores of this rank's tokens
    router = 4 * s * b * (h + 2 * arch.num_experts) * rep
    # per routed token copy: the expert's input (h) and its SwiGLU intermediates (6 x its f_moe
    # shard), counted with autograd's saved-tensor hooks on Megatron's SequentialMLP
    experts = e * s * b * k * (h + 6 * fm / _etp(lay))
    shared = 4 * e * s * b * arch.shared_expert_ffn_hidden_size / t
    return norms + attn + scores + e * s * b * h * rep + router + experts + shared


def stage_activation_bytes(arch: QwenArch, lay: Layout, stage: int) -> float:
    """Activations of one micro-batch through every layer of pipeline rank ``stage``, averaged
    over its model chunks (a chunk of L / (PP V) layers)."""
    layers = stage_layers(arch, lay, stage)
    return sum(activation_bytes_per_layer(arch, lay, i) for i in layers) / lay.vpp


def chunks_in_flight(lay: Layout, micro_batches: int, stage: int = 0) -> int:
    """(micro-batch, model chunk) pairs whose activations pipeline rank ``stage`` keeps at once:
    1F1B's ``PP - stage``; the interleaved schedule's warm-up ``2 (PP - stage - 1) + (V - 1) g``
    plus one (Megatron's ``get_pp_rank_microbatches``; g: :func:`core.schedule.interleaving_group`),
    each a chunk of L / (PP V) layers."""
    if lay.vpp == 1:
        return min(lay.pp - stage, micro_batches)
    group = interleaving_group(micro_batches, lay.pp)
    return min(2 * (lay.pp - stage - 1) + (lay.vpp - 1) * group + 1, micro_batches * lay.vpp)


def pipeline_bubble(lay: Layout, micro_batches: int) -> float:
    """Idle time of a step relative to its compute, (PP - 1) / (V m) (Narayanan et al. 2021):
    virtual stages divide the bubble by V."""
    return (lay.pp - 1) / (lay.vpp * micro_batches)


def plan_memory(arch: QwenArch, lay: Layout, stage: int | None = None) -> dict:
    """Bytes per GPU by term, and the total: the larger of the backward peak (every term but
    ``optimizer_step_temporaries``) and the optimizer-step peak (weights, gradients, optimizer
    state, resident frozen weights and ``optimizer_step_temporaries``).

    ``stage``: a GPU of that pipeline stage (its own weights, the micro-batches 1F1B keeps in
    flight there, ``PP - stage``, and the logits on the last stage only); None: a bound for every
    stage, the biggest stage's weights with the first stage's activations and the last stage's
    logits."""
    pb = 2 if lay.bf16 else 4
    w = stage_params(arch, lay, stage)
    micro_batches = max(1, lay.global_batch // (lay.micro_batch * lay.dp))
    in_flight = chunks_in_flight(lay, micro_batches, stage or 0)
    s, b = lay.seq_length, lay.micro_batch * lay.sequences_per_record
    act = in_flight * stage_activation_bytes(arch, lay, stage or 0)
    if lay.recompute == "full":  # one layer's full activations exist while it is recomputed
        act += max(activation_bytes_per_layer(arch, Layout(**{**asdict(lay), "recompute": None}), i)
                   for i in stage_layers(arch, lay, stage or 0))
    rep = 1 / lay.tp if lay.sequence_parallel else 1.0
    e = 2 if lay.bf16 else 4
    p2p = (in_flight if lay.pp > 1 else 0) * e * s * pipeline_rows(b, 1 + lay.frozen_models) * arch.hidden_size * rep
    v_local = arch.padded_vocab_size / lay.tp
    logits = (1 + lay.frozen_models + 1) * pb * s * b * v_local + 4 * 4 * min(lay.chunk_elements, s * b * v_local)
    if stage is not None and stage != lay.pp - 1:
        logits = 0
    frozen = lay.frozen_models * pb * w
    if lay.offload_frozen and lay.frozen_models:  # current block + the one being prefetched
        frozen = 2 * pb * largest_block_params(arch, lay)
    w_expert = stage_param_split(arch, lay, stage)[1]
    expert_dp = lay.tp * lay.dp / (_etp(lay) * lay.ep)  # replicas of an expert shard
    per_param = 8 + (4 if lay.bf16 else 0)  # Adam's two moments (+ the fp32 master copy with bf16)
    optimizer_state = per_param * ((w - w_expert) / lay.dp + w_expert / expert_dp) if lay.distributed_optimizer \
        else per_param * w
    terms = {
        "policy_weights": pb * w,
        "main_grads": 4 * w,
        "optimizer_state": optimizer_state,
        "frozen_weights": frozen,
        "activations": act + p2p,
        "logits_and_loss": logits,
        # the allgather dispatcher's gathered input and combined output, one MoE layer at a time
        "moe_dispatch": 2 * e * s * b * lay.ep * arch.hidden_size if arch.is_moe else 0,
    }
    # the optimizer step is a second peak: no activations or logits then, but the optimizer's own
    # temporaries (and streamed frozen blocks are gone)
    step_temporaries = 0 if lay.fused_optimizer else 2 * 4 * largest_param(arch, lay, stage)
    step_peak = (terms["policy_weights"] + terms["main_grads"] + terms["optimizer_state"] + step_temporaries
                 + (0 if lay.offload_frozen else frozen))
    backward_peak = sum(terms.values())
    terms["optimizer_step_temporaries"] = step_temporaries
    terms["total"] = max(backward_peak, step_peak)  # the larger of the two phases
    return terms


def host_bytes_per_gpu(arch: QwenArch, lay: Layout, stage: int | None = None) -> int:
    """Pinned host memory per GPU (of ``stage``, None: the biggest) for offloaded frozen weights
    (0 without offloading)."""
    return lay.frozen_models * (2 if lay.bf16 else 4) * stage_params(arch, lay, stage) if lay.offload_frozen else 0


def suggest(arch: QwenArch, gpu_memory_gb: float, gpus_per_node: int = 8, max_nodes: int = 32,
            reserve_gb: float = 6.0, **layout) -> list[dict]:
    """Layouts that fit, fewest GPUs first, then least PP and TP. ``reserve_gb``: CUDA context,
    NCCL buffers and allocator fragmentation, left free. MoE models: each layout with the largest
    expert parallelism (expert-TP 1) that divides the experts and TP x DP, and TP > 1 only with
    sequence parallelism (what training takes)."""
    fits = []
    budget = (gpu_memory_gb - reserve_gb) * GIB
    tps = [t for t in (1, 2, 4, 8) if arch.num_query_groups % t == 0 and arch.num_attention_heads % t == 0
           and t <= gpus_per_node]
    pps = [p for p in range(1, arch.num_layers + 1) if arch.num_layers % p == 0 and p <= 16]
    for nodes in range(1, max_nodes + 1):
        world = nodes * gpus_per_node
        for tp in tps:
            for pp in pps:
                if world % (tp * pp):
                    continue
                dp = world // (tp * pp)
                experts = {}
                if arch.is_moe:
                    if tp > 1 and not layout.get("sequence_parallel"):
                        continue
                    ep = max(e for e in range(1, tp * dp + 1) if arch.num_experts % e == 0 and (tp * dp) % e == 0)
                    experts = {"ep": ep, "etp": 1}
                lay = Layout(**{**layout, "tp": tp, "pp": pp, "dp": dp, **experts})
                if lay.global_batch % (lay.micro_batch * dp):
                    continue
                total = plan_memory(arch, lay)["total"]
                if total <= budget:
                    fits.append({"nodes": nodes, "gpus": world, "tp": tp, "pp": pp, "dp": dp, **experts,
                                 "per_gpu_gb": total / GIB})
        if fits:
            break
    fits.sort(key=lambda x: (x["gpus"], x["pp"], x["tp"], x["per_gpu_gb"]))
    return fits
