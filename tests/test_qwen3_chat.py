"""Issue 16 item 1: the real Qwen3 tokenizer and chat template, with and without thinking.

Preprocessing splits each conversation into prompt ids (what generation sees) and response ids
(through ``<|im_end|>``); ``chat_template_kwargs`` reach the template and the report, and the
tools read them back. The tokenizer lives in ``../shared/data/qwen3-tokenizer`` (not in the repo);
the tests skip where it is absent."""

import json
import os

import pytest

from megatron_aligndistil.core.errors import UserError
from megatron_aligndistil.data.preprocess import preprocess, split_conversation, template_kwargs_arg
from megatron_aligndistil.eval.policy_eval import render_prompts
from hf_fixtures import CODE, CONVERSATIONS, qwen3_tokenizer

THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking_default", "enable_thinking_false"])
def test_split_matches_generation_time_rendering_and_decodes_to_the_chat_text(tok, thinking):
    kwargs = {} if thinking else {"enable_thinking": False}
    assert len(tok) == 151669 and tok.convert_tokens_to_ids("<|im_end|>") == 151645
    for name, messages in CONVERSATIONS.items():
        prompt_ids, response_ids = split_conversation(tok, messages, kwargs)
        # the prompt is what generation feeds the model for this history
        generation = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                             return_dict=True, **kwargs)["input_ids"]
        assert prompt_ids == generation, name
        if len(messages) == 2:  # single turn: the evaluator's / generate.py's rendering too
            assert render_prompts([{"instruction": messages[0]["content"]}], tok, kwargs)[0] == prompt_ids, name
        # prompt + response is the chat rendering through the last <|im_end|>
        full = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        through_eot = full[: full.rindex("<|im_end|>") + len("<|im_end|>")]
        assert tok.decode(prompt_ids + response_ids) == through_eot, name
        assert response_ids[-1] == 151645, name
        # what the trained response holds in each mode (docs/training.md)
        response = tok.decode(response_ids)
        content = messages[-1]["content"] + "<|im_end|>"
        if thinking:  # the template puts an empty think block in the last assistant turn
            assert response == THINK + content and not tok.decode(prompt_ids).endswith(THINK), name
        else:  # the block moves into the generation prompt; the response is the answer alone
            assert response == content and tok.decode(prompt_ids).endswith(THINK), name


def test_template_kwargs_are_recorded_and_read_back(tok, tmp_path):
    records = [{"prompt": m[0]["content"], "chosen": m, "rejected": m[:-1] + [{"role": "assistant", "content": "No."}]}
               for m in CONVERSATIONS.values()]
    prefix = str(tmp_path / "uf")
    report = preprocess(records, tok, prefix, progress=False, chat_template_kwargs={"enable_thinking": False})
    assert report.kept == len(records)
    saved = json.load(open(prefix + "_report.json"))
    assert saved["chat_template_kwargs"] == {"enable_thinking": False}
    first = json.loads(open(prefix + "_chosen.jsonl").readline())
    assert tok.decode(first["prompt_ids"]).endswith(THINK)  # rendered without thinking
    assert template_kwargs_arg(prefix + "_report.json") == {"enable_thinking": False}
    assert template_kwargs_arg('{"enable_thinking": false}') == {"enable_thinking": False}
    assert template_kwargs_arg(None) == {}
    for bad, message in (("{enable_thinking: false}", r"--chat-template-kwargs \(not a file\): malformed JSON"),
                         ("[1, 2]", "a JSON object is needed"),
                         (prefix + "_chosen.jsonl", "not a preprocessing report")):
        with pytest.raises(UserError, match=message):
            template_kwargs_arg(bad)
