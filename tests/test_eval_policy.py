"""Issue 14: the policy evaluator (tools/eval_policy.py) and the reward-model judge.

The evaluator gives identical greedy (and seeded sampled) outputs from a Megatron checkpoint at
TP2 PP2 and from its HF export, equal to transformers' greedy decoding; KL of a model from
itself is 0; the reward-model judge and win rates on a tiny random reward model.
"""

import json
import os
import sys

import pytest
import torch

from megatron_aligndistil.eval.world import corpus
from megatron_aligndistil.testing import run_distributed

PROMPTS = ["Describe the red fox.", "Say owl three times.", "Which word is last: cat, red, owl?",
           "Put fox before blue.", "Describe the blue duck."]


def _tool(argv):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import eval_policy

    return eval_policy.main(argv)


def hf_greedy_text(hf, tok, instruction: str, max_new_tokens: int) -> str:
    """transformers' greedy decoding of ``instruction`` in the chat template, as the evaluator's text
    (over the tokenizer's ids: the embedding rows past them are never sampled)."""
    ids = tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    gen = hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id, suppress_tokens=list(range(len(tok), hf.config.vocab_size)))
    return tok.decode([t for t in gen[0, ids.shape[1]:].tolist() if t != tok.eos_token_id], skip_special_tokens=True)


def _save_tiny_reward_model(path, tok):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=448, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    Qwen2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """A tiny random Qwen2 with the gold world's tokenizer: converted checkpoint + its HF export."""
    from hf_fixtures import tiny_hf_model
    from megatron_aligndistil.convert.hf import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_aligndistil.data.synthetic import train_tokenizer

    root = tmp_path_factory.mktemp("evalpolicy")
    tok = train_tokenizer(corpus(), vocab_size=400)
    model = tiny_hf_model("qwen2", tied=True, vocab_size=448, seed=3)
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(root / "hf_src")
    tok.save_pretrained(root / "hf_src")
    mcore = convert_hf_to_megatron(str(root / "hf_src"), str(root / "mcore"), progress=False)
    export = convert_megatron_to_hf(mcore, str(root / "hf_export"), progress=False)
    other = tiny_hf_model("qwen2", tied=True, vocab_size=448, seed=4)  # a different "DPO model"
    other.config.eos_token_id = tok.eos_token_id
    other.save_pretrained(root / "hf_other")
    tok.save_pretrained(root / "hf_other")
    _save_tiny_reward_model(root / "rm", tok)
    with open(root / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"instruction": p, "family": "x"}) + "\n" for p in PROMPTS)
    return {"root": root, "mcore": mcore, "hf": export, "other": str(root / "hf_other"), "prompts": str(root / "prompts.jsonl"), "tok": tok}


