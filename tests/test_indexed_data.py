"""Issue 16 item 3: tokenized records in Megatron's indexed-dataset format (.bin/.idx).

The trainers read ``--data-path PREFIX`` exactly as they read the JSONL file it was written with;
Megatron's own reader reads the files; damaged files are refused with the file named."""

import json
import os
import shutil

import numpy as np
import pytest

from megatron_aligndistil.data.indexed import IndexedWriter, read_indexed
from megatron_aligndistil.data import read_records
from megatron_aligndistil.data.records import KINDS, DataError, read_jsonl

VOCAB = 70_000  # past uint16: ids stored as int32


def _records(n=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(0, VOCAB, int(rng.integers(lo, hi))).tolist()  # noqa: E731
    return [{"prompt_ids": ids(1, 9), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7)} for _ in range(n)]


def _write(tmp_path, records, kind="dpo", name="pairs", vocab=VOCAB):
    """``records`` as JSONL and as an indexed dataset; returns (jsonl path, prefix)."""
    fields = KINDS[kind]
    prefix = str(tmp_path / name)
    writer = IndexedWriter(prefix, kind, vocab)
    with open(prefix + ".jsonl", "w") as f:
        for r in records:
            rec = {k: r[k if k != "response_ids" else "chosen_ids"] for k in fields}
            f.write(json.dumps(rec) + "\n")
            writer.add(rec)
    writer.commit()
    return prefix + ".jsonl", prefix


@pytest.mark.parametrize("kind", ["dpo", "distill", "prompt"])
def test_indexed_records_equal_the_jsonl_ones_and_megatron_reads_the_files(tmp_path, kind):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    jsonl, prefix = _write(tmp_path, _records(), kind)
    assert sorted(os.listdir(tmp_path)) == sorted(f"pairs{s}" for s in (".bin", ".idx", ".jsonl"))
    want = read_jsonl(jsonl, kind, VOCAB, max_tokens=30)
    for path in (prefix, prefix + ".bin", prefix + ".idx"):  # the prefix, or either file, names it
        got = read_records(path, kind, VOCAB, max_tokens=30)
        assert len(got) == len(want) == 40 and not got.skipped
        assert [got.records[i] for i in range(len(got))] == want.records
        assert got.records[3:9:2] == want.records[3:9:2]
    megatron = IndexedDataset(prefix)
    assert megatron.index.dtype == np.int32 and len(megatron.document_indices) == 41
    assert megatron[len(KINDS[kind])].tolist() == want.records[1]["prompt_ids"]
    # on-policy prompts come from any layout's first sequence
    assert read_records(prefix, "prompt", VOCAB).records[5] == {"prompt_ids": want.records[5]["prompt_ids"]}


def test_checks_and_skips_match_jsonl(tmp_path):
    records = _records()
    records[4]["chosen_ids"] = []  # empty field
    records[7]["rejected_ids"] = list(range(40))  # too long
    records[9]["prompt_ids"][1] = VOCAB + 3  # outside the vocabulary
    records[12]["rejected_ids"][0] = VOCAB + 9
    jsonl, prefix = _write(tmp_path, records, vocab=VOCAB + 10)
    with pytest.raises(DataError, match=rf"{prefix}: record 4: field 'chosen_ids' is empty"):
        read_records(prefix, "dpo", VOCAB, max_tokens=30)
    want = read_jsonl(jsonl, "dpo", VOCAB, max_tokens=30, skip_bad=True)
    got = read_records(prefix, "dpo", VOCAB, max_tokens=30, skip_bad=True)
    assert got.skipped == want.skipped and sum(got.skipped.values()) == 4
    assert [got.records[i] for i in range(len(got))] == want.records
    records[4]["chosen_ids"], records[7]["rejected_ids"] = [1], [1]
    _, prefix = _write(tmp_path, records, name="ids", vocab=VOCAB + 10)
    with pytest.raises(DataError, match=rf"{prefix}: record 9: field 'prompt_ids' has token id {VOCAB + 3} outside "
                                        rf"the vocabulary \[0, {VOCAB}\)"):
        read_records(prefix, "dpo", VOCAB)
    with pytest.raises(DataError, match=rf"{prefix}: record 12: field 'rejected_ids' has token id {VOCAB + 9}"):
        read_records(prefix, "dpo", VOCAB + 5)


def test_damaged_files_are_refused_naming_the_file(tmp_path):
    _, prefix = _write(tmp_path, _records())
    _, other = _write(tmp_path, _records(seed=1), name="other")
    with pytest.raises(DataError, match=rf"{prefix}.idx: record 0 has 3 sequences, but distill data has 2 "
                                        r"\(prompt_ids, response_ids\); this file holds prompt/chosen/rejected \(DPO\)"):
        read_records(prefix, "distill", VOCAB)

    def damaged(name, change):
        d = tmp_path / name
        d.mkdir()
        for s in (".bin", ".idx"):
            shutil.copy(prefix + s, d / f"pairs{s}")
        change(str(d / "pairs"))
        return str(d / "pairs")

    def truncate(path, keep):
        with open(path, "r+b") as f:
            f.truncate(keep)

    p = damaged("short_bin", lambda p: truncate(p + ".bin", os.path.getsize(p + ".bin") - 8))
    with pytest.raises(DataError, match=rf"{p}.bin: \d+ bytes, but {p}.idx describes \d+ \(a truncated .bin"):
        read_records(p, "dpo", VOCAB)
    p = damaged("swapped", lambda p: shutil.copy(other + ".bin", p + ".bin"))
    with pytest.raises(DataError, match=rf"{p}.bin: \d+ bytes, but {p}.idx describes \d+ \((a truncated .bin|not the "
                                        r"\.bin of this \.idx)"):
        read_records(p, "dpo", VOCAB)
    p = damaged("short_idx", lambda p: truncate(p + ".idx", 100))
    with pytest.raises(DataError, match=rf"{p}.idx: truncated \(100 bytes; its header announces 120 sequences in "
                                        r"40 documents\)"):
        read_records(p, "dpo", VOCAB)
    p = damaged("not_idx", lambda p: open(p + ".idx", "wb").write(b'{"prompt_ids": [1]}\n'))
    with pytest.raises(DataError, match=rf"{p}.idx: not a Megatron indexed-dataset index"):
        read_records(p, "dpo", VOCAB)
    p = damaged("no_bin", lambda p: os.remove(p + ".bin"))
    with pytest.raises(DataError, match=rf"{p}.bin not found: --data-path {p} names an indexed dataset"):
        read_records(p, "dpo", VOCAB)


def test_preprocessing_writes_both_formats_with_the_same_records(tmp_path):
    from hf_fixtures import tiny_tokenizer
    from megatron_aligndistil.data.preprocess import preprocess
    from megatron_aligndistil.data.synthetic import preference_records

    tok = tiny_tokenizer()
    prefix = str(tmp_path / "uf")
    preprocess(preference_records(12), tok, prefix, progress=False)
    for name, kind in (("pairs", "dpo"), ("chosen", "distill"), ("prompts", "prompt")):
        want = read_jsonl(f"{prefix}_{name}.jsonl", kind, len(tok))
        got = read_indexed(f"{prefix}_{name}", kind, len(tok))
        assert [got.records[i] for i in range(len(got))] == want.records and len(want) == 12
        assert np.fromfile(f"{prefix}_{name}.bin", dtype=np.uint16).size > 0  # 300 ids: uint16
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
