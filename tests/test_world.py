"""Issue 14: the gold world's judge, data and intervals (no models)."""

import random
from dataclasses import replace

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
    ("Describe the red fox.", "The red fox sleeps. That is all.", 0.0),  # the trap world's longer wrong answer
    ("Tell the day of the red fox.", "In the morning the red fox wakes. At noon the red fox eats. In the evening "
     "the red fox sings. At night the red fox sleeps.", 1.0),
    ("Tell the day of the red fox.", "In the morning the red fox wakes. At noon the red fox eats. In the evening "
     "the red fox sings. At night the blue fox sleeps.", 0.0),  # one colour of four wrong
    ("Tell the day of the red fox.", "In the morning the red fox wakes. At noon the red fox eats.", 0.0),
    ("List owl, red, cat.", "First owl, then red, then cat. That makes three.", 1.0),
    ("List owl, red, cat.", "First owl, then cat, then red. That makes three.", 0.0),  # neighbours swapped
    ("List owl, red, cat.", "First owl, then red, then cat. That makes four.", 0.0),  # wrong count
    ("List owl, red, cat, fox, dog.", "First owl, then red, then cat, then fox, then dog. That makes five.", 1.0),
]


@pytest.mark.parametrize("prompt,response,gold", KNOWN)
def test_judge_on_known_responses(prompt, response, gold):
    assert W.judge(prompt, response) == gold
    # the judge also finds the task inside a chat rendering of the prompt
    assert W.judge(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", response) == gold


def test_generated_responses_are_judged_right_in_every_family():
    rng = random.Random(0)
    seen = set()
    for family in W.FAMILIES:
        for prompt in W.family_prompts(family)[::7]:
            assert W.family_of(prompt)[0] == family
            seen.add(family)
            good = W.correct_response(prompt, rng)
            bad = W.wrong_response(prompt, rng, like=good)
            verbose = W.wrong_response(prompt, rng, like=good, verbose=True)
            assert W.judge(prompt, good) == 1.0 and W.judge(prompt, bad) == 0.0, (prompt, good, bad)
            assert W.judge(prompt, verbose) == 0.0 and verbose.startswith(good + " ") and len(verbose) > len(good)
            # a subtle wrong answer: one word differs (order, list: two neighbours swapped; repeat: one copy more/less)
            g, b = good.rstrip(".").split(), bad.rstrip(".").split()
            if family in ("color", "last", "story"):
                assert len(g) == len(b) and sum(x != y for x, y in zip(g, b)) == 1
            elif family == "order":
                assert sorted(g) == sorted(b) and g != b
            elif family == "list":
                diff = [i for i, (x, y) in enumerate(zip(g, b)) if x != y]
                assert len(g) == len(b) and (len(diff) == 1 and diff[0] == len(g) - 1 or len(diff) == 2)
            else:
                assert abs(len(g) - len(b)) == 1 and set(g) == set(b)
    assert seen == set(W.FAMILIES)
    with pytest.raises(ValueError, match="no task family"):
        W.judge("What is the capital of France?", "Paris.")


@pytest.mark.parametrize("kind", sorted(W.WORLDS))
def test_every_world_splits_prompts_three_ways(kind):
    """Training, validation and test prompts are disjoint in every world, every family has all three,
    and the split is a function of the prompt text alone (the same in every world and seed)."""
    cfg = W.WORLDS[kind]
    data = W.make_world(replace(cfg, sft_records=400, pair_records=300))
    test = {p["instruction"] for p in data["heldout_prompts"]} | {r["prompt"] for r in data["heldout_pairs"]}
    val = {p["instruction"] for p in data["validation_prompts"]}
    train = {r["prompt"] for r in data["sft"] + data["pairs"]}
    assert test and val and train and not test & val and not test & train and not val & train
    for name in ("heldout_prompts", "validation_prompts"):
        assert {p["family"] for p in data[name]} == set(cfg.families)
    assert {W.family_of(p)[0] for p in train} == set(cfg.families)
    other = W.make_world(replace(cfg, sft_records=400, pair_records=300, seed=5))
    _, test_pool, val_pool = W.split_prompts(cfg.heldout_fraction, cfg.validation_fraction, cfg.families)
    from collections import Counter

    for name, pool, per in (("heldout_prompts", test_pool, cfg.heldout_prompts_per_family),
                            ("validation_prompts", val_pool, cfg.validation_prompts_per_family)):
        assert Counter(p["family"] for p in data[name]) == {f: min(per, len(pool[f])) for f in cfg.families}
    assert (cfg.heldout_prompts_per_family, cfg.validation_prompts_per_family) == (32, 16)
    for d in (data, other):
        assert all(p["instruction"] in test_pool[p["family"]] for p in d["heldout_prompts"])
        assert all(p["instruction"] in val_pool[p["family"]] for p in d["validation_prompts"])


def test_the_trap_world_has_longer_rejected_answers_and_heavier_noise():
    data = W.make_world(replace(W.WORLDS["trap"], pair_records=2000))
    pairs = [(r["prompt"], r["chosen"][1]["content"], r["rejected"][1]["content"]) for r in data["pairs"]]
    correct_chosen = [(p, c, r) for p, c, r in pairs if W.judge(p, c) == 1]
    flipped = 1 - len(correct_chosen) / len(pairs)
    assert abs(flipped - 0.25) < 0.03  # label noise 25%
    longer = sum(r.startswith(c + " ") for _, c, r in correct_chosen) / len(correct_chosen)
    assert abs(longer - 0.5) < 0.04  # half the wrong answers are the right one plus a sentence
    assert all(W.judge(p, r) == 0 for p, _, r in correct_chosen)
    rules = W.make_world(replace(W.WORLDS["rules"], pair_records=500))
    assert not any(W.judge(r["prompt"], r["rejected"][1]["content"]) == 0 and
                   r["rejected"][1]["content"].startswith(r["chosen"][1]["content"] + " ") for r in rules["pairs"])


def test_steps_world_answers_are_long_and_the_credit_sits_on_one_or_two_tokens():
    from megatron_aligndistil.data.synthetic import train_tokenizer

    tok = train_tokenizer(W.corpus(W.KIND_FAMILIES["steps"]), vocab_size=512)
    data = W.make_world(replace(W.WORLDS["steps"], pair_records=200))
    lengths, differing = [], []
    for r in data["pairs"]:
        a, b = (tok(r[k][1]["content"])["input_ids"] for k in ("chosen", "rejected"))
        lengths.append(len(a))
        differing.append(sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b)))
    assert min(lengths) >= 13 and max(lengths) >= 30  # list answers 13-19 tokens, story answers 30
    assert max(differing) <= 2 and min(differing) >= 1