def test_megatron_tp2_pp2_and_hf_export_give_identical_outputs(world_model):
    from transformers import AutoModelForCausalLM

    m = world_model
    out = str(m["root"] / "eval.json")
    argv = ["--", f"--policy=mcore={m['mcore']}", f"--policy=hf={m['hf']}", "--prompts", m["prompts"],
            "--ref-load", m["hf"], "--dpo-load", m["other"], "--samples-per-prompt", "3", "--max-new-tokens", "6",
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--out", out,
            "--plot", str(m["root"] / "eval.png"), "--reward-model", str(m["root"] / "rm"), "--baseline", "mcore"]
    assert run_distributed(_tool, 4, args=(argv,), timeout=400) == [0, 0, 0, 0]
    res = {p["name"]: p for p in json.load(open(out))["policies"]}
    assert res["mcore"]["greedy_outputs"] == res["hf"]["greedy_outputs"]
    assert res["mcore"]["sample_outputs"] == res["hf"]["sample_outputs"]  # same seeds, same weights
    # reward-model judge through the CLI: identical samples tie everywhere -> win rate exactly 0.5
    assert res["mcore"]["win"]["mean"] == res["hf"]["win"]["mean"] == 0.5
    assert res["mcore"]["reward_mean"] == pytest.approx(res["hf"]["reward_mean"])
    for r in res.values():  # the same weights as the reference: KL exactly 0 up to float error
        assert abs(r["kl_from_ref"]) < 1e-4
        assert r["prompts"] == len(PROMPTS) and len(r["per_prompt_gold"]) == len(PROMPTS)
        assert r["gold"]["lo"] <= r["gold_rate"] <= r["gold"]["hi"]
    # transformers' own greedy decoding of the HF export gives the same texts
    tok = m["tok"]
    hf = AutoModelForCausalLM.from_pretrained(m["hf"], dtype=torch.float32).eval()
    assert res["hf"]["greedy_outputs"] == [hf_greedy_text(hf, tok, p, 6) for p in PROMPTS]
    # KL from another model: mean over samples of log pi(y|x) - log other(y|x), from transformers
    other = AutoModelForCausalLM.from_pretrained(m["other"], dtype=torch.float32).eval()
    diffs = []
    for k, resp in enumerate(res["hf"]["sample_response_ids"]):
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[k // 3]}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        x = torch.tensor([ids + resp])
        with torch.no_grad():
            lp = [torch.log_softmax(mdl(x).logits[0, len(ids) - 1: -1, : len(tok)].double(), -1)
                  .gather(-1, torch.tensor(resp)[:, None]).sum() for mdl in (hf, other)]
        diffs.append(float(lp[0] - lp[1]))
    assert res["hf"]["kl_from_dpo"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-3)
    assert max(abs(d) for d in diffs) > 0.1 and abs(res["hf"]["kl_from_dpo"]) > 0.01  # not a trivial zero
    assert (m["root"] / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_non_world_prompts_are_refused_before_any_model_is_built(world_model, tmp_path):
    bad = tmp_path / "real.jsonl"
    bad.write_text(json.dumps({"instruction": "Describe the red fox."}) + "\n"
                   + json.dumps({"instruction": "Write a poem about GPUs."}) + "\n")
    argv = [f"--policy=a={world_model['mcore']}", "--prompts", str(bad)]
    assert run_distributed(_tool, 1, args=(argv,), timeout=200) == [2]
    assert run_distributed(_tool, 1, args=(argv + ["--judge", "none", "--samples-per-prompt", "1",
                                                   "--max-new-tokens", "2"],), timeout=200) == [0]


def test_a_reward_model_with_non_finite_tensors_is_refused_naming_them(tmp_path):
    """A reward model whose loaded weights or buffers hold NaN/inf would score every response NaN:
    refused when loaded, naming the tensors (not later, as 'the reward model scored ... nan')."""
    from safetensors.torch import load_file, save_file

    from megatron_aligndistil.core.errors import UserError
    from megatron_aligndistil.data.synthetic import train_tokenizer
    from megatron_aligndistil.eval.reward_model import RewardModelJudge

    tok = train_tokenizer(corpus(), vocab_size=400)
    _save_tiny_reward_model(tmp_path / "rm", tok)
    weights = load_file(tmp_path / "rm" / "model.safetensors")
    weights["score.weight"][0, 3] = float("nan")
    save_file(weights, tmp_path / "rm" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"rm: the reward model's score\.weight holds NaN or inf values after loading"):
        RewardModelJudge(str(tmp_path / "rm"))


def test_reward_model_judge_and_win_rates(tmp_path):
    from megatron_aligndistil.data.synthetic import train_tokenizer
    from megatron_aligndistil.eval.report import add_win_rates
    from megatron_aligndistil.eval.reward_model import RewardModelJudge, win_rate

    tok = train_tokenizer(corpus(), vocab_size=400)
    _save_tiny_reward_model(tmp_path / "rm", tok)
    judge = RewardModelJudge(str(tmp_path / "rm"), batch_size=2)
    responses = ["The red fox runs.", "owl owl owl.", "The last word is owl.", "fox then blue.", "no"]
    scores = judge.scores(PROMPTS, responses)
    assert scores == judge.scores(PROMPTS, responses)  # deterministic, batch-size independent below
    assert scores == pytest.approx(RewardModelJudge(str(tmp_path / "rm"), batch_size=5).scores(PROMPTS, responses),
                                   abs=1e-5)
    assert len(set(scores)) > 1  # the reward depends on the text
    idx = list(range(len(PROMPTS)))
    assert win_rate(scores, scores, idx)["mean"] == 0.5  # ties count one half
    assert win_rate([s + 1 for s in scores], scores, idx)["mean"] == 1.0
    results = [{"name": "a", "samples_per_prompt": 1, "sample_outputs": responses},
               {"name": "b", "samples_per_prompt": 1, "sample_outputs": responses[::-1]}]
    add_win_rates(results, [{"instruction": p} for p in PROMPTS], str(tmp_path / "rm"), "a")
    assert results[0]["win"]["mean"] == 0.5 and 0 <= results[1]["win"]["mean"] <= 1
    expected = win_rate(judge.scores(PROMPTS, responses[::-1]), scores, idx)["mean"]
    assert results[1]["win"]["mean"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="differ in length"):
        win_rate([1.0], [1.0, 2.0], [0])


def test_evaluator_guards(world_model, tmp_path, capsys):
    """Issue 26 item 7: a causal LM given as --reward-model (a score head that would be newly
    initialised) is refused; so is a policy whose tokenizer.json differs from the one that renders
    the prompts, and --samples-per-prompt 0 (1 is the boundary that runs)."""
    import shutil
    import sys

    from megatron_aligndistil.core.errors import UserError
    from megatron_aligndistil.eval.reward_model import RewardModelJudge

    with pytest.raises(UserError, match=r"not a trained sequence-classification reward model: score\.weight is not "
                                        r"in the checkpoint.*Qwen2ForCausalLM"):
        RewardModelJudge(world_model["other"])

    retok = tmp_path / "retokenized"
    shutil.copytree(world_model["mcore"], retok)
    tok = json.load(open(retok / "tokenizer.json"))
    tok["added_tokens"].append(dict(tok["added_tokens"][-1], id=447, content="<extra_new>"))
    json.dump(tok, open(retok / "tokenizer.json", "w"))
    argv = [f"--policy=a={world_model['mcore']}", f"--policy=b={retok}", "--prompts", world_model["prompts"],
            "--samples-per-prompt", "1", "--max-new-tokens", "2", "--no-greedy"]
    assert run_distributed(_tool, 1, args=(argv,), timeout=200) == [2]
    untokenized = tmp_path / "no_tokenizer"  # nothing to compare: evaluated with the prompts' tokenizer
    shutil.copytree(world_model["mcore"], untokenized)
    os.remove(untokenized / "tokenizer.json")
    argv[1] = f"--policy=b={untokenized}"
    assert run_distributed(_tool, 1, args=(argv + ["--judge", "none", "--out", str(tmp_path / "o.json")],),
                           timeout=200) == [0]

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import eval_policy

    with pytest.raises(SystemExit):
        eval_policy.main(argv[:1] + ["--prompts", world_model["prompts"], "--samples-per-prompt", "0"])
    assert "--samples-per-prompt must be >= 1 (got 0)" in capsys.readouterr().err
