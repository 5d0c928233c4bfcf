"""Issue 4: the conversion tools. HF dir -> Megatron dir -> HF dir is bit-exact and loadable by
transformers; the Megatron dir loads at TP2 PP2 with HF's logits; bad input gets a clear error;
memory does not grow with model size."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_fixtures import save_tiny_hf
from megatron_aligndistil.models.qwen import QwenArch
from megatron_aligndistil.core.parallel import Layout
from megatron_aligndistil.testing import megatron_logits, run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import convert_hf_to_megatron  # noqa: E402
import convert_megatron_to_hf  # noqa: E402


def _safetensors_dir(path):
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("model_type,tied,dtype", [("qwen2", True, torch.bfloat16),
                                                   ("qwen3", False, torch.float32)])
def test_round_trip_through_the_tools_is_bit_exact(tmp_path, model_type, tied, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, mc_dir, out_dir = tmp_path / "hf", tmp_path / "mcore", tmp_path / "export"
    save_tiny_hf(hf_dir, model_type, tied=tied, dtype=dtype)
    assert convert_hf_to_megatron.main(["--hf-path", str(hf_dir), "--save", str(mc_dir),
                                        "--tensor-model-parallel-size", "2",
                                        "--pipeline-model-parallel-size", "2",
                                        "--max-shard-size-gb", str(150e3 / 2**30)]) == 0
    assert (mc_dir / "model.safetensors.index.json").exists()  # sharded output
    assert not (tmp_path / "mcore.tmp").exists()
    assert convert_megatron_to_hf.main(["--load", str(mc_dir), "--save", str(out_dir),
                                        "--max-shard-size-gb", str(100e3 / 2**30)]) == 0

    original, exported = _safetensors_dir(hf_dir), _safetensors_dir(out_dir)
    assert set(exported) == set(original)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype == dtype, name
        assert torch.equal(exported[name], t), name
    assert json.load(open(out_dir / "config.json")) == json.load(open(hf_dir / "config.json"))

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    tok, ref_tok = AutoTokenizer.from_pretrained(out_dir), AutoTokenizer.from_pretrained(hf_dir)
    msg = [{"role": "user", "content": "how do I sort a list?"}]
    assert tok.apply_chat_template(msg, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(msg, add_generation_prompt=True)


def test_converted_checkpoint_loads_at_any_layout_with_hf_logits(tmp_path):
    from megatron_aligndistil.convert.hf import convert_hf_to_megatron

    hf = save_tiny_hf(tmp_path / "hf", "qwen2", tied=False)
    out = convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mc"), tp=1, pp=1,
                                 max_shard_bytes=100_000, progress=False)
    arch = QwenArch.from_json_file(os.path.join(out, "qwen_arch.json"))
    tokens = torch.randint(0, arch.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits
    import dataclasses

    results = run_distributed(megatron_logits, 4, args=(dataclasses.asdict(arch), out, tokens),
                              layout=Layout(tp=2, pp=2))
    got = [r for r in results if r is not None]
    assert len(got) == 2
    for logits in got:
        torch.testing.assert_close(logits[..., : arch.vocab_size], expected, rtol=0, atol=1e-5)


def _cli(tool, *args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_bad_input_gets_a_clear_error(tmp_path):
    hf_dir = tmp_path / "hf"
    save_tiny_hf(hf_dir, "qwen2")
    index = json.load(open(hf_dir / "model.safetensors.index.json"))
    shard = sorted(set(index["weight_map"].values()))[-1]

    r = _cli("convert_hf_to_megatron.py", "--hf-path", str(hf_dir), "--save", str(tmp_path / "a"),
             "--tensor-model-parallel-size", "4")
    assert r.returncode == 2 and "KV groups" in r.stderr and "Traceback" not in r.stderr

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep").write_text("x")
    r = _cli("convert_hf_to_megatron.py", "--hf-path", str(hf_dir), "--save", str(tmp_path / "e"))
    assert r.returncode == 2 and "overwrite" in r.stderr
    assert (tmp_path / "e" / "keep").read_text() == "x"

    r = _cli("convert_megatron_to_hf.py", "--load", str(tmp_path / "nowhere"), "--save", str(tmp_path / "f"))
    assert r.returncode == 2 and "not a checkpoint written by megatron-aligndistil" in r.stderr

    data = (hf_dir / shard).read_bytes()
    (hf_dir / shard).write_bytes(data[: len(data) // 2])  # truncated download
    r = _cli("convert_hf_to_megatron.py", "--hf-path", str(hf_dir), "--save", str(tmp_path / "b"))
    assert r.returncode == 2 and shard in r.stderr and "truncated" in r.stderr

    (hf_dir / shard).unlink()  # missing shard
    r = _cli("convert_hf_to_megatron.py", "--hf-path", str(hf_dir), "--save", str(tmp_path / "c"))
    assert r.returncode == 2 and shard in r.stderr and "missing" in r.stderr
    assert not (tmp_path / "c").exists()  # nothing half-written

    cfg = json.load(open(hf_dir / "config.json"))
    json.dump(dict(cfg, model_type="qwen2_moe"), open(hf_dir / "config.json", "w"))
    r = _cli("convert_hf_to_megatron.py", "--hf-path", str(hf_dir), "--save", str(tmp_path / "d"))
    assert r.returncode == 2 and "qwen2_moe" in r.stderr


@pytest.mark.parametrize("name,shape", [("model.embed_tokens.weight", (500, None)),  # fewer rows than vocab_size
                                        ("model.layers.1.self_attn.q_proj.weight", (None, 8))])
def test_tensor_shapes_are_checked_against_the_config(tmp_path, name, shape):
    """A tensor of the wrong shape is named before anything is written (it was zero-padded or died
    in a bare reshape)."""
    from safetensors.torch import load_file, save_file

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron
    from megatron_aligndistil.core.store import CheckpointError

    hf_dir = tmp_path / "hf"
    save_tiny_hf(hf_dir, "qwen2")
    index = json.load(open(hf_dir / "model.safetensors.index.json"))
    shard = hf_dir / index["weight_map"][name]
    tensors = load_file(str(shard))
    t = tensors[name]
    rows, cols = (shape[0] or t.shape[0]), (shape[1] or t.shape[1])
    tensors[name] = t[:rows, :cols].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has shape \\[{rows}, {cols}\\], config.json implies"):
        convert_hf_to_megatron(str(hf_dir), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


_MEASURE = r"""
import sys, threading, time
from megatron_aligndistil.convert.hf import convert_hf_to_megatron
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
base = anon(); peak = [base]; done = [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
convert_hf_to_megatron(sys.argv[1], sys.argv[2], max_shard_bytes=4 << 20, progress=False)
done[0] = True; t.join()
print(peak[0] - base)
"""


def test_memory_does_not_grow_with_model_size(tmp_path):
    """Peak anonymous memory of a conversion: 8x the layers must cost < 2x (streaming)."""
    deltas = {}
    for layers in (2, 16):
        hf_dir = tmp_path / f"hf{layers}"
        save_tiny_hf(hf_dir, "qwen2", num_layers=layers, hidden_size=512, intermediate_size=1536,
                     max_shard_size="20MB")
        # glibc: unmap every freed buffer >= 64 KiB, so RSS counts live tensors, not heap slack
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(hf_dir), str(tmp_path / f"mc{layers}")],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        deltas[layers] = int(r.stdout.strip().splitlines()[-1])
    size_big = sum(f.stat().st_size for f in (tmp_path / "hf16").glob("*.safetensors"))
    print("peak anonymous memory above start, bytes:", deltas, "model bytes (16 layers):", size_big)
    assert deltas[16] < 2 * deltas[2], deltas
    assert deltas[16] < size_big / 3, (deltas, size_big)  # far below the model size


def test_export_writes_generation_config_when_the_source_had_none(tmp_path):
    from transformers import GenerationConfig

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron, convert_megatron_to_hf

    save_tiny_hf(tmp_path / "hf", "qwen3")
    (tmp_path / "hf" / "generation_config.json").unlink()
    mc = convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mc"), progress=False)
    out = convert_megatron_to_hf(mc, str(tmp_path / "out"), progress=False)
    assert os.path.exists(os.path.join(out, "generation_config.json"))
    GenerationConfig.from_pretrained(out)
    written = json.load(open(os.path.join(out, "generation_config.json")))
    config = json.load(open(os.path.join(out, "config.json")))
    assert written == {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                       if config.get(k) is not None} | {"_from_model_config": True}


def _rewrite_single_file(directory, change):
    """Rewrite a saved checkpoint as one model.safetensors after ``change(tensors)`` (a dict)."""
    from safetensors.torch import save_file

    tensors = _safetensors_dir(directory)
    for f in os.listdir(directory):
        if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".index.json")):
            os.remove(os.path.join(directory, f))
    change(tensors)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("model_type,extra,hint", [
    ("qwen3", [f"model.layers.1.self_attn.{x}_proj.bias" for x in "qkv"], "attention_bias false"),
    ("qwen2", ["model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"],
     "only qwen3 has them"),
    ("qwen2", ["model.layers.1.self_attn.k_norm.weight"], "only qwen3 has them"),
    ("qwen2", ["model.layers.7.mlp.down_proj.weight"], "layers past num_hidden_layers 4"),
    ("qwen3", ["model.layers.7.mlp.down_proj.weight"], "layers past num_hidden_layers 4"),  # no bias hint
], ids=["qwen3-biases", "qwen2-qk-norm", "qwen2-k-norm", "qwen2-extra-layer", "qwen3-extra-layer"])
def test_tensors_the_config_does_not_place_stop_the_conversion(tmp_path, model_type, extra, hint):
    """Issue 26 item 6: every input tensor is mapped, or nothing is written and the unmapped
    tensors are named (they were dropped while the converter printed 'wrote'), with the one hint
    that applies."""
    hf_dir = tmp_path / "hf"
    save_tiny_hf(hf_dir, model_type)

    def add(tensors):
        for name in extra:
            tensors[name] = torch.randn(8)

    _rewrite_single_file(hf_dir, add)
    r = _cli("convert_hf_to_megatron.py", "--hf-path", str(hf_dir), "--save", str(tmp_path / "mc"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{len(extra)} tensor(s) are not placed by the {model_type} mapping" in r.stderr
    assert all(name in r.stderr for name in extra) and hint in r.stderr
    other_hints = {"attention_bias false", "only qwen3 has them", "an output layer under", "layers past"}
    assert [h for h in other_hints if h in r.stderr] == [h for h in other_hints if h in hint], r.stderr
    assert not (tmp_path / "mc").exists() and not (tmp_path / "mc.tmp").exists()


def test_tied_checkpoints_with_an_output_copy_and_old_rotary_buffers(tmp_path):
    """A tied checkpoint may carry lm_head.weight: taken when it equals the embedding (and the
    round trip gives the tied model), refused when it differs; rotary inv_freq buffers carry no
    weight and are skipped."""
    hf_dir = tmp_path / "hf"
    save_tiny_hf(hf_dir, "qwen2", tied=True)

    def copy_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    _rewrite_single_file(hf_dir, copy_head)
    assert convert_hf_to_megatron.main(["--hf-path", str(hf_dir), "--save", str(tmp_path / "mc")]) == 0
    assert convert_megatron_to_hf.main(["--load", str(tmp_path / "mc"), "--save", str(tmp_path / "out")]) == 0
    assert "lm_head.weight" not in _safetensors_dir(tmp_path / "out")

    def change_head(tensors):
        tensors["lm_head.weight"][3, 0] += 1.0

    _rewrite_single_file(hf_dir, change_head)
    r = _cli("convert_hf_to_megatron.py", "--hf-path", str(hf_dir), "--save", str(tmp_path / "mc2"))
    assert r.returncode == 2 and "lm_head.weight differs from model.embed_tokens.weight" in r.stderr, r.stderr
    assert not (tmp_path / "mc2").exists()


def test_export_refuses_megatron_tensors_its_arch_does_not_place(tmp_path):
    """The Megatron -> HF direction is strict too: a q/k/v bias in a Qwen3 checkpoint whose
    qwen_arch.json has none is named, not dropped."""
    hf_dir, mc = tmp_path / "hf", tmp_path / "mc"
    save_tiny_hf(hf_dir, "qwen3")
    assert convert_hf_to_megatron.main(["--hf-path", str(hf_dir), "--save", str(mc)]) == 0
    _rewrite_single_file(mc, lambda t: t.update({"decoder.layers.0.self_attention.linear_qkv.bias": torch.randn(8)}))
    r = _cli("convert_megatron_to_hf.py", "--load", str(mc), "--save", str(tmp_path / "out"))
    assert r.returncode == 2 and "decoder.layers.0.self_attention.linear_qkv.bias" in r.stderr, r.stderr
    assert "attention_bias false" in r.stderr and "qwen_arch.json" in r.stderr
    assert not (tmp_path / "out").exists()
    _rewrite_single_file(mc, lambda t: t.pop("decoder.final_layernorm.weight"))
    r = _cli("convert_megatron_to_hf.py", "--load", str(mc), "--save", str(tmp_path / "out"))
    assert r.returncode == 2 and "decoder.final_layernorm.weight" in r.stderr and "missing" in r.stderr
