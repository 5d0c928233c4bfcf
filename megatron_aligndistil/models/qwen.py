"""Qwen2 / Qwen2.5 / Qwen3 dense and Qwen2-MoE / Qwen3-MoE models as Megatron-Core GPT models:
config, layer spec, builder.

The architecture is described by :class:`QwenArch`, read from a Hugging Face ``config.json`` and
stored next to every Megatron checkpoint this package writes, so a checkpoint rebuilds its model
without the HF directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch

from ..core.errors import UserError
from ..core.weights import ARCH_FILE

# The Megatron vocab is padded to a multiple of this so that one checkpoint has the same padded
# shape at every TP size a Qwen dense model admits (TP divides the KV heads, at most 8):
# lcm(128 * tp for tp in 1, 2, 4, 8) = 1024. Padding rows are zero and masked in every softmax.
VOCAB_PAD_MULTIPLE = 1024

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")


class ArchitectureError(UserError):
    """The HF config describes a model this package does not support (named in the message)."""


@dataclass(frozen=True)
class QwenArch:
    """What Megatron needs to know of a Qwen causal LM. Sizes in elements, not bytes. The MoE fields
    are 0 / empty for dense models (and in the arch files those wrote)."""

    model_type: str  # "qwen2" (Qwen2 and Qwen2.5), "qwen3", "qwen2_moe" or "qwen3_moe"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # KV heads (GQA)
    head_dim: int  # kv_channels
    vocab_size: int  # real vocab: HF config's vocab_size, not the tokenizer's length
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool  # Qwen2/2.5: True
    qk_layernorm: bool  # Qwen3: True
    tie_word_embeddings: bool
    torch_dtype: str = "float32"  # dtype of the HF weights (bf16 kept bf16 on export)
    num_experts: int = 0  # routed experts of each MoE layer (0: a dense model)
    num_experts_per_tok: int = 0  # top-k experts per token
    moe_ffn_hidden_size: int = 0  # a routed expert's intermediate size (HF moe_intermediate_size)
    norm_topk_prob: bool = False  # renormalise the top-k routing probabilities to sum 1
    moe_layers: tuple = ()  # the layers with a sparse MLP; the others are dense (ffn_hidden_size)
    shared_expert_ffn_hidden_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert (0: none)

    def __post_init__(self):
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))  # a list when read from JSON

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def moe_layer_pattern(self) -> list[int]:
        """Megatron's ``moe_layer_freq`` list: 1 for a sparse layer, 0 for a dense one."""
        return [int(i in self.moe_layers) for i in range(self.num_layers)]

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE)

    @classmethod
    def from_hf_config(cls, cfg) -> "QwenArch":
        """From a ``transformers`` config object or a ``config.json`` dict; clear error if unsupported."""
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (
            lambda k, d=None: getattr(cfg, k, d)
        )
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ArchitectureError(
                f"model_type {model_type!r} is not supported (supported: Qwen2/Qwen2.5 'qwen2', "
                f"Qwen3 'qwen3' dense models; MoE variants are not supported)"
            )
        if model_type not in MOE_MODEL_TYPES and (get("num_experts") or get("num_local_experts")):
            raise ArchitectureError(f"{model_type}: a dense model type with experts (num_experts="
                                    f"{get('num_experts') or get('num_local_experts')}); MoE models are "
                                    f"{' or '.join(MOE_MODEL_TYPES)}")
        layer_types = get("layer_types")
        if get("use_sliding_window", False) or (
            layer_types and any(t != "full_attention" for t in layer_types)
        ):
            raise ArchitectureError(
                f"{model_type}: sliding-window attention layers are not supported "
                f"(use_sliding_window={get('use_sliding_window')}, layer_types={layer_types})"
            )
        # RoPE variants: only the plain one maps exactly (YaRN, linear, dynamic, ... are refused),
        # whether written as rope_scaling (transformers 4) or rope_parameters (transformers 5)
        for key in ("rope_scaling", "rope_parameters"):
            rope = get(key)
            if rope and (rope.get("rope_type", rope.get("type")) not in (None, "default")):
                raise ArchitectureError(f"{model_type}: {key} {rope} is not supported (only plain RoPE: "
                                        "rope_type 'default')")
        required = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
                    "max_position_embeddings", "rms_norm_eps")
        missing = [k for k in required if get(k) is None]
        if missing:
            raise ArchitectureError(f"{model_type} config: missing field(s) {missing}")
        ints = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "num_key_value_heads", "head_dim")
        bad = [f"{k}={get(k)!r}" for k in ints if get(k) is not None
               and (not isinstance(get(k), int) or isinstance(get(k), bool) or get(k) <= 0)]
        if bad:
            raise ArchitectureError(f"{model_type} config: fields must be positive integers: {', '.join(bad)}")
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        head_dim = get("head_dim") or hidden // heads
        rope_theta = get("rope_theta")
        if rope_theta is None:
            params = get("rope_parameters") or {}
            rope_theta = params.get("rope_theta", 10000.0)
        dtype = get("torch_dtype") or get("dtype") or "float32"
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).replace("torch.", "")
        moe = _moe_fields(model_type, get) if model_type in MOE_MODEL_TYPES else {}
        if model_type == "qwen2_moe":
            qkv_bias = bool(get("qkv_bias", True))
        else:
            qkv_bias = model_type == "qwen2" or bool(get("attention_bias", False))
        return cls(
            model_type=model_type,
            num_layers=get("num_hidden_layers"),
            hidden_size=hidden,
            ffn_hidden_size=get("intermediate_size"),
            num_attention_heads=heads,
            num_query_groups=get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=get("vocab_size"),
            max_position_embeddings=get("max_position_embeddings"),
            rope_theta=float(rope_theta),
            norm_eps=get("rms_norm_eps"),
            qkv_bias=qkv_bias,
            qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            torch_dtype=str(dtype),
            **moe,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str) -> "QwenArch":
        with open(path) as f:
            return cls(**json.load(f))

    def check_layout(self, tp: int, pp: int, vpp: int = 1, ep: int = 1, sequence_parallel: bool | None = None) -> None:
        """Raise :class:`UserError` naming the flag when TP / PP / virtual stages / EP cannot split this model.
        ``sequence_parallel``: the training run's flag (None: inference, which does not need it)."""
        if self.is_moe and sequence_parallel is False and isinstance(tp, int) and tp > 1:
            # Megatron's MoE layer raises in training otherwise; its router's weights are
            # replicated over TP and reduced there only with sequence parallelism
            raise UserError(f"--tensor-model-parallel-size {tp} with a mixture-of-experts model needs "
                            "--sequence-parallel to train (as in Megatron-LM)")
        if ep > 1 and not self.is_moe:
            raise UserError(f"--expert-model-parallel-size {ep} needs a mixture-of-experts model; this "
                            f"{self.model_type} model is dense")
        if self.is_moe and self.num_experts % ep:
            raise UserError(f"--expert-model-parallel-size {ep} does not divide the model's {self.num_experts} "
                            "experts per MoE layer")
        for flag, size in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
            if not isinstance(size, int) or size < 1:
                raise UserError(f"{flag} {size} must be a positive integer")
        if self.num_attention_heads % tp:
            raise UserError(
                f"--tensor-model-parallel-size {tp} does not divide num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_query_groups % tp:
            raise UserError(
                f"--tensor-model-parallel-size {tp} does not divide the {self.num_query_groups} "
                f"KV groups (num_key_value_heads); use a TP that divides it"
            )
        if self.num_layers % pp:
            raise UserError(
                f"--pipeline-model-parallel-size {pp} does not divide num_hidden_layers {self.num_layers}"
            )
        if self.num_layers % (pp * vpp):
            raise UserError(
                f"--pipeline-model-parallel-size {pp} x {vpp} virtual stages per pipeline rank = {pp * vpp} "
                f"model chunks do not divide num_hidden_layers {self.num_layers} evenly"
            )
        if self.padded_vocab_size % tp:
            raise UserError(f"--tensor-model-parallel-size {tp} does not divide the padded vocab")




def _moe_fields(model_type: str, get) -> dict:
    """QwenArch's MoE fields from a Qwen2-MoE / Qwen3-MoE HF config; :class:`ArchitectureError`
    naming the field for what the models cannot mean or this package does not map."""
    def positive(key):
        value = get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ArchitectureError(f"{model_type} config: {key} must be a positive integer, got {value!r}")
        return value

    # the released configs say num_experts; transformers 5 writes Qwen3-MoE's as num_local_experts
    experts = positive("num_experts" if get("num_experts") is not None else "num_local_experts")
    top_k = positive("num_experts_per_tok")
    if top_k > experts:
        raise ArchitectureError(f"{model_type} config: num_experts_per_tok {top_k} exceeds num_experts {experts}")
    layers, step = positive("num_hidden_layers"), get("decoder_sparse_step", 1)
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ArchitectureError(f"{model_type} config: decoder_sparse_step must be a positive integer, got {step!r}")
    dense = get("mlp_only_layers") or []
    bad = [i for i in dense if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < layers]
    if bad:
        raise ArchitectureError(f"{model_type} config: mlp_only_layers {bad} are not layers of the "
                                f"{layers}-layer model")
    # the rule of the HF models: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th layer
    moe_layers = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
    if not moe_layers:
        raise ArchitectureError(f"{model_type} config: no layer is sparse (decoder_sparse_step {step}, "
                                f"mlp_only_layers {dense}): convert it as a dense model")
    fields = dict(num_experts=experts, num_experts_per_tok=top_k, moe_ffn_hidden_size=positive("moe_intermediate_size"),
                  norm_topk_prob=bool(get("norm_topk_prob", False)), moe_layers=moe_layers)
    if model_type == "qwen2_moe":
        fields["shared_expert_ffn_hidden_size"] = positive("shared_expert_intermediate_size")
    return fields


def transformer_config(arch: QwenArch, *, params_dtype=torch.float32, bf16: bool = False,
                       sequence_parallel: bool = False, recompute_granularity=None,
                       recompute_method=None, recompute_num_layers=None, tp: int | None = None,
                       pp: int | None = None, vpp: int | None = None, moe_options: dict | None = None):
    """A Megatron ``TransformerConfig`` for ``arch`` under the current (or given) TP/PP sizes and
    virtual pipeline stages per pipeline rank (``vpp``; None: Megatron's current setting).
    ``moe_options``: MoE fields over :func:`_moe_config`'s (dispatcher, balancing loss, router
    dtype: ``TrainingConfig.moe_options``); ignored for dense models."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    if tp is None:
        tp = parallel_state.get_tensor_model_parallel_world_size()
    if pp is None:
        pp = parallel_state.get_pipeline_model_parallel_world_size()
    if vpp is None:
        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    arch.check_layout(tp, pp, vpp, ep=_expert_parallel_size())
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        layernorm_epsilon=arch.norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        # TE's fused RoPE on GPUs: the unfused THD path (packed sequences) reads cu_seqlens on the
        # host in every layer (a device sync per layer); the fused kernel does not
        apply_rope_fusion=fused_rope_available(),
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        # the interleaved schedule's p2p as Megatron-LM runs it (--overlap-p2p-communication, its
        # default with virtual stages): unbatched sends and receives, overlapped with compute. The
        # batched form pairs a forward send with a gradient receive when the previous and the next
        # pipeline rank are one rank (PP 2): wrong activations, no error
        overlap_p2p_comm=vpp > 1,
        batch_p2p_comm=vpp == 1,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        init_method_std=0.02,
        **(_moe_config(arch) | (moe_options or {}) if arch.is_moe else {}),
    )


def fused_rope_available() -> bool:
    """TransformerEngine's fused rotary embedding (BSHD and THD) can run: CUDA and TE present."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None and rope_utils.fused_apply_rotary_pos_emb_thd is not None


def _moe_config(arch: QwenArch) -> dict:
    """TransformerConfig fields of a Qwen MoE: the HF models' routing, exactly, with no token
    dropping (no capacity factor) and no auxiliary loss (the training flags add it, issue 30)."""
    shared = arch.shared_expert_ffn_hidden_size
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.num_experts_per_tok,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_layer_freq=arch.moe_layer_pattern(),
        # HF: softmax over all experts, then the top k; norm_topk_prob renormalises them, which is
        # a softmax over the top k logits (Megatron's order without pre-softmax)
        moe_router_pre_softmax=not arch.norm_topk_prob,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_shared_expert_intermediate_size=shared or None,
        moe_shared_expert_gate=shared > 0,
        expert_model_parallel_size=_expert_parallel_size(),
    )


