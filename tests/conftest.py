"""Shared fixtures: tiny Qwen architectures (no download) and the multi-process runner."""

import dataclasses
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from megatron_aligndistil.models.qwen import QwenArch  # noqa: E402


def tiny_arch(model_type="qwen2", tied=False, vocab_size=1000, num_layers=4, **overrides):
    """A Qwen-shaped model small enough for 4 CPU ranks: GQA (4 heads, 2 KV groups)."""
    arch = QwenArch(
        model_type=model_type, num_layers=num_layers, hidden_size=64, ffn_hidden_size=96,
        num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=vocab_size,
        max_position_embeddings=256, rope_theta=1e6, norm_eps=1e-6,
        qkv_bias=model_type == "qwen2", qk_layernorm=model_type == "qwen3",
        tie_word_embeddings=tied,
    )
    return dataclasses.replace(arch, **overrides)
