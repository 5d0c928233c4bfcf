"""Tiny random Hugging Face Qwen models (no download) for conversion tests, and the real Qwen3
tokenizer with conversations that exercise its chat template."""

import os

import torch

# beside the checkout (../shared), or where QWEN3_TOKENIZER_DIR points; the workplace keeps it in /work/shared
QWEN3 = next((d for d in (os.environ.get("QWEN3_TOKENIZER_DIR", ""),
                          os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                       "qwen3-tokenizer"),
                          "/work/shared/data/qwen3-tokenizer") if d and os.path.isdir(d)), "")
CODE = "def add(x, y):\n    if x is None:\n        return y\n    return x + y\n"
CONVERSATIONS = {
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a red fruit."},
               {"role": "assistant", "content": "A cherry."}],
    "multi_turn": [{"role": "user", "content": "Say owl."}, {"role": "assistant", "content": "owl"},
                   {"role": "user", "content": "Twice now."}, {"role": "assistant", "content": "owl owl"}],
    "unicode": [{"role": "user", "content": "Übersetze: 你好, мир 🌍"}, {"role": "assistant", "content": "Hallo, Welt 🌍"}],
    "code": [{"role": "user", "content": "Fix the indentation:\n" + CODE.replace("    ", "\t")},
             {"role": "assistant", "content": "```python\n" + CODE + "```"}],
}


def qwen3_tokenizer():
    """The real Qwen3 tokenizer (about 7 s to load); the calling test skips where it is absent."""
    import pytest

    if not QWEN3:
        pytest.skip("the real Qwen3 tokenizer is not beside the checkout (../shared/data/qwen3-tokenizer); "
                    "set QWEN3_TOKENIZER_DIR")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN3)


def tiny_hf_model(model_type="qwen2", tied=False, vocab_size=1001, dtype=torch.float32, seed=0,
                  hidden_size=64, num_layers=4, head_dim=None, intermediate_size=96):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    if model_type == "qwen2":
        config = Qwen2Config(**common)
        model = Qwen2ForCausalLM(config)
    elif model_type == "qwen3_moe":  # 4 experts top-2, q/k norm; layer 2 dense among sparse ones
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(**common, head_dim=head_dim or 24, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32, norm_topk_prob=True,
                                mlp_only_layers=[2] if num_layers > 2 else [])
        model = Qwen3MoeForCausalLM(config)
    elif model_type == "qwen2_moe":  # 4 experts top-2 and the sigmoid-gated shared expert
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        config = Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, norm_topk_prob=False)
        model = Qwen2MoeForCausalLM(config)
    else:
        config = Qwen3Config(**common, head_dim=head_dim or 24)  # head_dim != hidden/heads
        model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # HF zero-inits biases and sets norms to 1: randomise so tests can fail
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def saved_state_dict(model) -> dict:
    """``model``'s tensors as ``save_pretrained`` writes them (per-expert names for MoE models, as
    the released checkpoints hold them; transformers 5 keeps the experts fused in memory)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, max_shard_size="10GB")
        files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        return {k: v for f in files for k, v in load_file(os.path.join(d, f)).items()}


def tiny_tokenizer(vocab_size=300):
    """A byte-level BPE tokenizer with Qwen's chat special tokens (see data/synthetic.py)."""
    from megatron_aligndistil.data.synthetic import corpus, preference_records, train_tokenizer

    return train_tokenizer(corpus(preference_records(64)), vocab_size=vocab_size)


def save_tiny_hf(path, model_type="qwen2", tied=False, dtype=torch.float32, max_shard_size="200KB", **kw):
    """A tiny HF model + tokenizer saved like a hub checkpoint (sharded safetensors + index). The
    tokenizer is filled up with placeholder tokens to the model's vocab_size, so that random ids
    over the whole vocab are tokens (ids past a checkpoint's tokenizer carry no probability)."""
    model = tiny_hf_model(model_type, tied=tied, dtype=dtype, **kw)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tok = tiny_tokenizer()
    tok.add_tokens([f"<extra_{i}>" for i in range(model.config.vocab_size - len(tok))])
    assert len(tok) == model.config.vocab_size
    tok.save_pretrained(path)
    return model


# ---- the real-configuration family: every public config in examples/configs/, shrunk
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")
REAL_CONFIGS = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
QWEN2_HEAD_DIM = 32  # vLLM's CPU attention has no smaller head size


def real_config(name, num_layers=2, init_std=None):
    """The public ``config.json`` of ``name`` (examples/configs/) shrunk to a test size, keeping
    every architectural flag: model type (q/k/v biases for Qwen2, q/k norm for Qwen3), tied or
    untied embeddings, the vocabulary rows (151,936 / 152,064), the GQA ratio, rope theta, norm
    eps, special ids. Shrunk: ``num_layers`` layers; 2 KV heads (TP2 splits whole groups) and
    heads = 2 x the GQA ratio; Qwen3 keeps head_dim 128 with hidden 64 (hidden != heads x
    head_dim); Qwen2 (head_dim = hidden / heads) gets head_dim 32; intermediate = 3 x hidden."""
    import json

    with open(os.path.join(CONFIG_DIR, name + ".json")) as f:
        cfg = json.load(f)
    ratio = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    heads = 2 * ratio
    hidden = 64 if "head_dim" in cfg else heads * QWEN2_HEAD_DIM
    cfg.update(num_hidden_layers=num_layers, num_key_value_heads=2, num_attention_heads=heads, hidden_size=hidden,
               intermediate_size=3 * hidden, dtype="float32")
    cfg.pop("torch_dtype", None)
    cfg.pop("max_window_layers", None)
    if init_std is not None:
        cfg["initializer_range"] = init_std
    return cfg


def real_config_model(name, seed=0, dtype=torch.float32, num_layers=2, init_std=None):
    """A random HF model of :func:`real_config` (biases and norms randomised, so a dropped or
    swapped one shows in the logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = real_config(name, num_layers, init_std)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()
