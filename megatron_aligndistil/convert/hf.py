"""HF Qwen directory <-> megatron-aligndistil checkpoint directory, streaming.

The Megatron side is a *layout-independent* directory of full (TP1) tensors under Megatron-Core
names, in sharded safetensors, next to ``qwen_arch.json`` (what the model builder needs), the
original ``hf_config.json`` and the tokenizer files. Each rank loads only its TP/PP slices
(``core.sharding.load_from_store``), so one converted checkpoint loads at any layout.

Why not Megatron-Core's ``torch_dist`` format for converted weights: writing it needs the
sharded state dict of a built model, i.e. the whole model in memory (or a cluster) at conversion
time; this format is written one tensor at a time, so a 72B checkpoint converts on a 64 GiB host.
Training checkpoints with optimizer state are a separate concern (the trainer's ``--save``).
"""

from __future__ import annotations

import json
import os

from tqdm import tqdm

from ..core.errors import writing
from ..core.weights import ARCH_FILE, HF_CONFIG_COPY, SIDE_FILES
from ..models.qwen import QwenArch, read_arch
from ..core.store import DEFAULT_MAX_SHARD_BYTES, CheckpointError, ShardedWriter, TensorStore
from .mapping import (
    describe_unmapped,
    hf_tensor_names,
    hf_tensor_shapes,
    hf_to_megatron,
    megatron_tensor_count,
    megatron_tensor_names,
    megatron_to_hf,
    unmapped_tensors,
)

FORMAT_FILE = "megatron_aligndistil.json"
FORMAT = {"format": "megatron-full-safetensors", "version": 1}


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc


def convert_hf_to_megatron(hf_path: str, save: str, tp: int = 1, pp: int = 1,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                           progress: bool = True) -> str:
    """Convert an HF Qwen2/Qwen2.5/Qwen3 directory; returns the written directory.

    ``tp``/``pp`` are checked against the model (TP must divide heads and KV groups, PP the
    layers) and recorded; the checkpoint itself loads at any valid layout.
    """
    from ..hub import model_dir

    hf_path = model_dir(hf_path, "--hf-path")  # a Hub name: its snapshot (cached or downloaded)
    hf_config = _read_json(os.path.join(hf_path, "config.json"))
    arch = QwenArch.from_hf_config(hf_config)
    arch.check_layout(tp, pp)
    with TensorStore(hf_path) as store:
        missing = [n for n in hf_tensor_names(arch) if n not in store]
        if missing:
            raise CheckpointError(f"{hf_path}: {len(missing)} tensors missing, e.g. {missing[:3]}")
        unmapped = unmapped_tensors(store.keys(), hf_tensor_names(arch), arch)
        if unmapped:
            raise CheckpointError(describe_unmapped(hf_path, unmapped, arch))
        _check_tied_copy(store, arch, hf_path)
        # shapes from the safetensors headers, all checked before anything is written
        wrong = [(n, tuple(store.shape(n)), want) for n, want in hf_tensor_shapes(arch).items()
                 if tuple(store.shape(n)) != want]
        if wrong:
            name, got, want = wrong[0]
            raise CheckpointError(f"{hf_path}: tensor {name!r} has shape {list(got)}, config.json implies "
                                  f"{list(want)}" + (f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""))
        with writing("--save", save, cleanup=[os.path.abspath(save) + ".tmp"]):
            writer = ShardedWriter(save, max_shard_bytes, overwrite)
            for name, tensor in tqdm(hf_to_megatron(arch, store.get), total=megatron_tensor_count(arch),
                                     disable=not progress,
                                     desc="hf -> megatron", unit="tensor"):
                writer.add(name, tensor)
            writer.write_json(ARCH_FILE, json.loads(arch.to_json()))
            writer.write_json(HF_CONFIG_COPY, hf_config)
            writer.write_json(FORMAT_FILE, dict(FORMAT, converted_for={"tensor_model_parallel_size": tp,
                                                                        "pipeline_model_parallel_size": pp}))
            for name in SIDE_FILES:
                if os.path.exists(os.path.join(hf_path, name)):
                    writer.copy_file(os.path.join(hf_path, name))
            return writer.commit()


def convert_megatron_to_hf(load: str, save: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                           overwrite: bool = False, progress: bool = True) -> str:
    """Export a megatron-aligndistil checkpoint directory to an HF directory that
    ``AutoModelForCausalLM.from_pretrained`` loads; returns the written directory."""
    arch = read_arch(load)
    with TensorStore(load) as store:
        expected = megatron_tensor_names(arch)
        missing = [n for n in expected if n not in store]
        if missing:
            raise CheckpointError(f"{load}: {len(missing)} tensors missing for its {ARCH_FILE}, e.g. {missing[:3]}")
        unmapped = unmapped_tensors(store.keys(), expected, arch)
        if unmapped:
            raise CheckpointError(describe_unmapped(load, unmapped, arch, config_file=ARCH_FILE))
        with writing("--save", save, cleanup=[os.path.abspath(save) + ".tmp"]):
            writer = ShardedWriter(save, max_shard_bytes, overwrite)
            for name, tensor in tqdm(megatron_to_hf(arch, store.get), total=len(hf_tensor_names(arch)),
                                     disable=not progress, desc="megatron -> hf", unit="tensor"):
                writer.add(name, tensor)
            config_path = os.path.join(load, HF_CONFIG_COPY)
            config = _read_json(config_path) if os.path.exists(config_path) else hf_config_from_arch(arch)
            writer.write_json("config.json", config)
            for name in SIDE_FILES:
                if os.path.exists(os.path.join(load, name)):
                    writer.copy_file(os.path.join(load, name))
            if not os.path.exists(os.path.join(load, "generation_config.json")):
                writer.write_json("generation_config.json", {
                    k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None
                } | {"_from_model_config": True})
            return writer.commit()


def _check_tied_copy(store, arch: QwenArch, path: str) -> None:
    """A tied checkpoint may carry ``lm_head.weight`` (some exporters save the tied copy); it is
    dropped only when it equals the embedding, which is what the model uses."""
    if not (arch.tie_word_embeddings and "lm_head.weight" in store):
        return
    import torch

    if not torch.equal(store.get("lm_head.weight"), store.get("model.embed_tokens.weight")):
        raise CheckpointError(f"{path}: config.json ties the embeddings (tie_word_embeddings true) but lm_head.weight "
                              "differs from model.embed_tokens.weight; converting would drop the trained output "
                              "layer. Set tie_word_embeddings false if the output layer is its own")


def hf_config_from_arch(arch: QwenArch) -> dict:
    """A config.json for ``arch`` when the original HF config was not kept."""
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if arch.model_type == "qwen2" else "Qwen3ForCausalLM"],
        "model_type": arch.model_type, "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size, "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads, "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim, "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings, "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.norm_eps, "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": "silu", "torch_dtype": arch.torch_dtype,
    }
    if arch.model_type == "qwen3":
        cfg["attention_bias"] = arch.qkv_bias
    return cfg
