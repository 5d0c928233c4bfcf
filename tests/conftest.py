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


# The longest files on 2 cores (--durations, pytest-xdist workers take one file at a time), run
# first so that no worker is left alone with a long file at the end of the suite; the other files
# follow in their usual order. run_tests.sh passes --no-loadscope-reorder (xdist's own order is
# by test count, not by time).
LONGEST_FIRST = ("test_train_aligndistil.py", "test_rollout_vllm.py", "test_quickstart.py", "test_real_configs.py",
                 "test_gpu_paths.py",
                 "test_virtual_pipeline.py", "test_moe.py", "test_convert_tools.py", "test_real_vocab.py",
                 "test_examples.py", "test_memory_planner.py", "test_edges.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: each file's order kept