def test_world_data_is_deterministic_disjoint_and_mixed():
    cfg = W.WorldConfig(sft_records=800, pair_records=600, label_noise=0.2, sft_correct=0.4)
    with pytest.raises(ValueError, match="world kind 'nope'"):
        W.WorldConfig(kind="nope")
    a, b = W.make_world(cfg), W.make_world(cfg)
    assert a == b
    held = {p["instruction"] for p in a["heldout_prompts"]} | {r["prompt"] for r in a["heldout_pairs"]}
    train = {r["prompt"] for r in a["sft"] + a["pairs"]}
    assert held and train and not held & train
    assert {p["family"] for p in a["heldout_prompts"]} == set(W.KIND_FAMILIES["rules"])
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


PINNED = {  # sha256 (first 16 hex) of each world's evaluation prompts, one per line: the benchmark's tables
    ("rules", "heldout_prompts"): "c609066476a63800",  # the 98 test prompts of the earlier protocol too
    ("rules", "validation_prompts"): "3a7888b47a34e79c",
    ("steps", "heldout_prompts"): "fb3dcd602303f386",
    ("steps", "validation_prompts"): "5210b2a32aeb71a9",
    ("trap", "heldout_prompts"): "cc924507fad48f63",
    ("trap", "validation_prompts"): "764d8408763e0591",
}


@pytest.mark.parametrize("kind,name", sorted(PINNED))
def test_evaluation_prompts_are_pinned(kind, name):
    """The published tables were judged on these prompts: a change to the split, the sampling or the
    families shows up here, not as silently different numbers."""
    import hashlib

    prompts = [p["instruction"] for p in W.make_world(W.WORLDS[kind])[name]]
    assert hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16] == PINNED[(kind, name)]


def test_the_tokenizer_corpus_has_every_answer_shape_of_its_families():
    for kind, families in W.KIND_FAMILIES.items():
        texts = W.corpus(families)
        assert {W.family_of(t)[0] for t in texts} == set(families)
        assert any(e in t for t in texts for e in W.EXTRAS)  # the trap's longer wrong answers
        responses = [t.split("assistant\n")[1].split("<|im_end|>")[0] for t in texts]
        prompts = [t.split("user\n")[1].split("<|im_end|>")[0] for t in texts]
        judged = [W.judge(p, r) for p, r in zip(prompts, responses)]
        assert 0 < sum(judged) < len(judged)  # correct and wrong answers both


def test_prompts_of_no_family_are_refused_naming_file_and_index():
    from megatron_aligndistil.core.errors import UserError

    W.check_world_prompts([{"instruction": "List owl, red, cat."}], "p.jsonl", "hint")  # a family: fine
    with pytest.raises(UserError, match=r"^p.jsonl: prompt 1 \('Write a poem.'\) is not a gold-world prompt; use X$"):
        W.check_world_prompts([{"instruction": "Say owl two times."}, {"instruction": "Write a poem."}], "p.jsonl",
                              "use X")
