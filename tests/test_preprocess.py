"""Issue 6: preference text -> tokenized JSONL; records decode to the chat-formatted text."""

import json

import pytest

from hf_fixtures import tiny_tokenizer
from megatron_aligndistil.data.preprocess import RecordError, preprocess
from megatron_aligndistil.data.synthetic import preference_records


def test_records_decode_back_to_the_chat_formatted_text(tmp_path):
    tok = tiny_tokenizer()
    records = preference_records(40, seed=5)
    report = preprocess(records, tok, str(tmp_path / "p"), progress=False)
    assert report.kept == 40 and report.total == 40
    pairs = [json.loads(line) for line in open(tmp_path / "p_pairs.jsonl")]
    chosen = [json.loads(line) for line in open(tmp_path / "p_chosen.jsonl")]
    prompts = [json.loads(line) for line in open(tmp_path / "p_prompts.jsonl")]
    assert len(pairs) == len(chosen) == len(prompts) == 40
    for rec, pair, ch, pr in zip(records, pairs, chosen, prompts):
        text = tok.apply_chat_template(rec["chosen"], tokenize=False)
        assert tok.decode(pair["prompt_ids"] + pair["chosen_ids"]) == text.rstrip("\n")
        assert tok.decode(pair["prompt_ids"] + pair["rejected_ids"]) == \
            tok.apply_chat_template(rec["rejected"], tokenize=False).rstrip("\n")
        assert tok.decode(pair["prompt_ids"]).endswith("<|im_start|>assistant\n")
        assert pair["chosen_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert ch == {"prompt_ids": pair["prompt_ids"], "response_ids": pair["chosen_ids"]}
        assert pr == {"prompt_ids": pair["prompt_ids"]}


def test_bad_records_are_reported_with_their_index(tmp_path):
    tok = tiny_tokenizer()
    good = preference_records(3, seed=1)
    missing = {"prompt": "x", "chosen": good[0]["chosen"]}
    empty = {"prompt": "x", "chosen": [good[0]["chosen"][0], {"role": "assistant", "content": "  "}],
             "rejected": good[0]["rejected"]}
    roles = {"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
             "rejected": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "c"}]}
    long = dict(good[1], chosen=[good[1]["chosen"][0], {"role": "assistant", "content": "word " * 400}])
    def content(value):
        return dict(good[0], chosen=[good[0]["chosen"][0], {"role": "assistant", "content": value}])
    parts = content([{"type": "text", "text": "hi"}])  # OpenAI-style parts
    records = [good[0], missing, empty, roles, long, good[2], content(7), parts, content(None), ["not", "an object"]]
    report = preprocess(records, tok, str(tmp_path / "p"), max_length=200, progress=False)
    assert report.kept == 2
    problems = dict(report.examples)
    assert "missing field 'rejected'" in problems[1]
    assert "empty turn" in problems[2]
    assert "wrong roles" in problems[3]
    assert "too long" in problems[4]
    assert "message 1 (assistant) has int content" in problems[6]
    assert "has list content (OpenAI-style parts" in problems[7]
    assert "has null content" in problems[8]
    assert "not an object" in problems[9]
    assert json.load(open(tmp_path / "p_report.json"))["dropped"] == {
        "missing field 'rejected'": 1, "empty turn": 1, "wrong roles": 1, "too long": 1, "content not a string": 3,
        "not an object": 1}
    with pytest.raises(RecordError, match="record 1: missing field"):
        preprocess(records, tok, str(tmp_path / "q"), strict=True, progress=False)


def test_every_record_dropped_is_an_error_with_the_reason(tmp_path):
    """A base tokenizer (eos <|endoftext|>, not the chat end-of-turn): no silent empty output."""
    tok = tiny_tokenizer()
    tok.eos_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else tok.pad_token
    with pytest.raises(RecordError, match="no record kept of 4.*is not the chat template's end-of-turn token"):
        preprocess(preference_records(4, seed=2), tok, str(tmp_path / "p"), progress=False)
    assert not list(tmp_path.iterdir())  # no empty files left behind


def test_preprocess_tool_names_the_file_line_and_the_tokenizer(tmp_path, capsys):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import preprocess_data

    tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(preference_records(1)[0]) + "\n\n" + '{"chosen": [}\n')
    out = ["--output-prefix", str(tmp_path / "o")]
    assert preprocess_data.main(["--input", str(bad), "--tokenizer", str(tmp_path / "tok"), *out]) == 2
    assert f"error: {bad}:3: malformed JSON" in capsys.readouterr().err
    assert preprocess_data.main(["--input", str(bad), "--tokenizer", str(tmp_path / "missing"), *out]) == 2
    assert f"--tokenizer {tmp_path / 'missing'}: no such directory" in capsys.readouterr().err


