"""Issue 7 (part): sampling under TP/PP. Greedy equals transformers' generate token for token at
TP2 PP2; seeded sampling is identical at TP1 and TP2 (and across batch compositions)."""

import dataclasses

import torch

from hf_fixtures import tiny_hf_model
from megatron_aligndistil.convert.mapping import hf_to_megatron
from megatron_aligndistil.models.qwen import QwenArch
from megatron_aligndistil.core.parallel import Layout
from megatron_aligndistil.testing import run_distributed


def _generate(arch_fields, full, prompts, params, ids=None, kv_cache=True, limits=None):
    """Sample with this rank's model: its chunks under virtual pipeline stages, else one model."""
    from megatron_aligndistil.generation import generate
    from megatron_aligndistil.models import qwen
    from megatron_aligndistil.core import sharding

    arch = QwenArch(**arch_fields)
    chunks = qwen.build_chunks(arch, qwen.transformer_config(arch))
    for chunk in chunks:
        sharding.load_full_state_dict(chunk, full)
    return generate(chunks if len(chunks) > 1 else chunks[0], prompts, params, arch.vocab_size, sequence_ids=ids,
                    kv_cache=kv_cache, max_new_tokens=limits)


def _generate_many(calls):
    """Several ``_generate`` calls in one launch (each builds its model)."""
    return [_generate(*call) for call in calls]


def _setup():
    hf = tiny_hf_model("qwen2", vocab_size=1001, seed=3)
    arch = QwenArch.from_hf_config(hf.config)
    full = dict(hf_to_megatron(arch, hf.state_dict().__getitem__))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 1001, (n,), generator=g).tolist() for n in (3, 7, 5)]
    return hf, arch, full, prompts


def test_greedy_matches_transformers_at_tp2_pp2():
    from megatron_aligndistil.config import SamplingParams

    hf, arch, full, prompts = _setup()
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    limits = [8, 2, 5]  # per sequence (on-policy: --seq-length + 1 - prompt length)
    out = run_distributed(_generate, 4, args=(dataclasses.asdict(arch), full, prompts, params, None, True, limits),
                          layout=Layout(tp=2, pp=2))  # with the KV cache
    for p, res, limit in zip(prompts, out[0], limits):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert res["response_ids"] == ref[0, len(p):len(p) + limit].tolist()
    assert all(r == out[0] for r in out)  # every rank returns the same responses


def test_greedy_over_virtual_pipeline_stages_matches_transformers():
    """PP2 x 2 chunks per rank (and TP2 with it): each decoding step goes around the ring of
    chunks (one micro-batch: fewer than the interleaved schedule takes), with the KV cache shared
    by the chunks and without it; token for token transformers' greedy output."""
    from megatron_aligndistil.config import SamplingParams

    hf, arch, full, prompts = _setup()
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    limits = [6, 2, 5]
    args = dataclasses.asdict(arch), full, prompts, params, None
    calls = [args + (True, limits), args + (False, limits)]
    for layout, nproc in ((Layout(pp=2, vpp=2), 2), (Layout(tp=2, pp=2, vpp=2), 4)):
        out = run_distributed(_generate_many, nproc, args=(calls,), layout=layout)
        cached, recomputed = out[0]
        for p, got, again, limit in zip(prompts, cached, recomputed, limits):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            assert got["response_ids"] == again["response_ids"] == ref[0, len(p):len(p) + limit].tolist(), layout
        assert all(r == out[0] for r in out), layout  # every rank returns the same responses


def test_seeded_sampling_is_layout_and_batch_independent():
    from megatron_aligndistil.config import SamplingParams

    hf, arch, full, prompts = _setup()
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=50, seed=11)
    fields = dataclasses.asdict(arch)
    tp1, alone, other_seed = run_distributed(_generate_many, 1, args=([
        (fields, full, prompts, params),
        (fields, full, prompts[1:2], params, [1]),
        (fields, full, prompts, dataclasses.replace(params, seed=12))],), layout=Layout(1, 1))[0]
    tp2, uncached = run_distributed(_generate_many, 2, args=([
        (fields, full, prompts, params), (fields, full, prompts, params, None, False)],), layout=Layout(tp=2))[0]
    assert tp1 == tp2
    assert alone[0] == tp1[1]  # sequence 1's sample does not depend on its batch mates
    assert uncached == tp1  # the KV cache changes nothing but the cost
    assert other_seed != tp1


