"""Gold-judged preference worlds: small enough for a 4-layer, 128-wide model, exact to judge.

Every prompt belongs to one task family; each family has one rule a response must follow, and
``judge(prompt, response)`` checks it exactly (1.0 correct, 0.0 wrong, whatever the wrong is).
The families' prompt shapes are distinct, so one judge serves every world:

========  ==========================================  =====================================
family    prompt                                      correct response (a subtle wrong one)
========  ==========================================  =====================================
color     ``Describe the red fox.``                   ``The red fox sleeps.`` (another colour;
                                                      any verb of VERBS is fine)
repeat    ``Say owl three times.``                    ``owl owl owl.`` (one copy more or less)
last      ``Which word is last: cat, red, owl?``      ``The last word is owl.`` (an earlier word)
order     ``Put fox before blue.``                    ``fox then blue.`` (the two swapped)
story     ``Tell the day of the red fox.``            four sentences, 30 tokens, each naming
                                                      the red fox (one names another colour)
list      ``List owl, red, cat, fox.``                ``First owl, then red, then cat, then
                                                      fox. That makes four.`` (two neighbours
                                                      swapped, or a wrong count)
========  ==========================================  =====================================

A *world* (:data:`WORLDS`) is a set of families and a way of making preference data:

* ``rules``: color / repeat / last / order, wrong answers one token away (two for ``order``),
  10% of the preference labels flipped: the token-level credit assignment AlignDistil claims;
* ``steps``: story / list, 13-30 token answers whose credit sits on one or two tokens;
* ``trap``: color / last / order with half of the wrong answers a correct answer followed by an
  extra sentence (the rejected answer is longer), 25% of the labels flipped: a length trap under
  heavy preference noise.

Prompts are split once, by a hash of their text, into training, validation and test prompts, so
neither set of evaluation prompts is ever seen in training and choosing hyper-parameters on the
validation prompts never looks at the test prompts. :func:`make_world` writes, in the
UltraFeedback-binarized layout that ``tools/preprocess_data.py`` reads:

* ``sft``: responses correct with probability ``sft_correct`` and wrong otherwise, so an SFT
  model writes both and its gold rate is well below 1 (there is something to align);
* ``pairs``: chosen correct, rejected wrong, with a ``label_noise`` fraction swapped;
* ``heldout_pairs`` (reward accuracy, test prompts), ``heldout_prompts`` (test) and
  ``validation_prompts``, each ``{"instruction", "family"}``.
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
WORDS = COLORS + ANIMALS  # the repeat / last / order / list families draw from these
COUNTS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
TIMES = [("In the morning", "wakes"), ("At noon", "eats"), ("In the evening", "sings"), ("At night", "sleeps")]
EXTRAS = ["That is all.", "I hope this helps.", "It is easy."]  # the ``trap`` world's longer wrong answers
FAMILIES = ("color", "repeat", "last", "order", "story", "list")

_PATTERNS = {
    "color": re.compile(r"Describe the (\w+) (\w+)\."),
    "repeat": re.compile(r"Say (\w+) (two|three|four) times\."),
    "last": re.compile(r"Which word is last: (\w+), (\w+), (\w+)\?"),
    "order": re.compile(r"Put (\w+) before (\w+)\."),
    "story": re.compile(r"Tell the day of the (\w+) (\w+)\."),
    "list": re.compile(r"List (\w+(?:, \w+){2,4})\."),
}


@dataclass(frozen=True)
class WorldConfig:
    """One world's data. ``kind`` picks its families (:data:`KIND_FAMILIES`); ``verbose_share``:
    share of wrong answers that are a correct answer plus an extra sentence (else one-token wrong)."""

    kind: str = "rules"
    seed: int = 0
    sft_records: int = 2048
    pair_records: int = 1024
    heldout_prompts_per_family: int = 32
    validation_prompts_per_family: int = 16
    heldout_pairs: int = 256
    sft_correct: float = 0.5  # share of SFT responses that are correct
    label_noise: float = 0.1  # share of preference pairs with chosen and rejected swapped
    verbose_share: float = 0.0
    heldout_fraction: float = 0.25  # test prompts: this share of each family, by text hash
    validation_fraction: float = 0.125  # validation prompts: the next share by text hash

    def __post_init__(self):
        if self.kind not in KIND_FAMILIES:
            raise ValueError(f"world kind {self.kind!r}: have {sorted(KIND_FAMILIES)}")

    @property
    def families(self) -> tuple:
        return KIND_FAMILIES[self.kind]


KIND_FAMILIES = {"rules": ("color", "repeat", "last", "order"), "steps": ("story", "list"),
                 "trap": ("color", "last", "order")}
WORLDS = {"rules": WorldConfig(), "steps": WorldConfig(kind="steps"),
          "trap": WorldConfig(kind="trap", label_noise=0.25, verbose_share=0.5)}


# ----------------------------------------------------------------------------- the rules
def family_of(prompt: str) -> tuple[str, tuple] | None:
    """(family, parsed slots) of a prompt text (searched, so chat markup around it is fine)."""
    for name, pattern in _PATTERNS.items():
        m = pattern.search(prompt)
        if m:
            slots = tuple(m.group(1).split(", ")) if name == "list" else m.groups()
            return name, slots
    return None


def _count_word(n: int) -> str:
    return next(w for w, k in COUNTS.items() if k == n)


def _story(color: str, animal: str, colors=None) -> str:
    colors = colors or [color] * len(TIMES)
    return " ".join(f"{when} the {c} {animal} {verb}." for (when, verb), c in zip(TIMES, colors))


def _list(words) -> str:
    return "First " + ", then ".join(words) + f". That makes {_count_word(len(words))}."


def correct_response(prompt: str, rng: random.Random | None = None) -> str:
    """A correct response (``color`` picks its verb with ``rng``, else the first verb)."""
    family, slots = _parse(prompt)
    if family == "color":
        verb = rng.choice(VERBS) if rng else VERBS[0]
        return f"The {slots[0]} {slots[1]} {verb}."
    if family == "repeat":
        return " ".join([slots[0]] * COUNTS[slots[1]]) + "."
    if family == "last":
        return f"The last word is {slots[2]}."
    if family == "order":
        return f"{slots[0]} then {slots[1]}."
    if family == "story":
        return _story(*slots)
    return _list(slots)


def wrong_response(prompt: str, rng: random.Random, like: str | None = None, verbose: bool = False) -> str:
    """A wrong response. Subtle (default): one token (``order``, ``list``: two) away from a
    correct one (``like``: the correct response to stay close to; ``color`` keeps its verb).
    ``verbose``: a correct response followed by an extra sentence (longer, and wrong)."""
    family, slots = _parse(prompt)
    if verbose:
        return f"{like or correct_response(prompt, rng)} {rng.choice(EXTRAS)}"
    if family == "color":
        color = rng.choice([c for c in COLORS if c != slots[0]])
        verb = like.strip(".").split()[-1] if like else rng.choice(VERBS)
        return f"The {color} {slots[1]} {verb}."
    if family == "repeat":
        k = COUNTS[slots[1]] + rng.choice([-1, 1])
        return " ".join([slots[0]] * k) + "."
    if family == "last":
        return f"The last word is {rng.choice(slots[:2])}."
    if family == "order":
        return f"{slots[1]} then {slots[0]}."
    if family == "story":
        colors = [slots[0]] * len(TIMES)
        colors[rng.randrange(len(TIMES))] = rng.choice([c for c in COLORS if c != slots[0]])
        return _story(slots[0], slots[1], colors)
    words = list(slots)
    if rng.random() < 0.5:  # two neighbours swapped
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
        return _list(words)
    n = len(words) + rng.choice([-1, 1])  # the right items, a wrong count
    return "First " + ", then ".join(words) + f". That makes {_count_word(n)}."


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


def check_world_prompts(items: list[dict], path: str, hint: str) -> None:
    """Refuse prompt items (``{"instruction": ...}`` from ``path``) that belong to no family, before
    any model is built; ``hint`` ends the message (what to use for real data)."""
    from ..core.errors import UserError

    for i, it in enumerate(items):
        if family_of(it["instruction"]) is None:
            raise UserError(f"{path}: prompt {i} ({it['instruction'][:60]!r}) is not a gold-world prompt; {hint}")


def _parse(prompt: str) -> tuple[str, tuple]:
    found = family_of(prompt)
    if found is None:
        raise ValueError(f"prompt {prompt[:80]!r} belongs to no task family of the gold worlds")
    return found


# ----------------------------------------------------------------------------- prompts and data
def family_prompts(family: str) -> list[str]:
    """Every prompt of one family, in a fixed order (``list``: a fixed sample of 3000 lists of
    3-5 distinct words)."""
    if family == "color":
        return [f"Describe the {c} {a}." for c in COLORS for a in ANIMALS]
    if family == "repeat":
        return [f"Say {w} {k} times." for w in WORDS for k in ("two", "three", "four")]
    if family == "last":
        return [f"Which word is last: {a}, {b}, {c}?" for a in WORDS for b in WORDS for c in WORDS
                if len({a, b, c}) == 3]
    if family == "order":
        return [f"Put {a} before {b}." for a in WORDS for b in WORDS if a != b]
    if family == "story":
        return [f"Tell the day of the {c} {a}." for c in COLORS for a in ANIMALS]
    if family == "list":
        rng, seen = random.Random(7), set()
        while len(seen) < 3000:
            seen.add(tuple(rng.sample(WORDS, rng.randint(3, 5))))
        return [f"List {', '.join(words)}." for words in sorted(seen)]
    raise ValueError(f"no family {family!r} (have {FAMILIES})")


def all_prompts(families=FAMILIES) -> list[str]:
    """Every prompt of ``families``, in a fixed order."""
    return [p for f in families for p in family_prompts(f)]


def _prompt_hash(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")


def split_prompts(heldout_fraction: float, validation_fraction: float = 0.0, families=FAMILIES) -> tuple[dict, ...]:
    """(training, test, validation) prompts per family: in each family the ``heldout_fraction``
    of its prompts with the smallest text hash are test prompts, the next ``validation_fraction``
    validation prompts, the rest training prompts (fixed, seed-independent, disjoint)."""
    train, test, val = {}, {}, {}
    for f in families:
        ranked = sorted(family_prompts(f), key=_prompt_hash)
        cut = max(1, round(heldout_fraction * len(ranked)))
        cut_val = cut + (max(1, round(validation_fraction * len(ranked))) if validation_fraction > 0 else 0)
        test[f], val[f], train[f] = sorted(ranked[:cut]), sorted(ranked[cut:cut_val]), sorted(ranked[cut_val:])
    return train, test, val


def _sample_prompts(pool: dict[str, list[str]], n: int, rng: random.Random) -> list[str]:
    """``n`` prompts, families in turn (balanced), each drawn uniformly from its pool."""
    families = list(pool)
    return [rng.choice(pool[families[i % len(families)]]) for i in range(n)]


def _record(prompt: str, chosen: str, rejected: str, family: str) -> dict:
    user = {"role": "user", "content": prompt}
    return {"prompt": prompt, "family": family, "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}]}


def make_world(cfg: WorldConfig) -> dict[str, list[dict]]:
    """The world's text data sets (deterministic in ``cfg``); see the module docstring."""
    rng = random.Random(cfg.seed)
    train_pool, test_pool, val_pool = split_prompts(cfg.heldout_fraction, cfg.validation_fraction, cfg.families)

    def wrong(p, good):
        return wrong_response(p, rng, like=good, verbose=rng.random() < cfg.verbose_share)

    sft = []
    for p in _sample_prompts(train_pool, cfg.sft_records, rng):
        good = correct_response(p, rng)
        bad = wrong(p, good)
        response = good if rng.random() < cfg.sft_correct else bad
        sft.append(_record(p, response, bad if response == good else good, family_of(p)[0]))

    def pairs(pool, n, noise):
        out = []
        for p in _sample_prompts(pool, n, rng):
            chosen = correct_response(p, rng)
            rejected = wrong(p, chosen)
            if rng.random() < noise:
                chosen, rejected = rejected, chosen
            out.append(_record(p, chosen, rejected, family_of(p)[0]))
        return out

    def prompts(pool, per_family, salt):
        return [{"instruction": p, "family": f} for f in cfg.families
                for p in random.Random(cfg.seed + salt).sample(pool[f], min(per_family, len(pool[f])))]

    return {"sft": sft, "pairs": pairs(train_pool, cfg.pair_records, cfg.label_noise),
            "heldout_pairs": pairs(test_pool, cfg.heldout_pairs, 0.0),
            "heldout_prompts": prompts(test_pool, cfg.heldout_prompts_per_family, 1),
            "validation_prompts": prompts(val_pool, cfg.validation_prompts_per_family, 2)}


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


def corpus(families=FAMILIES) -> list[str]:
    """Texts to train a world's tokenizer on: prompts and every response shape of ``families``."""
    rng = random.Random(0)
    texts = []
    for f in families:
        ps = family_prompts(f)
        for p in ps[::max(1, len(ps) // 300)] + ps[:20]:
            good = correct_response(p, rng)
            for resp in (good, wrong_response(p, rng, like=good), wrong_response(p, rng, like=good, verbose=True)):
                texts.append(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{resp}<|im_end|>\n")
    return texts
