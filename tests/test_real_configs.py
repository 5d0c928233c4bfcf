"""Issue 26 item 3: the real-configuration fixture family (every public config in
examples/configs/, shrunk but with every architectural flag: tied/untied, q/k/v biases, q/k norm,
head_dim 128 with hidden != heads x head_dim, GQA ratio, rope theta, 151,936 / 152,064 vocab rows)
through conversion, training and export. The vLLM sync runs across it in test_rollout_vllm.py."""

import json
import os

import pytest
import torch

from hf_fixtures import REAL_CONFIGS, qwen3_tokenizer, real_config, real_config_model, saved_state_dict
from megatron_aligndistil.convert.mapping import hf_tensor_names, hf_to_megatron, megatron_to_hf
from megatron_aligndistil.models.qwen import QwenArch
from megatron_aligndistil.testing import run_distributed
from megatron_aligndistil.train.metrics import read_metrics
from train_fixtures import aligndistil_argv, dense_first_iteration, run_train

TOKENIZER_IDS = 151_669


def test_the_family_keeps_every_architectural_flag():
    for name in REAL_CONFIGS:
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs",
                               name + ".json")) as f:
            public = json.load(f)
        arch = QwenArch.from_hf_config(real_config(name))
        full = QwenArch.from_hf_config(public)
        assert (arch.model_type, arch.tie_word_embeddings, arch.qkv_bias, arch.qk_layernorm, arch.vocab_size,
                arch.rope_theta, arch.norm_eps) == (full.model_type, full.tie_word_embeddings, full.qkv_bias,
                                                    full.qk_layernorm, full.vocab_size, full.rope_theta,
                                                    full.norm_eps), name
        assert (arch.num_experts, arch.num_experts_per_tok, arch.moe_ffn_hidden_size, arch.norm_topk_prob) == \
            (full.num_experts, full.num_experts_per_tok, full.moe_ffn_hidden_size, full.norm_topk_prob), name
        ratio = arch.num_attention_heads // arch.num_query_groups
        assert ratio == full.num_attention_heads // full.num_query_groups and arch.num_query_groups == 2, name
        if full.model_type == "qwen3":
            assert arch.head_dim == full.head_dim == 128
            assert arch.hidden_size != arch.num_attention_heads * arch.head_dim
    assert {"qwen2.5-0.5b", "qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b", "qwen3-235b-a22b"} <= set(REAL_CONFIGS)
    tied = {n: QwenArch.from_hf_config(real_config(n)).tie_word_embeddings for n in REAL_CONFIGS}
    assert any(tied.values()) and not all(tied.values())


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_conversion_round_trip_is_bit_exact_across_the_family(name):
    hf = real_config_model(name, dtype=torch.bfloat16)
    arch = QwenArch.from_hf_config(hf.config)
    sd = saved_state_dict(hf) if arch.is_moe else hf.state_dict()  # MoE: per-expert tensors, as released
    if arch.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # the tied copy: one tensor in the checkpoint
    full = dict(hf_to_megatron(arch, sd.__getitem__))
    assert full["embedding.word_embeddings.weight"].shape[0] == arch.padded_vocab_size
    assert ("output_layer.weight" in full) != arch.tie_word_embeddings
    back = dict(megatron_to_hf(arch, full.__getitem__))
    assert set(back) == set(sd) == set(hf_tensor_names(arch))
    for key, t in sd.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), (name, key)


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


