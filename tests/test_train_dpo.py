"""Issue 6: DPO / reverse DPO through the shared trainer against a dense HF reference."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_aligndistil.data.batching import global_batch_indices
from megatron_aligndistil.testing import run_distributed
from megatron_aligndistil.train.metrics import read_metrics
from train_fixtures import dpo_argv, make_setup_with_pairs, run_train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup_with_pairs(str(tmp_path_factory.mktemp("dpo")))


def dense_dpo_loss(setup, reverse, beta=0.1, global_batch=8, seed=1234):
    """Iteration 1's DPO loss and reward metrics (means over pairs) from the HF policy and
    reference (the "dpo" model), float64 sums."""
    from transformers import AutoModelForCausalLM

    pol = AutoModelForCausalLM.from_pretrained(setup["hf_policy"], dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(setup["hf_dpo"], dtype=torch.float32).eval()
    records = [json.loads(line) for line in open(setup["pairs"])]
    batch = [records[i] for i in global_batch_indices(len(records), 0, global_batch, seed)]

    def logp(model, prompt, response):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids[:, :-1]).logits[0].double(), -1)
        tgt = ids[0, 1:]
        return lp.gather(-1, tgt[:, None]).squeeze(-1)[len(prompt) - 1:].sum()

    losses, chosen, rejected = [], [], []
    for r in batch:
        c, j = (r["rejected_ids"], r["chosen_ids"]) if reverse else (r["chosen_ids"], r["rejected_ids"])
        chosen.append(beta * (logp(pol, r["prompt_ids"], c) - logp(ref, r["prompt_ids"], c)))
        rejected.append(beta * (logp(pol, r["prompt_ids"], j) - logp(ref, r["prompt_ids"], j)))
        losses.append(-F.logsigmoid(chosen[-1] - rejected[-1]))
    chosen, rejected = torch.stack(chosen), torch.stack(rejected)
    return {"loss": float(torch.stack(losses).mean()), "chosen_reward": float(chosen.mean()),
            "rejected_reward": float(rejected.mean()), "reward_accuracy": float((chosen > rejected).double().mean())}


@pytest.mark.parametrize("reverse", [False, True], ids=["dpo", "reverse"])
def test_dpo_first_loss_matches_dense_reference(setup, tmp_path, reverse):
    extra = ["--ref-load", setup["dpo"]] + (["--reverse"] if reverse else [])
    if reverse:  # the reference model streamed from host memory: the same loss
        extra.append("--offload-frozen-models")
    expected = dense_dpo_loss(setup, reverse)
    assert abs(expected["loss"] - 0.6931) > 1e-3  # policy != reference: a non-trivial margin
    assert 0 < expected["reward_accuracy"] < 1  # a mix, so a wrong count shows
    layouts = [("tp2pp2", 4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])]
    if not reverse:  # data parallelism once is enough; packed pairs (issue 17) against the same reference
        layouts.append(("dp2_packed", 2, ["--pack-sequences"]))
    for name, world, layout in layouts:
        save = str(tmp_path / name)
        assert run_distributed(run_train, world, args=(dpo_argv(setup, save, *extra, *layout, iters=1),),
                               timeout=600) == [0] * world
        m = read_metrics(os.path.join(save, "metrics.jsonl"))[0]
        for field in ("loss", "reward_accuracy", "chosen_reward", "rejected_reward"):
            assert m[field] == pytest.approx(expected[field], rel=1e-4, abs=1e-7), (name, field)
        for field in ("tokens", "lr", "grad_norm"):
            assert field in m


def _eval(model, other, data):
    from megatron_aligndistil.train.evaluate import reward_accuracy

    return reward_accuracy(model, other, data, tp=2, micro_batch_size=3)


def _eval_all(pairs_of_models, data):
    """Several reward-accuracy evaluations in one launch (each sets up its own layout)."""
    return [_eval(model, other, data) for model, other in pairs_of_models]


def test_reward_accuracy_of_dpo_and_reverse_dpo_on_the_same_pairs(setup, tmp_path):
    runs = {}
    for name, extra in (("dpo", []), ("rev", ["--reverse"])):
        runs[name] = str(tmp_path / name)
        argv = dpo_argv(setup, runs[name], *extra, iters=8)
        assert run_distributed(run_train, 2, args=(argv,), timeout=600) == [0, 0]
    # 4 ranks at TP2: two data-parallel halves of the pairs, 16 pairs in micro-batches of 3
    dpo, rev, contrast = run_distributed(_eval_all, 4, args=([(runs["dpo"], setup["policy"]),
                                                              (runs["rev"], setup["policy"]),
                                                              (runs["dpo"], runs["rev"])], setup["pairs"]))[0]
    assert dpo["pairs"] == rev["pairs"] == 16
    assert dpo["reward_accuracy"] > 0.75  # DPO prefers the chosen responses
    assert rev["reward_accuracy"] < 0.25  # reverse DPO, on the same pairs, the rejected ones
    assert contrast["reward_accuracy"] >= dpo["reward_accuracy"] and contrast["margin"] > dpo["margin"]
