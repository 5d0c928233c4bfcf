"""The one mapping between HF Qwen2/Qwen3 tensor names and Megatron-Core GPT names (full, TP1).

Streaming by construction: both directions take a ``get(name) -> Tensor`` callback and yield
``(name, tensor)`` one output tensor at a time, so peak memory is a few tensors, not the model.

Transforms beyond renaming:
* QKV: HF ``q_proj [nh*d, H]``, ``k_proj``/``v_proj [ng*d, H]`` -> Megatron ``linear_qkv`` grouped
  per KV group: ``[ng, (nh/ng)*d + d + d, H]`` flattened (so TP can split whole groups).
* SwiGLU: ``gate_proj`` and ``up_proj`` -> ``linear_fc1 = [gate; up]`` (dense MLPs, each routed
  expert, the shared expert).
* MoE layers (``arch.moe_layers``): router ``mlp.gate`` -> ``mlp.router``; expert j's
  ``mlp.experts.{j}.*`` -> ``mlp.experts.local_experts.{j}.*`` (j global here: full tensors; the
  expert-parallel shard of a rank is cut on load); Qwen2-MoE's ``mlp.shared_expert.*`` ->
  ``mlp.shared_experts.*`` and its gate ``mlp.shared_expert_gate`` -> ``mlp.shared_experts.gate_weight``.
* Vocab: embedding / lm_head rows padded with zeros from ``vocab_size`` to ``padded_vocab_size``
  (the padding is masked in every softmax of this package), and cut back on export.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..models.qwen import QwenArch

Getter = Callable[[str], torch.Tensor]

# per-layer renames: HF suffix -> Megatron suffix (besides QKV and fc1, which are fused)
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}
_QK_NORM_RENAMES = {
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
}


def _plain_renames(arch: QwenArch) -> dict[str, str]:
    """Per-layer HF suffix -> Megatron suffix for tensors that are only renamed."""
    return {**_LAYER_RENAMES, **(_QK_NORM_RENAMES if arch.qk_layernorm else {})}


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def fuse_qkv(arch: QwenArch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q/k/v (weights ``[out, H]`` or biases ``[out]``) -> Megatron grouped ``linear_qkv``."""
    ng, d = arch.num_query_groups, arch.head_dim
    per = arch.num_attention_heads // ng
    tail = tuple(q.shape[1:])
    fused = torch.cat([q.reshape((ng, per * d) + tail), k.reshape((ng, d) + tail),
                       v.reshape((ng, d) + tail)], dim=1)
    return fused.reshape((ng * (per + 2) * d,) + tail)


def split_qkv(arch: QwenArch, qkv: torch.Tensor):
    """Inverse of :func:`fuse_qkv`: Megatron ``linear_qkv`` -> HF (q, k, v)."""
    ng, d = arch.num_query_groups, arch.head_dim
    per = arch.num_attention_heads // ng
    tail = tuple(qkv.shape[1:])
    grouped = qkv.reshape((ng, (per + 2) * d) + tail)
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return (q.reshape((ng * per * d,) + tail).contiguous(), k.reshape((ng * d,) + tail).contiguous(),
            v.reshape((ng * d,) + tail).contiguous())


