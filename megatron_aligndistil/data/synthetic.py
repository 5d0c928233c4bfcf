"""Small, deterministic, real-looking preference data and a tiny chat tokenizer (no download).

``train_tokenizer`` serves the quickstart and the alignment benchmark (on the gold world of
``eval/world.py``); ``preference_records`` is the tests' small fixture data (preprocessing, tiny
tokenizers). Records follow the UltraFeedback-binarized layout:
``{"prompt": str, "chosen": [messages], "rejected": [messages]}`` with user/assistant turns. The
chosen answer is correct and helpful, the rejected one wrong or curt, so a DPO model can learn a
real preference in a few CPU minutes.
"""

from __future__ import annotations

import random

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
_ANIMALS = ["cat", "dog", "owl", "fox", "horse", "rabbit"]


def _example(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(2, 30), rng.randrange(2, 30)
        prompt = f"What is {a} plus {b}?"
        chosen = f"{a} plus {b} is {a + b}."
        rejected = rng.choice([f"{a} plus {b} is {a + b + rng.randrange(1, 5)}.", "I don't know."])
    elif kind == 1:
        animal, color = rng.choice(_ANIMALS), rng.choice(_COLORS)
        prompt = f"Write one short sentence about a {color} {animal}."
        chosen = f"The {color} {animal} rested quietly in the warm sun."
        rejected = rng.choice(["No.", f"{animal} {animal} {animal}."])
    else:
        n = rng.randrange(3, 9)
        words = rng.sample(_ANIMALS + _COLORS, k=min(n, 6))
        prompt = "Sort these words alphabetically: " + ", ".join(words) + "."
        chosen = "Sorted: " + ", ".join(sorted(words)) + "."
        rejected = rng.choice(["Sorted: " + ", ".join(reversed(sorted(words))) + ".", "Sort them yourself."])
    return prompt, chosen, rejected


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` records in the UltraFeedback-binarized layout."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, chosen, rejected = _example(rng)
        user = {"role": "user", "content": prompt}
        out.append({"prompt": prompt, "chosen": [user, {"role": "assistant", "content": chosen}],
                    "rejected": [user, {"role": "assistant", "content": rejected}]})
    return out


def train_tokenizer(texts, vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Qwen's chat special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def corpus(records) -> list[str]:
    """Texts to train a tokenizer on: every turn, with the chat markup."""
    texts = []
    for r in records:
        for key in ("chosen", "rejected"):
            texts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in r[key]]
    return texts
