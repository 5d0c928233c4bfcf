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