def _expert_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() \
        else 1


def use_transformer_engine(impl: str = "auto") -> bool:
    """Whether ``impl`` (``--transformer-impl``) means TransformerEngine layers: ``auto`` when
    CUDA and TE are present, ``local`` never, ``transformer_engine`` always (an error without TE).

    The TE spec fuses the norms into the next linear layer (names translated by
    ``sharding.canonical_name``), runs fused attention and supports FP8. Not exercised on this
    project's CPU machines: the local spec below is what the tests cover.
    """
    if impl == "local":
        return False
    from megatron.core.models.gpt import gpt_layer_specs

    have_te = bool(getattr(gpt_layer_specs, "HAVE_TE", False)) and torch.cuda.is_available()
    if impl == "transformer_engine" and not have_te:
        from ..core.errors import UserError

        raise UserError("--transformer-impl transformer_engine needs CUDA and transformer-engine installed")
    return have_te


def layer_spec(arch: QwenArch, config, transformer_impl: str = "auto", vp_stage: int | None = None):
    """Block spec of one model chunk (``vp_stage``: its virtual stage; None without virtual stages):
    TransformerEngine layers on GPUs with TE, else Megatron's local layers with an HF-exact RMSNorm
    (the CPU path and the tested one). A MoE model's sparse layers (``arch.moe_layers``, by global
    layer number) get Megatron's MoE layer (router, experts, shared expert), the others a dense MLP."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from .norm import RMSNorm

    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    if use_transformer_engine(transformer_impl):
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        def spec_of(num_experts=None):
            return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                                              qk_layernorm=arch.qk_layernorm)
        final_norm = TENorm
    else:
        def spec_of(num_experts=None):
            spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                            qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
            sub = spec.submodules
            sub.input_layernorm = RMSNorm
            sub.pre_mlp_layernorm = RMSNorm
            if arch.qk_layernorm:
                sub.self_attention.submodules.q_layernorm = RMSNorm
                sub.self_attention.submodules.k_layernorm = RMSNorm
            return spec
        final_norm = RMSNorm
    dense = spec_of()
    if not arch.is_moe:
        return TransformerBlockSubmodules(layer_specs=[dense] * n, layer_norm=final_norm)
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    sparse = spec_of(arch.num_experts)
    first = get_transformer_layer_offset(config, vp_stage=vp_stage)  # this chunk's first global layer
    return TransformerBlockSubmodules(layer_specs=[sparse if first + i in arch.moe_layers else dense for i in range(n)],
                                      layer_norm=final_norm)


def build_model(arch: QwenArch, config, *, pre_process=None, post_process=None, transformer_impl: str = "auto",
                vp_stage: int | None = None):
    """This rank's part of the GPT model for ``arch`` (Megatron's current TP/PP rank): its pipeline
    stage, or with virtual stages its model chunk ``vp_stage`` (:func:`build_chunks` builds them
    all); ``transformer_impl``: see :func:`use_transformer_engine`."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, config, transformer_impl, vp_stage=vp_stage),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        vp_stage=vp_stage,
    )
    return model.to(_device())


