"""Issue 26 items 8 and 9: faults and bad flags give one clear line naming the path or flag, not a
traceback, not a minute of retries, not a silently ignored setting.

Disk faults are real: a tiny tmpfs (full) or a read-only tmpfs is mounted for the test (root in
this sandbox and in CI; skipped where mounting is not allowed)."""

import contextlib
import os
import subprocess
import sys
import time

import pytest

from hf_fixtures import save_tiny_hf, tiny_tokenizer
from megatron_aligndistil.core.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def mounted(path, options):
    """A tmpfs at ``path`` with mount ``options`` (e.g. ``size=64k`` or ``ro``)."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _tool(name, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))


def test_a_full_disk_at_the_converters_save(tmp_path):
    save_tiny_hf(tmp_path / "hf", "qwen2", tied=True)
    with mounted(tmp_path / "full", "size=64k") as full:
        r = _tool("convert_hf_to_megatron.py", "--hf-path", str(tmp_path / "hf"), "--save", str(full / "mc"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"error: --save {full / 'mc'}: cannot write" in r.stderr and "no space left on the device" in r.stderr
        assert os.listdir(full) == []  # the temporary directory is gone, nothing half-written


def test_a_read_only_output_prefix_in_preprocessing(tmp_path):
    from megatron_aligndistil.data.preprocess import preprocess
    from megatron_aligndistil.data.synthetic import preference_records

    with mounted(tmp_path / "ro", "ro,size=64k") as ro:
        with pytest.raises(UserError, match=rf"--output-prefix {ro}/p: cannot write .*read-only file system"):
            preprocess(preference_records(4), tiny_tokenizer(), str(ro / "p"), progress=False)


def test_a_full_disk_at_the_trainers_save_removes_the_half_written_checkpoint(tmp_path):
    from train_fixtures import aligndistil_argv, launch_train, make_aligndistil_setup

    setup = make_aligndistil_setup(str(tmp_path / "models"), num_layers=2)
    with mounted(tmp_path / "full", "size=96k") as full:
        r = launch_train(aligndistil_argv(setup, str(full / "run"), "--no-export", iters=1))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"error: --save {full / 'run'}: cannot write" in r.stderr and "no space left" in r.stderr
        assert not [f for f in os.listdir(full / "run") if f.endswith(".tmp")]
        assert not (full / "run" / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.parametrize("flag", ["--reward-model", "--input"])
def test_a_hub_name_that_cannot_be_fetched_fails_at_once(flag, monkeypatch):
    """Offline (no network, or HF_HUB_OFFLINE) and not cached: refused in well under a second
    instead of 35-60 s of retries; a path that is no Hub name is simply missing."""
    from megatron_aligndistil import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(UserError, match=rf"{flag} nobody-here/no-such-model: no such file or directory, and as a "
                                        r"Hugging Face Hub name it cannot be fetched: the Hub is unreachable "
                                        r"\(HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE to allow downloads\)"):
        hub.local_or_hub("nobody-here/no-such-model", flag, repo_type="dataset" if flag == "--input" else "model")
    assert time.time() - t0 < 5
    with pytest.raises(UserError, match=rf"{flag} \./nowhere/x: no such file or directory$"):
        hub.local_or_hub("./nowhere/x", flag)
    assert hub.looks_like_hub_name("Qwen/Qwen2.5-1.5B-Instruct") and not hub.looks_like_hub_name("/abs/path")
    assert not hub.looks_like_hub_name("a/b/c") and not hub.looks_like_hub_name("../x")


def test_the_tools_refuse_missing_inputs_and_zero_sizes_naming_the_flag(tmp_path):
    # a Hub name, offline and not cached: refused at once, naming the name and what would allow it
    t0 = time.time()
    r = _tool("convert_hf_to_megatron.py", "--hf-path", "Qwen/Qwen2.5-0.5B", "--save", str(tmp_path / "x"),
              env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    assert r.returncode == 2 and "--hf-path Qwen/Qwen2.5-0.5B: no such file or directory, and as a Hugging Face " \
        "Hub name it cannot be fetched: the Hub is unreachable (HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE to allow " \
        "downloads)" in r.stderr, r.stderr[-1500:]
    assert "huggingface-cli download Qwen/Qwen2.5-0.5B" in r.stderr and time.time() - t0 < 30
    save_tiny_hf(tmp_path / "hf", "qwen3")
    r = _tool("convert_hf_to_megatron.py", "--hf-path", str(tmp_path / "hf"), "--save", str(tmp_path / "mc"),
              "--tensor-model-parallel-size", "0")
    assert r.returncode == 2 and "--tensor-model-parallel-size 0 must be a positive integer" in r.stderr
    assert "Traceback" not in r.stderr
    for flag in ("--batch-size", "--max-new-tokens"):
        r = _tool("generate.py", "--load", str(tmp_path / "mc"), "--prompts", "p.jsonl", "--out", "o.json", flag, "0")
        assert r.returncode == 2 and f"{flag} 0 must be >= 1" in r.stderr, r.stderr[-1000:]


def test_a_prompt_longer_than_the_models_context(tmp_path):
    import json

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron

    save_tiny_hf(tmp_path / "hf", "qwen2")  # 256 positions
    mc = convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mc"), progress=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [5] * 255}) + "\n" + json.dumps({"prompt_ids": [5] * 256}) + "\n")
    r = _tool("generate.py", "--load", mc, "--prompts", str(prompts), "--out", str(tmp_path / "o.json"),
              "--max-new-tokens", "1")
    assert r.returncode == 2 and f"{prompts}: prompt 2 has 256 tokens; the model takes 256 positions" in r.stderr, \
        r.stderr[-2000:]


@pytest.mark.parametrize("setting,message", [
    ("nope=1", "--set nope=1: no setting 'nope'"),
    ("r=high", "--set r=high: r takes float (now 15.0)"),
    ("seeds=1,x", "--set seeds=1,x: seeds takes comma-separated ints"),
])
def test_reproduce_set_with_a_bad_key_or_value(setting, message, capsys):
    from megatron_aligndistil.eval import reproduce

    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--quick", "--set", setting, "--run-dir", "/nonexistent"])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_tvd_scale_and_r_must_agree(capsys):
    from megatron_aligndistil.train.arguments import parse_args

    base = ["aligndistil", "--load", "p", "--save", "s", "--data-path", "d", "--global-batch-size", "8",
            "--seq-length", "16", "--lr", "1e-3", "--dpo-load", "a", "--rev-load", "b"]
    assert parse_args(base + ["--tvd-scale", "5", "--r=5.0"]).r == 5.0  # the same value twice: fine
    with pytest.raises(SystemExit):
        parse_args(base + ["--tvd-scale", "5", "--r", "10"])
    assert "--tvd-scale and --r are one setting (r) given different values: --tvd-scale 5.0, --r 10.0" \
        in capsys.readouterr().err


@pytest.mark.parametrize("ids,ok", [([0, 411], True), ([412], False), ([-1], False), ([2**31 - 1], False)])
def test_stop_ids_outside_the_tokenizer_are_refused(ids, ok):
    from megatron_aligndistil.core.weights import check_stop_ids

    if ok:
        check_stop_ids(ids, 412, "ckpt")
        return
    with pytest.raises(UserError, match=rf"--stop-token-ids {ids[0]}: outside the 412 ids of the tokenizer of ckpt"):
        check_stop_ids(ids, 412, "ckpt")


def test_chat_template_kwargs_the_template_never_reads_warn(capsys, monkeypatch):
    from hf_fixtures import qwen3_tokenizer
    from megatron_aligndistil.data.preprocess import unread_template_kwargs, warn_unread_template_kwargs

    tok = qwen3_tokenizer()
    assert unread_template_kwargs(tok, {"enable_thinking": False}) == []
    assert unread_template_kwargs(tok, {}) == [] and unread_template_kwargs(object(), {"x": 1}) == []
    assert warn_unread_template_kwargs(tok, {"enable_thinkng": False, "enable_thinking": True}) == ["enable_thinkng"]
    assert "--chat-template-kwargs: the chat template never reads 'enable_thinkng'" in capsys.readouterr().err
    # one warning per launch: rank 0 prints it, the other ranks only return the keys
    import torch.distributed as dist

    for rank, printed in ((1, False), (0, True)):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        assert warn_unread_template_kwargs(tok, {"enable_thinkng": False}) == ["enable_thinkng"]
        assert ("never reads 'enable_thinkng'" in capsys.readouterr().err) == printed, rank


def test_write_failures_are_named_and_their_temporaries_removed(tmp_path):
    """core.errors.writing: the errno, the 'os error N' of a native writer's message, or the
    location itself (location_fault) names the cause; files and directories matching the cleanup
    patterns are removed; anything else passes through unchanged."""
    import errno

    from megatron_aligndistil.core.errors import location_fault, writing

    (tmp_path / "out.tmp").write_text("x")
    (tmp_path / "dir.tmp").mkdir()
    (tmp_path / "keep").write_text("x")
    with pytest.raises(UserError, match=r"--save S: cannot write S \(read-only file system\)"):
        with writing("--save", "S", cleanup=[str(tmp_path / "*.tmp")]):
            raise RuntimeError("Error while serializing: I/O error: Read-only file system (os error 30)")
    assert sorted(os.listdir(tmp_path)) == ["keep"]
    with pytest.raises(UserError, match=r"cannot write /x/y \(no space left on the device\)"):
        with writing("--output-prefix", "P"):
            raise OSError(errno.ENOSPC, "No space left on device", "/x/y")
    with pytest.raises(KeyError):  # not a write failure of the location: unchanged
        with writing("--save", str(tmp_path)):
            raise KeyError("model.norm.weight")
    assert location_fault(str(tmp_path / "not" / "yet" / "there")) is None  # a writable parent
    with mounted(tmp_path / "full", "size=64k") as full:
        (full / "fill").write_bytes(b"0" * (60 << 10))
        assert location_fault(str(full / "run" / "iter_0000001.tmp")) == errno.ENOSPC
    with mounted(tmp_path / "ro", "ro,size=64k") as ro:
        assert location_fault(str(ro / "p")) == errno.EROFS


def test_hub_names_found_in_the_cache_or_online_are_passed_on(monkeypatch, tmp_path):
    """A Hub name with a cached copy, or with the Hub reachable, goes on to datasets / transformers
    unchanged; a local path is returned as it is. (No network: the lookups are stubbed.)"""
    import socket

    import huggingface_hub

    from megatron_aligndistil import hub

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert hub.local_or_hub(str(tmp_path), "--input") == str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path))
    assert hub._cached("org/name", "model") is True
    assert hub.local_or_hub("org/name", "--reward-model") == "org/name"

    def missing(*a, **k):
        raise FileNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [("resolved",)])
    assert hub.hub_offline() is None
    assert hub.local_or_hub("org/name", "--reward-model") == "org/name"  # online: fetched by transformers

    def unresolvable(*a, **k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    assert hub.hub_offline() == "huggingface.co does not resolve (Temporary failure in name resolution)"
    with pytest.raises(UserError, match=r"the Hub is unreachable \(huggingface.co does not resolve"):
        hub.local_or_hub("org/name", "--reward-model")


def test_the_converter_takes_a_hub_name_from_the_cache_or_a_download(monkeypatch, tmp_path):
    """--hf-path org/name: the cached snapshot when there is one, else a download of the config,
    safetensors and tokenizer files (huggingface_hub); the converted checkpoint is the same as
    from the local directory. A failed download names the flag and the name. (No network: the
    Hub is stubbed with a local model directory.)"""
    import socket

    import huggingface_hub
    import torch
    from safetensors.torch import load_file

    from megatron_aligndistil import hub
    from megatron_aligndistil.convert.hf import convert_hf_to_megatron

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    save_tiny_hf(tmp_path / "snapshot", "qwen3", tied=True)
    calls = []

    def hub_stub(cached):
        def snapshot_download(name, allow_patterns=None, local_files_only=False, **kw):
            calls.append((name, tuple(allow_patterns or ()), local_files_only))
            if local_files_only and not cached:
                raise FileNotFoundError("not in the cache")
            return str(tmp_path / "snapshot")
        return snapshot_download

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [("resolved",)])
    local = convert_hf_to_megatron(str(tmp_path / "snapshot"), str(tmp_path / "from_dir"), progress=False)
    for cached in (True, False):
        calls.clear()
        monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_stub(cached))
        out = convert_hf_to_megatron("Qwen/Qwen3-0.6B", str(tmp_path / f"from_hub_{cached}"), progress=False)
        downloads = [c for c in calls if not c[2]]
        assert len(downloads) == (0 if cached else 1)
        if downloads:
            assert downloads[0][0] == "Qwen/Qwen3-0.6B" and set(downloads[0][1]) == set(hub.MODEL_FILES)
        for f in os.listdir(local):
            if f.endswith(".safetensors"):
                a, b = load_file(os.path.join(local, f)), load_file(os.path.join(out, f))
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def refused(name, local_files_only=False, **kw):
        raise RuntimeError("401 Client Error: gated repo") if not local_files_only else FileNotFoundError()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    with pytest.raises(UserError, match=r"--hf-path Qwen/Qwen3-0.6B: downloading it from the Hugging Face Hub "
                                        r"failed: RuntimeError: 401 Client Error: gated repo"):
        convert_hf_to_megatron("Qwen/Qwen3-0.6B", str(tmp_path / "never"), progress=False)


def test_args_json_keeps_the_resume_history(tmp_path):
    import argparse
    import json

    from megatron_aligndistil.models.qwen import QwenArch
    from megatron_aligndistil.train.checkpointing import write_run_files
    from conftest import tiny_arch

    arch: QwenArch = tiny_arch()
    first = argparse.Namespace(save=str(tmp_path), lr=1e-3, save_interval=2)
    write_run_files(first, arch, "p")
    assert json.load(open(tmp_path / "args.json"))["resume_history"] == []
    write_run_files(argparse.Namespace(save=str(tmp_path), lr=2e-3, save_interval=2), arch, "p", resumed_at=2,
                    overrides={"lr": [1e-3, 2e-3]})
    write_run_files(argparse.Namespace(save=str(tmp_path), lr=2e-3, save_interval=3), arch, "p", resumed_at=4)
    saved = json.load(open(tmp_path / "args.json"))
    assert saved["lr"] == 2e-3 and saved["save_interval"] == 3
    assert saved["resume_history"] == [
        {"iteration": 2, "changed_flags": {"lr": [1e-3, 2e-3]}, "overridden_identity": {"lr": [1e-3, 2e-3]}},
        {"iteration": 4, "changed_flags": {"save_interval": [2, 3]}, "overridden_identity": {}}]