def _mlp_pairs(arch: QwenArch, layer: int) -> list[tuple[str, str, tuple[str, ...]]]:
    """The MLP tensors of one layer: ``(Megatron suffix, how, HF suffixes)`` with ``how`` "fc1"
    (gate and up fused) or "copy"."""
    if layer not in arch.moe_layers:
        return [("mlp.linear_fc1.weight", "fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
                ("mlp.linear_fc2.weight", "copy", ("mlp.down_proj.weight",))]
    pairs = [("mlp.router.weight", "copy", ("mlp.gate.weight",))]
    for j in range(arch.num_experts):
        hf, mc = f"mlp.experts.{j}.", f"mlp.experts.local_experts.{j}."
        pairs += [(mc + "linear_fc1.weight", "fc1", (hf + "gate_proj.weight", hf + "up_proj.weight")),
                  (mc + "linear_fc2.weight", "copy", (hf + "down_proj.weight",))]
    if arch.shared_expert_ffn_hidden_size:
        pairs += [("mlp.shared_experts.linear_fc1.weight", "fc1",
                   ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight")),
                  ("mlp.shared_experts.linear_fc2.weight", "copy", ("mlp.shared_expert.down_proj.weight",)),
                  ("mlp.shared_experts.gate_weight", "copy", ("mlp.shared_expert_gate.weight",))]
    return pairs


def _mlp_shapes(arch: QwenArch, layer: int) -> dict[str, tuple[int, ...]]:
    """HF suffix -> shape of one layer's MLP tensors."""
    h = arch.hidden_size
    if layer not in arch.moe_layers:
        f = arch.ffn_hidden_size
        return {"mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
    f, shapes = arch.moe_ffn_hidden_size, {"mlp.gate.weight": (arch.num_experts, h)}
    for j in range(arch.num_experts):
        shapes.update({f"mlp.experts.{j}.gate_proj.weight": (f, h), f"mlp.experts.{j}.up_proj.weight": (f, h),
                       f"mlp.experts.{j}.down_proj.weight": (h, f)})
    s = arch.shared_expert_ffn_hidden_size
    if s:
        shapes.update({"mlp.shared_expert.gate_proj.weight": (s, h), "mlp.shared_expert.up_proj.weight": (s, h),
                       "mlp.shared_expert.down_proj.weight": (h, s), "mlp.shared_expert_gate.weight": (1, h)})
    return shapes


def hf_tensor_names(arch: QwenArch) -> list[str]:
    """Every tensor name an HF checkpoint of ``arch`` holds (lm_head only when untied)."""
    return list(hf_tensor_shapes(arch))


def hf_tensor_shapes(arch: QwenArch) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor an HF checkpoint of ``arch`` holds, from the config alone."""
    h, d, v = arch.hidden_size, arch.head_dim, arch.vocab_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    attention = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
    }
    if arch.qkv_bias:
        attention.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if arch.qk_layernorm:
        attention.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(arch.num_layers):
        for suffix, shape in {**attention, **_mlp_shapes(arch, i)}.items():
            shapes[f"model.layers.{i}.{suffix}"] = shape
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def megatron_tensor_count(arch: QwenArch) -> int:
    """How many tensors :func:`hf_to_megatron` yields (for progress bars)."""
    per_layer = len(_plain_renames(arch)) + 1 + int(arch.qkv_bias)  # renames, qkv w/b
    mlp = sum(len(_mlp_pairs(arch, i)) for i in range(arch.num_layers))
    return 2 + arch.num_layers * per_layer + mlp + int(not arch.tie_word_embeddings)


def megatron_tensor_names(arch: QwenArch) -> list[str]:
    """Every tensor name a converted checkpoint of ``arch`` holds (what :func:`hf_to_megatron`
    yields, computed on meta tensors: nothing is allocated)."""
    shapes = hf_tensor_shapes(arch)
    return [name for name, _ in hf_to_megatron(arch, lambda n: torch.empty(shapes[n], device="meta"))]


# HF tensors that carry no weight of their own: rotary inverse frequencies (recomputed from
# rope_theta) that some older checkpoints saved as buffers
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


def unmapped_tensors(names, expected, arch: QwenArch) -> list[str]:
    """The tensors of ``names`` (a checkpoint's) that ``expected`` (what the mapping reads for
    ``arch``) does not place: a converter that dropped them would write a different model."""
    expected = set(expected)
    return sorted(n for n in names if n not in expected and not n.endswith(IGNORED_HF_SUFFIXES)
                  and not (arch.tie_word_embeddings and n == "lm_head.weight"))


def describe_unmapped(path: str, unmapped: list[str], arch: QwenArch, config_file: str = "config.json") -> str:
    """A message naming the tensors :func:`unmapped_tensors` found, and the config flags (of
    ``config_file``) that would have placed the usual suspects."""
    hints = []
    if any(n.endswith(("_proj.bias", "linear_qkv.bias")) for n in unmapped) and not arch.qkv_bias:
        hints.append("q/k/v biases under a config without them (Qwen3: attention_bias false)")
    if any("q_norm" in n or "k_norm" in n or "q_layernorm" in n or "k_layernorm" in n for n in unmapped) \
            and not arch.qk_layernorm:
        hints.append(f"q/k norms under a {arch.model_type} config (only qwen3 has them)")
    if any(n in ("lm_head.weight", "output_layer.weight") for n in unmapped) and arch.tie_word_embeddings:
        hints.append("an output layer under tie_word_embeddings true")
    if any(n.startswith(("model.layers.", "decoder.layers.")) and int(n.split(".")[2]) >= arch.num_layers
           for n in unmapped):
        hints.append(f"layers past num_hidden_layers {arch.num_layers}")
    shown = ", ".join(unmapped[:6]) + (f" and {len(unmapped) - 6} more" if len(unmapped) > 6 else "")
    return (f"{path}: {len(unmapped)} tensor(s) are not placed by the {arch.model_type} mapping of its config and "
            f"would be dropped: {shown}" + (f" ({'; '.join(hints)})" if hints else "")
            + f". Fix {config_file} to match the weights; nothing was written")


def hf_to_megatron(arch: QwenArch, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the full Megatron tensors, one at a time, from HF tensors fetched with ``get``."""
    rows = arch.padded_vocab_size
    yield "embedding.word_embeddings.weight", _pad_rows(get("model.embed_tokens.weight"), rows)
    for i in range(arch.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        for src, dst in _plain_renames(arch).items():
            yield mc + dst, get(hf + src)
        yield mc + "self_attention.linear_qkv.weight", fuse_qkv(
            arch, *(get(hf + f"self_attn.{x}_proj.weight") for x in "qkv"))
        if arch.qkv_bias:
            yield mc + "self_attention.linear_qkv.bias", fuse_qkv(
                arch, *(get(hf + f"self_attn.{x}_proj.bias") for x in "qkv"))
        for dst, how, srcs in _mlp_pairs(arch, i):
            yield mc + dst, (torch.cat([get(hf + x) for x in srcs], dim=0) if how == "fc1" else get(hf + srcs[0]))
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not arch.tie_word_embeddings:
        yield "output_layer.weight", _pad_rows(get("lm_head.weight"), rows)


def megatron_to_hf(arch: QwenArch, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield HF tensors, one at a time, from full Megatron tensors fetched with ``get``."""
    v = arch.vocab_size
    yield "model.embed_tokens.weight", get("embedding.word_embeddings.weight")[:v].contiguous()
    for i in range(arch.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        for src, dst in _plain_renames(arch).items():
            yield hf + src, get(mc + dst)
        for x, t in zip("qkv", split_qkv(arch, get(mc + "self_attention.linear_qkv.weight"))):
            yield hf + f"self_attn.{x}_proj.weight", t
        if arch.qkv_bias:
            for x, t in zip("qkv", split_qkv(arch, get(mc + "self_attention.linear_qkv.bias"))):
                yield hf + f"self_attn.{x}_proj.bias", t
        for src, how, dsts in _mlp_pairs(arch, i):
            if how == "fc1":
                for dst, half in zip(dsts, get(mc + src).chunk(2, dim=0)):
                    yield hf + dst, half.contiguous()
            else:
                yield hf + dsts[0], get(mc + src)
    yield "model.norm.weight", get("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        yield "lm_head.weight", get("output_layer.weight")[:v].contiguous()