def _family_setup(root, name, tok, num_layers=2):
    """Policy and two teachers of one real configuration (different seeds, ``num_layers`` layers)
    with the real tokenizer, converted; data: real chat renderings (thinking on and off)."""
    from hf_fixtures import CONVERSATIONS
    from megatron_aligndistil.convert.hf import convert_hf_to_megatron
    from megatron_aligndistil.data.preprocess import split_conversation

    out = {}
    for seed, role in enumerate(("policy", "dpo", "rev")):
        hf_dir = os.path.join(root, f"hf_{role}")
        real_config_model(name, seed=seed, num_layers=num_layers).save_pretrained(hf_dir)
        tok.save_pretrained(hf_dir)
        out[f"hf_{role}"] = hf_dir
        out[role] = convert_hf_to_megatron(hf_dir, os.path.join(root, role), progress=False)
    out["data"] = os.path.join(root, "data.jsonl")
    with open(out["data"], "w") as f:
        for i, messages in enumerate(list(CONVERSATIONS.values()) * 2):
            prompt, response = split_conversation(tok, messages, {"enable_thinking": i % 2 == 0})
            f.write(json.dumps({"prompt_ids": prompt[-10:], "response_ids": response[:8]}) + "\n")
    return out


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen3-0.6b"])
def test_iteration_one_packed_at_tp2_pp2_equals_hf_and_exports(name, tok, tmp_path):
    """Tied Qwen2 (biases) and tied Qwen3 (q/k norm, head_dim 128): iteration 1 of packed
    AlignDistil at TP2 PP2 (the embedding on the first stage, its tied copy on the last) equals the
    float64 HF reference over the tokenizer's ids; the exported policy is an HF checkpoint of the
    same architecture, loadable by transformers."""
    from transformers import AutoModelForCausalLM

    from megatron_aligndistil.convert.hf import convert_megatron_to_hf

    setup = _family_setup(str(tmp_path / "models"), name, tok)
    ref = dense_first_iteration(setup, vocab=TOKENIZER_IDS)
    save = str(tmp_path / "run")
    argv = aligndistil_argv(setup, save, "--seq-length", "40", "--pack-sequences", "--tensor-model-parallel-size",
                            "2", "--pipeline-model-parallel-size", "2", iters=1)
    _assert_first_iteration(argv, 4, ref, name, tvd=True)
    exported = convert_megatron_to_hf(os.path.join(save, "release"), str(tmp_path / "hf_out"), progress=False)
    original = json.load(open(os.path.join(setup["hf_policy"], "config.json")))
    assert json.load(open(os.path.join(exported, "config.json"))) == original
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    source = AutoModelForCausalLM.from_pretrained(setup["hf_policy"], dtype=torch.float32)
    assert set(model.state_dict()) == set(source.state_dict())
    changed = [k for k, v in source.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert "model.embed_tokens.weight" in changed  # trained: the step reached the (tied) embedding


def _assert_first_iteration(argv, world, ref, name, tvd=False):
    """Run ``argv`` on ``world`` ranks for one iteration; its logged metrics equal the float64
    reference ``ref`` (1e-4; token count exact)."""
    assert run_distributed(run_train, world, args=(argv,), timeout=600) == [0] * world
    (first,) = read_metrics(os.path.join(argv[argv.index("--save") + 1], "metrics.jsonl"))
    assert first["tokens"] == ref["tokens"]
    fields = (("loss", "loss"), ("grad_norm", "grad_norm"), ("kl", "kl"), ("alpha_mean", "alpha"))
    for field, key in fields + ((("tvd_mean", "tvd"),) if tvd else ()):
        assert first[field] == pytest.approx(ref[key], rel=1e-4), (name, field)


def test_iteration_one_with_virtual_pipeline_stages_on_tied_qwen3(tok, tmp_path):
    """Tied Qwen3 (q/k norm, head_dim 128) with the real tokenizer, 4 layers in 2 chunks per rank at
    PP2 (issue 29): the first chunk holds the embedding, the last chunk its tied copy; iteration 1
    of AlignDistil equals the float64 HF reference over the tokenizer's ids."""
    setup = _family_setup(str(tmp_path / "models"), "qwen3-0.6b", tok, num_layers=4)
    ref = dense_first_iteration(setup, vocab=TOKENIZER_IDS)
    save = str(tmp_path / "run")
    argv = aligndistil_argv(setup, save, "--seq-length", "40", "--pipeline-model-parallel-size", "2",
                            "--num-virtual-stages-per-pipeline-rank", "2", "--no-export", iters=1)
    _assert_first_iteration(argv, 2, ref, "qwen3-0.6b vpp")
