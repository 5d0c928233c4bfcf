"""A gold-judged preference world: small enough for a 4-layer, 128-wide model, exact to judge.

Every prompt belongs to one of four task families; each has one rule a response must follow, and
``judge(prompt, response)`` checks it exactly (1.0 correct, 0.0 wrong, whatever the wrong is):

========  ==========================================  =====================================
family    prompt                                      correct response (a subtle wrong one)
========  ==========================================  =====================================
color     ``Describe the red fox.``                   ``The red fox sleeps.`` (another colour;
                                                      any verb of VERBS is fine)
repeat    ``Say owl three times.``                    ``owl owl owl.`` (one copy more or less)
last      ``Which word is last: cat, red, owl?``      ``The last word is owl.`` (an earlier word)
order     ``Put fox before blue.``                    ``fox then blue.`` (the two swapped)
========  ==========================================  =====================================

Wrong answers differ from the correct one in one token (two for ``order``, one position for
``repeat``): the token-level credit assignment AlignDistil claims to do better than DPO. Prompts
are split once, by a hash of their text, into training and held-out sets, so evaluation prompts
are never seen in training. :func:`make_world` writes, in the UltraFeedback-binarized layout that
``tools/preprocess_data.py`` reads:

* ``sft``: responses correct with probability ``sft_correct`` and subtly wrong otherwise, so an
  SFT model writes both and its gold rate is well below 1 (there is something to align);
* ``pairs``: chosen correct, rejected subtly wrong, with a ``label_noise`` fraction swapped;
* ``heldout_pairs`` (reward accuracy) and ``heldout_prompts`` (``{"instruction", "family"}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["cat", "dog", "owl", "fox", "horse", "rabbit", "bear", "duck", "frog", "wolf"]
VERBS = ["sleeps", "runs", "sings", "waits", "jumps", "eats"]
WORDS = COLORS + ANIMALS  # the repeat / last / order families draw from these
COUNTS = {"two": 2, "three": 3, "four": 4}
FAMILIES = ("color", "repeat", "last", "order")

_PATTERNS = {
    "color": re.compile(r"Describe the (\w+) (\w+)\."),
    "repeat": re.compile(r"Say (\w+) (two|three|four) times\."),
    "last": re.compile(r"Which word is last: (\w+), (\w+), (\w+)\?"),
    "order": re.compile(r"Put (\w+) before (\w+)\."),
}


# ----------------------------------------------------------------------------- the rules
def family_of(prompt: str) -> tuple[str, tuple] | None:
    """(family, parsed slots) of a prompt text (searched, so chat markup around it is fine)."""
    for name, pattern in _PATTERNS.items():
        m = pattern.search(prompt)
        if m:
            return name, m.groups()
    return None


def correct_response(prompt: str, rng: random.Random | None = None) -> str:
    """A correct response (``color`` picks its verb with ``rng``, else the first verb)."""
    family, slots = _parse(prompt)
    if family == "color":
        verb = (rng or random.Random(0)).choice(VERBS) if rng else VERBS[0]
        return f"The {slots[0]} {slots[1]} {verb}."
    if family == "repeat":
        return " ".join([slots[0]] * COUNTS[slots[1]]) + "."
    if family == "last":
        return f"The last word is {slots[2]}."
    return f"{slots[0]} then {slots[1]}."


def wrong_response(prompt: str, rng: random.Random, like: str | None = None) -> str:
    """A subtly wrong response: one token (``order``: two) away from a correct one (``like``:
    the correct response to stay close to; ``color`` keeps its verb)."""
    family, slots = _parse(prompt)
    if family == "color":
        color = rng.choice([c for c in COLORS if c != slots[0]])
        verb = like.strip(".").split()[-1] if like else rng.choice(VERBS)
        return f"The {color} {slots[1]} {verb}."
    if family == "repeat":
        k = COUNTS[slots[1]] + rng.choice([-1, 1])
        return " ".join([slots[0]] * k) + "."
    if family == "last":
        return f"The last word is {rng.choice(slots[:2])}."
    return f"{slots[1]} then {slots[0]}."


def judge(prompt: str, response: str) -> float:
    """1.0 if ``response`` follows the rule of ``prompt``'s family exactly, else 0.0.

    ``response`` is compared after stripping surrounding whitespace; anything else (a missing
    period, an extra word, a wrong slot) is wrong. Prompts of no family raise ValueError.
    """
    family, slots = _parse(prompt)
    text = response.strip()
    if family == "color":
        m = re.fullmatch(r"The (\w+) (\w+) (\w+)\.", text)
        return float(bool(m) and m.group(1) == slots[0] and m.group(2) == slots[1] and m.group(3) in VERBS)
    return float(text == correct_response(prompt))


def _parse(prompt: str) -> tuple[str, tuple]:
    found = family_of(prompt)
    if found is None:
        raise ValueError(f"prompt {prompt[:80]!r} belongs to no task family of the gold world")
    return found


# ----------------------------------------------------------------------------- prompts and data
def all_prompts() -> list[str]:
    """Every prompt of the world, in a fixed order."""
    out = [f"Describe the {c} {a}." for c in COLORS for a in ANIMALS]
    out += [f"Say {w} {k} times." for w in WORDS for k in COUNTS]
    out += [f"Which word is last: {a}, {b}, {c}?" for a in WORDS for b in WORDS for c in WORDS
            if len({a, b, c}) == 3]
    out += [f"Put {a} before {b}." for a in WORDS for b in WORDS if a != b]
    return out


def _prompt_hash(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")


def split_prompts(heldout_fraction: float) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(training, held-out) prompts per family: in each family the ``heldout_fraction`` of its
    prompts with the smallest text hash are held out (fixed, seed-independent, disjoint)."""
    train: dict[str, list[str]] = {f: [] for f in FAMILIES}
    held: dict[str, list[str]] = {f: [] for f in FAMILIES}
    for p in all_prompts():
        train[family_of(p)[0]].append(p)
    for f in FAMILIES:
        ranked = sorted(train[f], key=_prompt_hash)
        cut = max(1, round(heldout_fraction * len(ranked)))
        held[f], train[f] = sorted(ranked[:cut]), sorted(ranked[cut:])
    return train, held


