"""Issue 14: the gold world's judge, data and intervals (no models)."""

import random

import pytest

from megatron_aligndistil.eval import world as W
from megatron_aligndistil.eval.stats import mean_ci, per_cluster_means, wilson_interval

KNOWN = [  # (prompt, response, gold) for every family: correct, and each way of being wrong
    ("Describe the red fox.", "The red fox sleeps.", 1.0),
    ("Describe the red fox.", "The red fox jumps.", 1.0),
    ("Describe the red fox.", "  The red fox runs.\n", 1.0),  # surrounding whitespace is fine
    ("Describe the red fox.", "The blue fox sleeps.", 0.0),  # wrong colour
    ("Describe the red fox.", "The red owl sleeps.", 0.0),  # wrong animal
    ("Describe the red fox.", "The fox sleeps.", 0.0),  # colour dropped
    ("Describe the red fox.", "The red fox flies.", 0.0),  # verb not in VERBS
    ("Describe the red fox.", "The red fox sleeps", 0.0),  # no period
    ("Say owl three times.", "owl owl owl.", 1.0),
    ("Say owl three times.", "owl owl.", 0.0),
    ("Say owl three times.", "owl owl owl owl.", 0.0),
    ("Say owl two times.", "owl owl.", 1.0),
    ("Say cat four times.", "cat cat cat cat.", 1.0),
    ("Say cat four times.", "cat cat cat dog.", 0.0),
    ("Which word is last: cat, red, owl?", "The last word is owl.", 1.0),
    ("Which word is last: cat, red, owl?", "The last word is cat.", 0.0),
    ("Which word is last: cat, red, owl?", "The last word is red.", 0.0),
    ("Which word is last: cat, red, owl?", "owl", 0.0),
    ("Put fox before blue.", "fox then blue.", 1.0),
    ("Put fox before blue.", "blue then fox.", 0.0),
    ("Put fox before blue.", "fox then fox.", 0.0),
]


@pytest.mark.parametrize("prompt,response,gold", KNOWN)
def test_judge_on_known_responses(prompt, response, gold):
    assert W.judge(prompt, response) == gold
    # the judge also finds the task inside a chat rendering of the prompt
    assert W.judge(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", response) == gold


def test_generated_responses_are_judged_right_in_every_family():
    rng = random.Random(0)
    seen = set()
    for prompt in W.all_prompts()[::7]:
        family = W.family_of(prompt)[0]
        seen.add(family)
        good = W.correct_response(prompt, rng)
        bad = W.wrong_response(prompt, rng, like=good)
        assert W.judge(prompt, good) == 1.0 and W.judge(prompt, bad) == 0.0, (prompt, good, bad)
        # a subtle wrong answer: one word differs (order: the two swapped, repeat: one copy more/less)
        g, b = good.rstrip(".").split(), bad.rstrip(".").split()
        if family in ("color", "last"):
            assert len(g) == len(b) and sum(x != y for x, y in zip(g, b)) == 1
        elif family == "order":
            assert sorted(g) == sorted(b) and g != b
        else:
            assert abs(len(g) - len(b)) == 1 and set(g) == set(b)
    assert seen == set(W.FAMILIES)
    with pytest.raises(ValueError, match="no task family"):
        W.judge("What is the capital of France?", "Paris.")


def test_world_data_is_deterministic_disjoint_and_mixed():
    cfg = W.WorldConfig(sft_records=800, pair_records=600, label_noise=0.2, sft_correct=0.4)
    a, b = W.make_world(cfg), W.make_world(cfg)
    assert a == b
    held = {p["instruction"] for p in a["heldout_prompts"]} | {r["prompt"] for r in a["heldout_pairs"]}
    train = {r["prompt"] for r in a["sft"] + a["pairs"]}
    assert held and train and not held & train
    assert {p["family"] for p in a["heldout_prompts"]} == set(W.FAMILIES)
    sft_gold = sum(W.judge(r["prompt"], r["chosen"][1]["content"]) for r in a["sft"]) / len(a["sft"])
    assert abs(sft_gold - 0.4) < 0.06  # correct and subtly wrong SFT answers, mixed as configured
    flipped = sum(W.judge(r["prompt"], r["chosen"][1]["content"]) == 0 for r in a["pairs"]) / len(a["pairs"])
    assert abs(flipped - 0.2) < 0.05  # label noise
    assert all(W.judge(r["prompt"], r["chosen"][1]["content"]) == 1 for r in a["heldout_pairs"])
    assert all(W.judge(r["prompt"], r["rejected"][1]["content"]) == 0 for r in a["heldout_pairs"])


def test_confidence_intervals_on_fixed_cases():
    ci = mean_ci([0.0, 1.0, 1.0, 1.0])
    # mean 0.75, sample sd 0.5, se 0.25 -> 0.75 +- 0.49, clipped at 1
    assert ci["mean"] == 0.75 and ci["n"] == 4
    assert ci["lo"] == pytest.approx(0.75 - 1.959964 * 0.25, abs=1e-6) and ci["hi"] == 1.0
    assert mean_ci([0.5])["lo"] == mean_ci([0.5])["hi"] == 0.5
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # textbook Wilson interval for 8/10
    # samples of one prompt are one cluster: 3 prompts with K = 2 samples each
    assert per_cluster_means([1, 1, 0, 1, 0, 0], [0, 0, 1, 1, 2, 2]) == [1.0, 0.5, 0.0]
