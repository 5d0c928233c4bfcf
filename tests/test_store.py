"""core.store's streaming writers: every dtype and shape safetensors holds, both ways a header is
placed (in its reserved space, or rewritten compactly), and shards."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_aligndistil.core.store import (SafetensorsFileWriter, ShardedWriter, TensorStore,
                                             _SAFETENSORS_DTYPES)


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = {f"t.{dtype}".replace("torch.", ""): (torch.randn(3, 5, generator=g) * 10).to(dtype)
           for dtype in _SAFETENSORS_DTYPES}
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    out["transposed"] = torch.arange(12.0).view(3, 4).t()  # not contiguous
    out["bf16.big"] = torch.randn(512, 128, generator=g).to(torch.bfloat16)
    return out


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


@pytest.mark.parametrize("reserve, in_place", [(8 << 10, True), (64, False), (1 << 20, False)])
def test_file_writer_round_trips_every_dtype(tmp_path, reserve, in_place):
    """reserve 8 KiB: the header fits and the data (129 KiB) is at least 16x the reserve, so the header is
    written in place; 64 bytes: the header outgrows it; 1 MiB: the data is small next to it.
    The last two are rewritten compactly."""
    tensors = _tensors()
    path = str(tmp_path / "x.safetensors")
    with SafetensorsFileWriter(path, reserve=reserve, metadata={"format": "pt", "note": "x"}) as w:
        for name, t in tensors.items():
            w.add(name, t)
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    assert data >= 16 * (8 << 10)
    n, header = _header(path)
    assert header["__metadata__"] == {"format": "pt", "note": "x"}
    assert n % 8 == 0
    assert (n == reserve) == in_place
    assert os.path.getsize(path) == 8 + n + data
    assert w.header_bytes <= n and (in_place or w.header_bytes == n)
    back = load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        # bit-equal (bytes, so NaN-free comparison is not needed and -0.0 counts)
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), name
    with safe_open(path, "pt") as f:  # the lazy reader agrees
        assert torch.equal(f.get_slice("bf16.big")[10:20], tensors["bf16.big"][10:20])


def test_file_writer_refuses_a_repeated_name_and_an_unknown_dtype(tmp_path):
    w = SafetensorsFileWriter(str(tmp_path / "x.safetensors"))
    w.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'a' added twice"):
        w.add("a", torch.zeros(2))
    with pytest.raises(TypeError, match="complex64"):
        w.add("c", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"'p' of shape \[2, 3\] needs 24 bytes, its pieces held 20"):
        w.add_pieces("p", torch.float32, [2, 3], [torch.zeros(3), torch.zeros(2)])
    with pytest.raises(TypeError, match="a piece of tensor 'q' has dtype torch.bfloat16, not torch.float32"):
        w.add_pieces("q", torch.float32, [2], [torch.zeros(2, dtype=torch.bfloat16)])
    w.abort()


def test_pieces_make_one_tensor(tmp_path):
    """add_pieces: the row-major bytes of the pieces, in order, are the tensor."""
    full = torch.arange(24.0).view(4, 6).to(torch.bfloat16)
    path = str(tmp_path / "x.safetensors")
    with SafetensorsFileWriter(path) as w:
        w.add_pieces("t", torch.bfloat16, [4, 6], full.split([1, 2, 1]))
        w.add("u", full.t())
    back = load_file(path)
    assert torch.equal(back["t"], full) and torch.equal(back["u"], full.t())


def test_sharded_writer_splits_at_the_limit_and_streams(tmp_path):
    """Shards of at most max_shard_bytes (a larger tensor gets one alone); each shard after the
    first reserves twice the previous header; the directory is published whole on commit."""
    g = torch.Generator().manual_seed(1)
    tensors = {f"w{i}": torch.randn(64, 64, generator=g) for i in range(7)}  # 16 KiB each
    tensors["big"] = torch.randn(256, 64, generator=g)  # 64 KiB, past the limit alone
    w = ShardedWriter(str(tmp_path / "out"), max_shard_bytes=40 << 10)
    for name, t in tensors.items():
        w.add(name, t)
    assert not (tmp_path / "out").exists()
    w.commit()
    assert not (tmp_path / "out.tmp").exists()
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    assert [index["weight_map"][f"w{i}"][6:11] for i in range(7)] == ["00001"] * 2 + ["00002"] * 2 + \
        ["00003"] * 2 + ["00004"]
    assert index["weight_map"]["big"] == "model-00005-of-00005.safetensors"
    with TensorStore(str(tmp_path / "out")) as store:
        for name, t in tensors.items():
            assert torch.equal(store.get(name), t), name


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_the_policy_export_holds_one_tensor_not_the_stage(tmp_path, tp, pp):
    """export_release writes each full tensor before gathering the next: its extra memory is
    about the largest tensor (the 8 MiB bf16 embedding on the first stage), not the stage (32
    layers of 3.4 MiB). Before streaming, the writing rank held the whole stage. fp32 parameters
    exported as bf16, as a trained Qwen is: each is cast before the TP gather."""
    import dataclasses

    from conftest import tiny_arch
    from megatron_aligndistil.core.parallel import Layout
    from megatron_aligndistil.testing import measure_export, run_distributed

    arch = tiny_arch("qwen3", tied=True, vocab_size=16384, num_layers=32, hidden_size=256, ffn_hidden_size=2048,
                     torch_dtype="bfloat16")
    out = str(tmp_path / "release")
    ranks = run_distributed(measure_export, tp * pp, args=(dataclasses.asdict(arch), out), layout=Layout(tp=tp, pp=pp))
    for rank, r in enumerate(ranks):
        print(rank, {k: v / 2**20 for k, v in r.items()})
        bound = 1.5 * r["largest_tensor"] + (4 << 20)
        assert r["stage"] > 2.5 * bound  # the stage's tensors could not all fit
        assert r["peak_above_start"] < bound, (rank, r)
    from megatron_aligndistil.convert.mapping import megatron_tensor_names

    with TensorStore(out) as store:  # every tensor of the model, once (the tied output layer not)
        assert sorted(store.keys()) == sorted(megatron_tensor_names(arch))


@pytest.mark.parametrize("model_type, tied, layout", [
    ("qwen2", False, dict(tp=2, pp=2)),  # q/k/v bias, SwiGLU fc1 (gate halves, then up halves), untied output
    ("qwen3", True, dict(tp=2)),  # q/k norm, tied embedding
    ("qwen3_moe", False, dict(tp=2, ep=2, sequence_parallel=True)),  # experts split over expert-TP 2
], ids=["qwen2_tp2_pp2", "qwen3_tied_tp2", "qwen3_moe_tp2_ep2"])
def test_the_streamed_export_is_the_full_tensors_bit_for_bit(tmp_path, model_type, tied, layout):
    """The pieces the writer gets (shards broadcast one at a time, row-parallel tensors whole)
    make every full tensor exactly, in the checkpoint's dtype (bf16 here: cast before the
    gather)."""
    import dataclasses

    from hf_fixtures import saved_state_dict, tiny_hf_model
    from megatron_aligndistil.convert.mapping import hf_to_megatron
    from megatron_aligndistil.core.parallel import Layout
    from megatron_aligndistil.models.qwen import QwenArch
    from megatron_aligndistil.testing import measure_export, run_distributed

    hf = tiny_hf_model(model_type, tied=tied, seed=3)
    arch = dataclasses.replace(QwenArch.from_hf_config(hf.config), torch_dtype="bfloat16")
    full = dict(hf_to_megatron(arch, saved_state_dict(hf).__getitem__))
    lay = Layout(**layout)
    world = lay.tp * lay.pp * (2 if lay.ep > 1 else 1)
    out = str(tmp_path / "release")
    run_distributed(measure_export, world, args=(dataclasses.asdict(arch), out, full), layout=lay)
    with TensorStore(out) as store:
        assert sorted(store.keys()) == sorted(full)
        for name, want in full.items():
            got = store.get(name)
            assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16)), name


def test_a_writer_without_tensors_publishes_its_side_files(tmp_path):
    """commit() with no tensor: no shard to finish, no index; the side files are published."""
    w = ShardedWriter(str(tmp_path / "out"))
    w.write_json("config.json", {"a": 1})
    w.commit()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json"]