def _generate_tool(argv):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import generate as generate_tool

    return generate_tool.main(argv)


def test_generate_tool_writes_alpacaeval_outputs_equal_to_transformers(tmp_path):
    import json

    from transformers import AutoTokenizer

    from hf_fixtures import save_tiny_hf
    from megatron_aligndistil.convert.hf import convert_hf_to_megatron

    hf = save_tiny_hf(tmp_path / "hf", "qwen3", tied=True)
    ckpt = convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mc"), progress=False)
    items = [{"instruction": "how do I sort a list?"}, {"instruction": "The quick brown fox"},
             {"instruction": "answer honestly"}]
    (tmp_path / "p.json").write_text(json.dumps(items))
    out = tmp_path / "out.json"
    argv = ["--load", ckpt, "--prompts", str(tmp_path / "p.json"), "--out", str(out), "--greedy",
            "--max-new-tokens", "6", "--stop-token-ids", "2", "--generator", "tiny"]
    assert run_distributed(_generate_tool, 2, args=(argv,)) == [0, 0]  # DP2 splits the prompts
    got = json.load(open(out))
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert [g["instruction"] for g in got] == [i["instruction"] for i in items]
    for item, g in zip(items, got):
        ids = tok.apply_chat_template([{"role": "user", "content": item["instruction"]}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        ref = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0,
                          attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
        ref = [t for t in ref if t != 2]
        assert g == {"instruction": item["instruction"], "output": tok.decode(ref, skip_special_tokens=True),
                     "generator": "tiny"}


def test_generate_tool_names_bad_prompt_items(tmp_path):
    """Out-of-vocabulary prompt ids and non-string instructions: the file and item are named
    before any model is built (they reached the model / jinja before)."""
    import json
    import os
    import sys

    import pytest

    from megatron_aligndistil.core.errors import UserError

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import generate as generate_tool

    path = tmp_path / "p.jsonl"
    for line, message in (('{"prompt_ids": [1, 5000]}', "p.jsonl:2: 'prompt_ids' has token id 5000 outside"),
                          ('{"instruction": 7}', "p.jsonl:2: 'instruction' must be a non-empty string"),
                          ('{"instruction": ["a"]}', "p.jsonl:2: 'instruction' must be a non-empty string"),
                          ('{"prompt_ids": []}', "p.jsonl:2: 'prompt_ids' must be a non-empty list"),
                          ('{"text": "x"}', "p.jsonl:2: has neither"), ('{"instruction": "x"', "p.jsonl:2: malformed")):
        path.write_text(json.dumps({"instruction": "fine"}) + "\n" + line + "\n")
        with pytest.raises(UserError, match=message):
            generate_tool.read_items(str(path), vocab_size=1001)
    path.write_text(json.dumps({"prompt_ids": [1, 1000]}) + "\n")
    assert generate_tool.read_items(str(path), vocab_size=1001) == [{"prompt_ids": [1, 1000]}]


def _splitmix64(key: int) -> float:
    """Output number ``key`` of SplitMix64 seeded with 0, in Python's unbounded ints (an
    implementation independent of the sampler's int64 tensor arithmetic: the state is advanced
    key + 1 times by the golden gamma), as a float64 uniform in [0, 1)."""
    m = (1 << 64) - 1
    z = ((key + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    return (z >> 11) / 2.0 ** 53


def _reference_choices(probs, seeds):
    """Inverse-CDF draws in numpy float64 from independently computed probabilities, with the
    uniform of each row's key (the sampler's contract: P(token) = its probability)."""
    import numpy as np

    out = []
    for p, s in zip(probs, seeds):
        cdf = np.cumsum(np.asarray(p, dtype=np.float64))
        out.append(int(np.searchsorted(cdf, _splitmix64(s) * cdf[-1], side="right")))
    return out


def _select_choices(logits, params, seeds):
    from megatron_aligndistil.generation import _select

    return _select(logits, params, torch.tensor(seeds)).tolist()


def test_uniforms_are_splitmix64_and_uniform():
    """The sampler's uniforms equal SplitMix64 computed with unbounded ints, for keys across the
    int64 range (wrapping multiplication, logical shifts), and 200,000 consecutive keys fill
    [0, 1) evenly (Kolmogorov-Smirnov distance < 0.005; a wrong shift or constant is far off),
    with no correlation between a key and the next draw of its sequence or its neighbour's."""
    from megatron_aligndistil.generation import draw_keys, uniforms

    keys = [0, 1, 2, 7 * 1_000_003, 2**62 + 12345, 2**63 - 1, -1, -(2**63)]
    got = uniforms(torch.tensor(keys)).tolist()
    assert got == [_splitmix64(k % (1 << 64)) for k in keys]
    # the published first output of SplitMix64 seeded with 0 (e.g. the xoshiro seeding reference)
    assert uniforms(torch.tensor([0])).item() == 0xE220A8397B1DCDAF / 2.0 ** 64 - (0xE220A8397B1DCDAF % 2**11) / 2.0 ** 64
    u = uniforms(torch.arange(10**6, 10**6 + 200_000)).sort().values
    ks = (u - torch.arange(1, 200_001, dtype=torch.float64) / 200_000).abs().max()
    assert float(ks) < 0.005
    # a sequence's next draw (key + 1) and its neighbour's (key + 7,919) are uncorrelated
    base = uniforms(torch.arange(10**6, 10**6 + 200_000))
    for step in (1, 7_919):
        corr = torch.corrcoef(torch.stack([base, uniforms(torch.arange(10**6, 10**6 + 200_000) + step)]))[0, 1]
        assert abs(float(corr)) < 0.01, step
    assert draw_keys(7, [3, 0], torch.tensor([2, 0])).tolist() == [7 * 1_000_003 + 3 * 7_919 + 2, 7 * 1_000_003]


def test_a_zero_probability_token_is_never_drawn():
    """At a uniform that rounds u * total up to the total, the draw is the last token that has
    probability, not a padded one past it."""
    from megatron_aligndistil.generation import inverse_cdf

    probs = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]])
    for u in (0.0, 0.5, 1.0 - 2.0 ** -53, 1.0):
        got = inverse_cdf(probs, torch.full((3,), u, dtype=torch.float64)).tolist()
        assert all(probs[i, t] > 0 for i, t in enumerate(got)), (u, got)
    assert inverse_cdf(probs, torch.tensor([0.1, 0.3, 0.4], dtype=torch.float64)).tolist() == [0, 1, 0]
    assert inverse_cdf(probs, torch.tensor([0.3, 0.9, 0.6], dtype=torch.float64)).tolist() == [1, 1, 2]


def test_temperature_samples_from_the_tempered_distribution():
    """softmax(z / T) at T 0.5 and 2: the sampler's choices equal multinomial draws from the
    reference probabilities with the same uniforms, row for row (issue 19)."""
    from megatron_aligndistil.config import SamplingParams

    g = torch.Generator().manual_seed(0)
    rows = 400
    logits = torch.randn(rows, 12, generator=g) * 2
    seeds = list(range(1000, 1000 + rows))
    for t in (0.5, 2.0):
        ref = torch.softmax(logits.double() / t, -1).float()
        got = _select_choices(logits, SamplingParams(temperature=t), seeds)
        assert got == _reference_choices(ref, seeds), t
        # and it is not the untempered (or twice-tempered) distribution
        assert got != _reference_choices(torch.softmax(logits.double() / t / t, -1).float(), seeds)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    """probabilities [0.5, 0.3, 0.15, 0.05]: top-p 0.7 keeps {0.5, 0.3}, 0.81 keeps three; and
    [0.5, 0.25, 0.125, 0.125] (exact in float32) at p 0.75, where the mass hits p exactly, keeps
    {0.5, 0.25} as HF and vLLM do. Renormalised, then drawn like the reference, row for row."""
    from megatron_aligndistil.config import SamplingParams

    seeds = list(range(300))
    for base, p, kept in (([0.15, 0.5, 0.05, 0.3], 0.7, [1, 3]), ([0.15, 0.5, 0.05, 0.3], 0.81, [0, 1, 3]),
                          ([0.125, 0.5, 0.125, 0.25], 0.75, [1, 3])):  # shuffled order: the sampler must sort
        base = torch.tensor(base)
        logits = base.log().expand(300, -1).contiguous()
        ref = torch.zeros(4)
        ref[kept] = base[kept] / base[kept].sum()
        got = _select_choices(logits, SamplingParams(temperature=1.0, top_p=p), seeds)
        assert got == _reference_choices(ref.expand(300, -1), seeds), p
        assert set(got) == set(kept), p
