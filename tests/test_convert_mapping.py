"""Issue 4 (mapping part): HF Qwen2/Qwen3 -> Megatron GPT gives HF's logits at TP1 PP1 and TP2 PP2;
HF -> Megatron -> HF is bit-exact (names, dtypes, shapes, values)."""

import dataclasses

import pytest
import torch

from hf_fixtures import tiny_hf_model
from megatron_aligndistil.convert.mapping import hf_tensor_names, hf_to_megatron, megatron_to_hf
from megatron_aligndistil.models.qwen import ArchitectureError, QwenArch
from megatron_aligndistil.core.parallel import Layout
from megatron_aligndistil.testing import megatron_logits, run_distributed


def megatron_logits_of_all(cases):
    """One launch for several models: ``cases`` is a list of (arch fields, full state, tokens)."""
    return [megatron_logits(*case) for case in cases]


def test_megatron_logits_match_hf():
    """Qwen2 and Qwen3, tied and untied: Megatron's logits equal HF's at TP1 PP1 and TP2 PP2
    (one launch per layout for all four models)."""
    cases, expected = [], []
    for model_type, tied in (("qwen2", False), ("qwen2", True), ("qwen3", False), ("qwen3", True)):
        hf = tiny_hf_model(model_type, tied=tied, vocab_size=1001)  # 1001: not divisible by TP
        arch = QwenArch.from_hf_config(hf.config)
        assert arch.qk_layernorm == (model_type == "qwen3") and arch.qkv_bias == (model_type == "qwen2")
        sd = hf.state_dict()
        tokens = torch.randint(0, 1001, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected.append(hf(tokens).logits)
        cases.append((dataclasses.asdict(arch), dict(hf_to_megatron(arch, sd.__getitem__)), tokens))
    for layout, world in ((Layout(1, 1), 1), (Layout(2, 2), 4)):
        per_rank = run_distributed(megatron_logits_of_all, world, args=(cases,), layout=layout)
        for i, (case, want) in enumerate(zip(cases, expected)):
            got = [r[i] for r in per_rank if r[i] is not None]
            assert got, "no rank returned logits"
            for logits in got:
                assert logits.shape[-1] == QwenArch(**case[0]).padded_vocab_size
                torch.testing.assert_close(logits[..., :1001], want, rtol=0, atol=1e-5, msg=f"case {i}, {layout}")
                assert torch.all(logits[..., 1001:] == 0)  # zero padding rows give logit 0: masked later


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(model_type, dtype):
    hf = tiny_hf_model(model_type, tied=False, dtype=dtype)
    arch = QwenArch.from_hf_config(hf.config)
    sd = hf.state_dict()
    full = dict(hf_to_megatron(arch, sd.__getitem__))
    back = dict(megatron_to_hf(arch, full.__getitem__))
    assert set(back) == set(sd) == set(hf_tensor_names(arch))
    for name, t in sd.items():
        assert back[name].dtype == t.dtype == dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name


def test_unsupported_architectures_are_named():
    with pytest.raises(ArchitectureError, match="llama"):
        QwenArch.from_hf_config({"model_type": "llama"})
    with pytest.raises(ArchitectureError, match="sliding-window"):
        QwenArch.from_hf_config({"model_type": "qwen2", "use_sliding_window": True})
    cfg = tiny_hf_model("qwen2").config.to_dict()
    # transformers-5 layout: YaRN in rope_parameters must be refused, not converted as plain RoPE
    with pytest.raises(ArchitectureError, match="rope_parameters .*yarn"):
        QwenArch.from_hf_config(dict(cfg, rope_scaling=None, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                              "rope_theta": 1e6}))
    assert QwenArch.from_hf_config(dict(cfg, rope_scaling=None, rope_theta=None, rope_parameters={
        "rope_type": "default", "rope_theta": 5e5})).rope_theta == 5e5
    with pytest.raises(ArchitectureError, match="missing field.*num_hidden_layers"):
        QwenArch.from_hf_config({k: v for k, v in cfg.items() if k != "num_hidden_layers"})
    with pytest.raises(ArchitectureError, match="hidden_size=64.0"):
        QwenArch.from_hf_config(dict(cfg, hidden_size=64.0))
    arch = QwenArch.from_hf_config(tiny_hf_model("qwen2").config)
    with pytest.raises(ValueError, match="KV groups"):
        arch.check_layout(tp=4, pp=1)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        arch.check_layout(tp=1, pp=3)