@dataclass
class WorldConfig:
    seed: int = 0
    sft_records: int = 2048
    pair_records: int = 1024
    heldout_prompts_per_family: int = 32
    heldout_pairs: int = 256
    sft_correct: float = 0.5  # share of SFT responses that are correct
    label_noise: float = 0.1  # share of preference pairs with chosen and rejected swapped
    heldout_fraction: float = 0.25


def _sample_prompts(pool: dict[str, list[str]], n: int, rng: random.Random) -> list[str]:
    """``n`` prompts, families in turn (balanced), each drawn uniformly from its pool."""
    return [rng.choice(pool[FAMILIES[i % len(FAMILIES)]]) for i in range(n)]


def _record(prompt: str, chosen: str, rejected: str, family: str) -> dict:
    user = {"role": "user", "content": prompt}
    return {"prompt": prompt, "family": family, "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}]}


def make_world(cfg: WorldConfig) -> dict[str, list[dict]]:
    """The world's text data sets (deterministic in ``cfg``); see the module docstring."""
    rng = random.Random(cfg.seed)
    train_pool, held_pool = split_prompts(cfg.heldout_fraction)

    sft = []
    for p in _sample_prompts(train_pool, cfg.sft_records, rng):
        good = correct_response(p, rng)
        bad = wrong_response(p, rng, like=good)
        response = good if rng.random() < cfg.sft_correct else bad
        sft.append(_record(p, response, bad if response == good else good, family_of(p)[0]))

    def pairs(pool, n, noise):
        out = []
        for p in _sample_prompts(pool, n, rng):
            chosen = correct_response(p, rng)
            rejected = wrong_response(p, rng, like=chosen)
            if rng.random() < noise:
                chosen, rejected = rejected, chosen
            out.append(_record(p, chosen, rejected, family_of(p)[0]))
        return out

    heldout = []
    for f in FAMILIES:
        pool = held_pool[f]
        heldout += [{"instruction": p, "family": f}
                    for p in random.Random(cfg.seed + 1).sample(pool, min(cfg.heldout_prompts_per_family, len(pool)))]
    return {"sft": sft, "pairs": pairs(train_pool, cfg.pair_records, cfg.label_noise),
            "heldout_pairs": pairs(held_pool, cfg.heldout_pairs, 0.0), "heldout_prompts": heldout}


def write_world(cfg: WorldConfig, out_dir: str) -> dict[str, str]:
    """Write :func:`make_world`'s sets as ``<out_dir>/<name>.jsonl`` plus ``world.json``; returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, records in make_world(cfg).items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=2)
    return paths


def corpus() -> list[str]:
    """Texts to train the world's tokenizer on: every prompt and every response shape."""
    rng = random.Random(0)
    texts = []
    for p in all_prompts()[::3] + all_prompts()[:80]:
        good = correct_response(p, rng)
        for resp in (good, wrong_response(p, rng, like=good)):
            texts.append(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{resp}<|im_end|>\n")
    return texts