def test_preprocess_tool_reads_a_saved_dataset(tmp_path):
    import os
    import sys

    import datasets

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import preprocess_data

    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(preference_records(12))}).save_to_disk(
        str(tmp_path / "ds"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    assert preprocess_data.main(["--input", str(tmp_path / "ds"), "--tokenizer", str(tmp_path / "tok"),
                                 "--output-prefix", str(tmp_path / "out" / "uf")]) == 0
    assert sum(1 for _ in open(tmp_path / "out" / "uf_pairs.jsonl")) == 12


def _pair(messages, rejected_text, **extra):
    return {"chosen": messages, "rejected": messages[:-1] + [{"role": "assistant", "content": rejected_text}], **extra}


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}], ids=["default", "no_thinking"])
def test_every_field_of_every_output_with_the_real_qwen3_tokenizer(tmp_path, kwargs):
    """Issue 27: each field of pairs / chosen / prompts, in JSONL and indexed, is checked against
    the chat template's own rendering of its conversation (not only one field of one file); the
    records keep the input order; dropped records are named in the report."""
    from hf_fixtures import CONVERSATIONS, qwen3_tokenizer
    from megatron_aligndistil.data.indexed import read_indexed
    from megatron_aligndistil.data.records import KINDS

    tok = qwen3_tokenizer()
    records = [_pair(m, f"Not {m[-1]['content'].lower()} but something longer, {name}.")
               for name, m in CONVERSATIONS.items()]
    records.insert(2, _pair(CONVERSATIONS["system"], "A cherry."))  # no preference: dropped
    records.insert(4, _pair(CONVERSATIONS["unicode"], "Hallo!", score_chosen=7.5, score_rejected=7.5))  # a tie
    prefix = str(tmp_path / "q")
    report = preprocess(records, tok, prefix, progress=False, chat_template_kwargs=kwargs)
    kept = [r for i, r in enumerate(records) if i not in (2, 4)]
    assert json.load(open(prefix + "_report.json")) == {
        "total": len(records), "kept": len(kept), "dropped": {"no preference": 1, "tie": 1},
        "first_problems": ["record 2: no preference: the chosen and rejected responses are identical",
                           "record 4: tie: score_chosen equals score_rejected (7.5)"],
        "chat_template_kwargs": kwargs}
    eot = tok.convert_tokens_to_ids("<|im_end|>")

    def through_eot(messages):
        full = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        return full[: full.rindex("<|im_end|>") + len("<|im_end|>")]

    files = {name: [json.loads(line) for line in open(f"{prefix}_{name}.jsonl")]
             for name in ("pairs", "chosen", "prompts")}
    for name, kind in (("pairs", "dpo"), ("chosen", "distill"), ("prompts", "prompt")):
        assert all(list(r) == list(KINDS[kind]) for r in files[name]), name  # exactly the kind's fields
        indexed = read_indexed(f"{prefix}_{name}", kind, len(tok))
        assert [indexed.records[i] for i in range(len(indexed))] == files[name], name
    for rec, pair, chosen, prompt in zip(kept, files["pairs"], files["chosen"], files["prompts"], strict=True):
        generation = tok.apply_chat_template(rec["chosen"][:-1], add_generation_prompt=True, tokenize=True,
                                             return_dict=True, **kwargs)["input_ids"]
        assert pair["prompt_ids"] == generation
        assert tok.decode(pair["prompt_ids"] + pair["chosen_ids"]) == through_eot(rec["chosen"])
        assert tok.decode(pair["prompt_ids"] + pair["rejected_ids"]) == through_eot(rec["rejected"])
        assert pair["chosen_ids"][-1] == pair["rejected_ids"][-1] == eot
        assert eot not in pair["chosen_ids"][:-1] and eot not in pair["rejected_ids"][:-1]
        assert chosen == {"prompt_ids": pair["prompt_ids"], "response_ids": pair["chosen_ids"]}
        assert prompt == {"prompt_ids": pair["prompt_ids"]}


@pytest.mark.parametrize("scores,reason", [((8.0, 7.0), None), ((7.0, 7.0), "tie"), ((7.0, 8.0), "inverted pair"),
                                           ((float("nan"), 7.0), "bad score"), ((7.0, float("inf")), "bad score"),
                                           ((True, 0), "bad score"), ((8, 7.999), None)])
def test_preference_scores_at_the_tie(tmp_path, scores, reason):
    tok = tiny_tokenizer()
    good = preference_records(2, seed=3)
    rec = dict(good[1], score_chosen=scores[0], score_rejected=scores[1])
    report = preprocess([good[0], rec], tok, str(tmp_path / "s"), progress=False)
    assert report.kept == (2 if reason is None else 1)
    assert report.dropped == ({} if reason is None else {reason: 1})


@pytest.mark.parametrize("limit", ["max_prompt_length", "max_length"])
def test_length_limits_keep_an_exact_fit_and_drop_one_token_more(tmp_path, limit):
    from megatron_aligndistil.data.preprocess import split_conversation

    tok = tiny_tokenizer()
    rec = preference_records(1, seed=4)[0]
    prompt, chosen = split_conversation(tok, rec["chosen"])
    _, rejected = split_conversation(tok, rec["rejected"])
    size = len(prompt) if limit == "max_prompt_length" else len(prompt) + max(len(chosen), len(rejected))
    assert preprocess([rec], tok, str(tmp_path / "fit"), progress=False, **{limit: size}).kept == 1
    with pytest.raises(RecordError, match=rf"record 0: (prompt too long|too long): {size} > {size - 1} tokens"):
        preprocess([rec], tok, str(tmp_path / "over"), progress=False, strict=True, **{limit: size - 1})


def test_a_tokenizer_whose_ids_have_gaps_is_written_in_a_dtype_that_holds_its_largest_id(tmp_path):
    """300 tokens, one of them id 70,000: ``len(tokenizer)`` would pick uint16 and overflow."""
    from transformers import AutoTokenizer

    from megatron_aligndistil.data.indexed import read_indexed

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    moved = max(vocab, key=vocab.get)
    vocab[moved] = 70_000
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 300 and max(tok.get_vocab().values()) == 70_000
    records = [r for r in preference_records(40, seed=2)
               if 70_000 in tok.apply_chat_template(r["chosen"], tokenize=True, return_dict=True)["input_ids"]]
    assert records  # the moved token occurs in the data
    preprocess(records, tok, str(tmp_path / "g"), progress=False)
    got = read_indexed(str(tmp_path / "g_pairs"), "dpo", 70_001)
    want = [json.loads(line) for line in open(tmp_path / "g_pairs.jsonl")]
    assert [got.records[i] for i in range(len(got))] == want
    assert any(70_000 in r["chosen_ids"] + r["prompt_ids"] for r in want)
