"""Issue 16 item 2: real Qwen vocabulary sizes with the real Qwen3 tokenizer.

The tokenizer has 151,669 ids; Qwen checkpoints pad the embedding to 151,936 or 152,064 rows (and
HF trainers that ``resize_token_embeddings`` may leave any other number). Policy and teachers of
different vocab sizes train together when they share the tokenizer, and the ids past it never carry
probability: in these models the rows past the tokenizer are scaled up so that they would take a
large share of every softmax they entered, and the trainer's numbers still equal a dense float64
reference computed over the tokenizer's ids alone."""

import json
import os
import shutil

import pytest
import torch

from hf_fixtures import CONVERSATIONS, qwen3_tokenizer, tiny_hf_model
from megatron_aligndistil.core.errors import UserError
from megatron_aligndistil.testing import run_distributed
from megatron_aligndistil.train.metrics import read_metrics
from train_fixtures import aligndistil_argv, dense_first_iteration, run_train

TOKENIZER_IDS = 151_669
# policy and DPO teacher: Qwen's two paddings (both 152,576 rows here); the reverse teacher pads to
# 154,624 rows, so its embedding and output layer load with fewer rows than stored
VOCABS = {"policy": 151_936, "dpo": 152_064, "rev": 153_700}


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


def _records(tok):
    """Prompt/response ids of real chat renderings, thinking off (8 records)."""
    from megatron_aligndistil.data.preprocess import split_conversation

    out = []
    for i, messages in enumerate(list(CONVERSATIONS.values()) * 2):
        prompt, response = split_conversation(tok, messages, {"enable_thinking": i % 2 == 0})
        out.append({"prompt_ids": prompt[-12:], "response_ids": response[:10]})
    return out


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
    from megatron_aligndistil.convert.hf import convert_hf_to_megatron

    root = str(tmp_path_factory.mktemp("real_vocab"))
    out = {}
    for seed, (role, vocab) in enumerate(VOCABS.items()):
        model = tiny_hf_model("qwen3", vocab_size=vocab, seed=seed, hidden_size=32, num_layers=2,
                              intermediate_size=64, head_dim=16)
        with torch.no_grad():  # rows the tokenizer cannot produce: large logits if they were let in
            model.lm_head.weight[TOKENIZER_IDS:] *= 30
        hf_dir = os.path.join(root, f"hf_{role}")
        model.save_pretrained(hf_dir)
        tok.save_pretrained(hf_dir)
        out[f"hf_{role}"] = hf_dir
        out[role] = convert_hf_to_megatron(hf_dir, os.path.join(root, role), progress=False)
    out["data"] = os.path.join(root, "data.jsonl")
    with open(out["data"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in _records(tok))
    return out


def test_vocab_size_is_the_tokenizers_and_mismatched_teachers_are_checked(setup, tmp_path):
    from megatron_aligndistil.models.qwen import read_arch
    from megatron_aligndistil.core.weights import check_compatible, tokenizer_vocab_size

    archs = {role: read_arch(setup[role]) for role in VOCABS}
    assert {r: a.vocab_size for r, a in archs.items()} == VOCABS
    assert archs["policy"].padded_vocab_size == archs["dpo"].padded_vocab_size == 152_576
    assert archs["rev"].padded_vocab_size == 154_624
    for role in VOCABS:
        assert tokenizer_vocab_size(archs[role], setup[role]) == TOKENIZER_IDS
        check_compatible(archs["policy"], setup["policy"], setup[role], role)  # same tokenizer: accepted

    no_tokenizer = tmp_path / "dpo_without_tokenizer"
    shutil.copytree(setup["dpo"], no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.json")
    with pytest.raises(UserError, match=r"--dpo-load .*dpo_without_tokenizer: vocab_size 152064 differs from "
                                        r"the policy's 151936 \(--load .*\), and without both tokenizer.json"):
        check_compatible(archs["policy"], setup["policy"], str(no_tokenizer), "dpo")

    small = tmp_path / "small_vocab"  # a model whose embedding ends before the tokenizer does
    shutil.copytree(setup["rev"], small)
    arch_file = small / "qwen_arch.json"
    arch_file.write_text(arch_file.read_text().replace('"vocab_size": 153700', '"vocab_size": 151000'))
    with pytest.raises(UserError, match=r"tokenizer.json: the tokenizer has ids up to 151668, past the model's "
                                        r"vocab_size 151000"):
        check_compatible(archs["policy"], setup["policy"], str(small), "rev")

    other_tok = tmp_path / "other_tokenizer"
    shutil.copytree(setup["dpo"], other_tok)
    data = json.loads((other_tok / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<|other|>"
    (other_tok / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="--dpo-load .*other_tokenizer: tokenizer.json differs from the policy's"):
        check_compatible(archs["policy"], setup["policy"], str(other_tok), "dpo")


def test_ids_past_the_tokenizer_carry_no_probability_at_tp1_and_tp2(setup, tmp_path):
    """Iteration 1 (loss, gradient norm, KL, alpha, TVD) equals the reference over the tokenizer's
    ids, at TP1 and TP2 (the tokenizer ends inside TP rank 1's vocab shard); the reference over all
    rows is far from it, so the masking is what makes them equal."""
    ref = dense_first_iteration(setup, vocab=TOKENIZER_IDS)
    unmasked = dense_first_iteration(setup, vocab=VOCABS["policy"])
    assert abs(unmasked["kl"] - ref["kl"]) > 0.1 * ref["kl"]  # the scaled rows would matter
    for world, extra in ((1, []), (2, ["--tensor-model-parallel-size", "2"])):
        save = str(tmp_path / f"tp{world}")
        argv = aligndistil_argv(setup, save, "--no-export", "--seq-length", "32", *extra, iters=1)
        assert run_distributed(run_train, world, args=(argv,), timeout=600) == [0] * world
        (first,) = read_metrics(os.path.join(save, "metrics.jsonl"))
        assert first["tokens"] == ref["tokens"]
        for field, key in (("loss", "loss"), ("grad_norm", "grad_norm"), ("kl", "kl"), ("alpha_mean", "alpha"),
                           ("tvd_mean", "tvd")):
            assert first[field] == pytest.approx(ref[key], rel=1e-4), (world, field)


def test_data_with_ids_past_the_tokenizer_is_refused(setup, tmp_path):
    from train_fixtures import launch_train

    bad = tmp_path / "bad.jsonl"
    lines = open(setup["data"]).read().splitlines()
    record = json.loads(lines[2])
    record["response_ids"][0] = TOKENIZER_IDS + 5  # has an embedding row, but no token
    lines[2] = json.dumps(record)
    bad.write_text("\n".join(lines) + "\n")
    r = launch_train(aligndistil_argv(dict(setup, data=str(bad)), str(tmp_path / "run"), "--seq-length", "32"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"{bad}:3: field 'response_ids' has token id {TOKENIZER_IDS + 5} outside the vocabulary "
            f"[0, {TOKENIZER_IDS})") in r.stderr and "Traceback" not in r.stderr