def load_model(path: str, arch: QwenArch, *, vocab_rows: bool = False):
    """The model at ``path`` (a converted directory, a run's ``release/`` or an ``iter_``
    checkpoint) for inference: this rank's pipeline stage of ``arch`` at Megatron's current layout
    (every caller has read and checked the architecture already), its weights loaded, in eval mode.
    ``vocab_rows``: a frozen model of another vocab_size compared over a shared tokenizer (see
    ``core.weights.load_weights``). Collective for an ``iter_`` checkpoint."""
    from ..core import weights

    model = build_model(arch, transformer_config(arch))
    weights.load_weights(model, path, vocab_rows=vocab_rows)
    return model.eval()


def build_chunks(arch: QwenArch, config, transformer_impl: str = "auto") -> list:
    """This rank's model chunks, in pipeline order: one per virtual pipeline stage
    (``config.virtual_pipeline_model_parallel_size``), or the one pipeline stage without them.
    With PP ranks p and V chunks, chunk v of rank r holds layers ``[(v*PP + r) * L/(PP*V), ...)``:
    the activation visits every rank V times (Megatron's interleaved schedule)."""
    vpp = config.virtual_pipeline_model_parallel_size
    if not vpp:
        return [build_model(arch, config, transformer_impl=transformer_impl)]
    return [build_model(arch, config, transformer_impl=transformer_impl, vp_stage=v) for v in range(vpp)]


def _device():
    from .. import platform

    return platform.device()


def read_arch(checkpoint_dir: str) -> QwenArch:
    path = os.path.join(checkpoint_dir, ARCH_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {checkpoint_dir} is not a checkpoint written by megatron-aligndistil "
            f"(convert HF weights with tools/convert_hf_to_megatron.py)"
        )
    return QwenArch.from_json_file(path)
