"""Issue 27: every validator at its boundary value, one step inside and one step outside it.

Unit-level (no process launches): token ids at ``V-1``, ``V``, ``-1``, ``2^31-1`` in every storage
dtype of Megatron's indexed format and in JSONL; files truncated or extended by one byte; records
and packed rows that exactly fit; every numeric flag at the edges of its range and at +-inf / NaN
(generated from the parser's range table, not a hand list); reward ties and non-finite scores;
the degenerate-teacher and rollout-mismatch guards at their thresholds."""

import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_aligndistil.core.errors import UserError
from megatron_aligndistil.data.indexed import IndexedWriter, read_indexed
from megatron_aligndistil.data import read_records
from megatron_aligndistil.data.records import KINDS, DataError, read_jsonl

QWEN_VOCAB = 151_936  # Qwen2.5 / Qwen3 embedding rows


# ---------------------------------------------------------------------------------------------
# token ids in every storage dtype
# ---------------------------------------------------------------------------------------------

def _write_raw(prefix: str, docs: list[list[list[int]]], dtype) -> str:
    """Documents of sequences written with Megatron's builder in ``dtype`` (any of its DTypes, as
    another tool may have written them), bypassing our writer's checks."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for seqs in docs:
        builder.add_document(torch.from_numpy(np.array([t for s in seqs for t in s], dtype=dtype)),
                             [len(s) for s in seqs])
    builder.finalize(prefix + ".idx")
    return prefix


# (dtype, vocabulary size V) pairs: V as large as the dtype allows, so V-1 is storable
_ID_DTYPES = [(np.uint8, 200), (np.int8, 100), (np.int16, 30_000), (np.uint16, 65_000),
              (np.int32, QWEN_VOCAB), (np.int64, QWEN_VOCAB)]


def _bad_ids(dtype, vocab):
    """Out-of-vocabulary ids the dtype can hold: V, the dtype's max, -1 and its min (signed), 2^31-1."""
    info = np.iinfo(dtype)
    ids = {vocab, int(info.max)}
    if info.min < 0:
        ids |= {-1, int(info.min)}
    if info.max >= 2 ** 31 - 1:
        ids.add(2 ** 31 - 1)
    return sorted(ids)


@pytest.mark.parametrize("dtype,vocab", _ID_DTYPES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_indexed_ids_at_the_vocabulary_edges_in_every_storage_dtype(tmp_path, dtype, vocab):
    ok = [[[0, vocab - 1], [vocab - 1], [0]], [[1], [2], [vocab - 2]]]
    prefix = _write_raw(str(tmp_path / "ok"), ok, dtype)
    got = read_indexed(prefix, "dpo", vocab)
    assert [got.records[i] for i in range(2)] == [dict(zip(KINDS["dpo"], d)) for d in ok]
    for bad in _bad_ids(dtype, vocab):
        for field in range(3):  # the id in each field: the error names that field and the id as stored
            docs = [[list(s) for s in d] for d in ok] + [[[5], [6], [7]]]
            docs[2][field] = [3, bad] if field == 0 else [bad]
            prefix = _write_raw(str(tmp_path / f"bad_{bad}_{field}".replace("-", "m")), docs, dtype)
            with pytest.raises(DataError, match=rf"record 2: field '{KINDS['dpo'][field]}' has token id {bad} "
                                                rf"outside the vocabulary \[0, {vocab}\)"):
                read_indexed(prefix, "dpo", vocab)
            skipped = read_indexed(prefix, "dpo", vocab, skip_bad=True)
            assert len(skipped) == 2 and sum(skipped.skipped.values()) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_indexed_ids_stored_as_floats_are_refused(tmp_path, dtype):
    prefix = _write_raw(str(tmp_path / "f"), [[[1.0, 2.0], [3.0]]], dtype)
    with pytest.raises(DataError, match=rf"{prefix}.idx: token ids stored as {np.dtype(dtype).name}"):
        read_indexed(prefix, "distill", 10)


@pytest.mark.parametrize("value,ok", [(QWEN_VOCAB - 1, True), (QWEN_VOCAB, False), (-1, False),
                                      (2 ** 31 - 1, False), (2 ** 63, False), (0, True), (True, False), (1.0, False)],
                         ids=["V-1", "V", "-1", "2^31-1", "2^63", "0", "bool", "float"])
def test_jsonl_ids_at_the_vocabulary_edges(tmp_path, value, ok):
    for field in KINDS["dpo"]:
        record = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], field: [4, value]}
        path = tmp_path / f"{field}.jsonl"
        path.write_text(json.dumps({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}) + "\n"
                        + json.dumps(record) + "\n")
        if ok:
            assert read_jsonl(str(path), "dpo", QWEN_VOCAB).records[1][field] == [4, value]
            continue
        message = (rf"{path}:2: field '{field}' has token id {value} outside" if type(value) is int
                   else rf"{path}:2: field '{field}' must be a list of integer token ids")
        with pytest.raises(DataError, match=message):
            read_jsonl(str(path), "dpo", QWEN_VOCAB)


@pytest.mark.parametrize("vocab,dtype", [(255, np.uint16), (65_499, np.uint16), (65_500, np.int32),
                                         (QWEN_VOCAB, np.int32)])
def test_the_writer_picks_the_narrowest_dtype_that_holds_every_id(tmp_path, vocab, dtype):
    """Megatron's rule (uint16 below 65,500 ids) at its boundary; the largest id round-trips."""
    writer = IndexedWriter(str(tmp_path / "w"), "distill", vocab)
    writer.add({"prompt_ids": [0, vocab - 1], "response_ids": [vocab - 1]})
    writer.commit()
    assert np.fromfile(tmp_path / "w.bin", dtype=dtype).tolist() == [0, vocab - 1, vocab - 1]
    assert read_indexed(str(tmp_path / "w"), "distill", vocab).records[0]["prompt_ids"] == [0, vocab - 1]


def test_the_writer_refuses_an_id_its_dtype_cannot_hold(tmp_path):
    writer = IndexedWriter(str(tmp_path / "w"), "distill", 1000)
    with pytest.raises(DataError, match=r"token id 65536 does not fit the uint16 ids of .*w.bin \(vocabulary of 1000"):
        writer.add({"prompt_ids": [1], "response_ids": [65_536]})
    writer.abort()
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# files damaged by one byte; records that exactly fit
# ---------------------------------------------------------------------------------------------

def _pair(tmp_path, name="p", n=3):
    prefix = str(tmp_path / name)
    writer = IndexedWriter(prefix, "dpo", 1000)
    for k in range(n):
        writer.add({"prompt_ids": [1, 2, k], "chosen_ids": [3, 4], "rejected_ids": [5]})
    writer.commit()
    return prefix


@pytest.mark.parametrize("suffix,delta,message", [
    (".bin", -1, r"\.bin: 35 bytes, but .*\.idx describes 36 \(a truncated \.bin"),
    (".bin", +1, r"\.bin: 37 bytes, but .*\.idx describes 36 \(not the \.bin of this \.idx"),
    (".idx", -1, r"\.idx: truncated \(\d+ bytes; its header announces 9 sequences in 3 documents\)"),
    (".idx", +1, r"\.idx: \d+ bytes, 1 more than its header announces \(9 sequences in 3 documents\)"),
], ids=["bin-1", "bin+1", "idx-1", "idx+1"])
def test_files_one_byte_off_are_refused(tmp_path, suffix, delta, message):
    prefix = _pair(tmp_path)
    assert len(read_indexed(prefix, "dpo", 1000)) == 3  # intact: read
    size = os.path.getsize(prefix + suffix)
    with open(prefix + suffix, "r+b") as f:
        if delta < 0:
            f.truncate(size - 1)
        else:
            f.seek(0, 2)
            f.write(b"\0")
    with pytest.raises(DataError, match=message):
        read_indexed(prefix, "dpo", 1000)


@pytest.mark.parametrize("fmt", ["jsonl", "indexed"])
def test_a_record_that_exactly_fits_the_limit_is_kept_one_more_token_is_refused(tmp_path, fmt):
    """``max_tokens`` (``--seq-length`` + 1) bounds prompt + the longer response: equal is kept."""
    records = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},  # 5 tokens
               {"prompt_ids": [1, 2], "chosen_ids": [4], "rejected_ids": [6, 7, 8, 9]}]  # 6 tokens (rejected)
    prefix = str(tmp_path / "d")
    writer = IndexedWriter(prefix, "dpo", 100)
    with open(prefix + ".jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            writer.add(r)
    writer.commit()
    path = prefix + ".jsonl" if fmt == "jsonl" else prefix
    assert len(read_records(path, "dpo", 100, max_tokens=6)) == 2
    where = f"{path}:2" if fmt == "jsonl" else f"{path}: record 1"
    with pytest.raises(DataError, match=rf"{where}: 6 tokens \(prompt \+ response\) exceed the limit of 5"):
        read_records(path, "dpo", 100, max_tokens=5)
    got = read_records(path, "dpo", 100, max_tokens=5, skip_bad=True)
    assert len(got) == 1 and got.records[0]["prompt_ids"] == [1, 2, 3]


@pytest.mark.parametrize("fmt", ["jsonl", "indexed"])
def test_one_token_fields_are_kept_empty_ones_refused(tmp_path, fmt):
    prefix = str(tmp_path / "d")
    good, empty = {"prompt_ids": [1], "response_ids": [2]}, {"prompt_ids": [1], "response_ids": []}
    with open(prefix + ".jsonl", "w") as f:
        f.write(json.dumps(good) + "\n" + json.dumps(empty) + "\n")
    _write_raw(prefix, [[[1], [2]], [[1], []]], np.uint16)
    path = prefix + ".jsonl" if fmt == "jsonl" else prefix
    with pytest.raises(DataError, match="field 'response_ids' is empty"):
        read_records(path, "distill", 10)
    assert read_records(path, "distill", 10, skip_bad=True).records[0] == good


# ---------------------------------------------------------------------------------------------
# packing: rows that exactly fill
# ---------------------------------------------------------------------------------------------

def test_a_sequence_that_exactly_fills_a_row_packs_one_more_token_is_refused():
    from megatron_aligndistil.core.schedule import block_causal_mask
    from megatron_aligndistil.data.batching import build_micro_batch, pack_records

    exact = [([1, 2, 3], [4, 5, 6])]  # 5 input positions
    assert pack_records([exact], 1, 5) == [[[(0, 0)]]]
    with pytest.raises(UserError, match="a sequence of 6 input tokens does not fit --seq-length 5"):
        pack_records([[([1, 2, 3], [4, 5, 6, 7])]], 1, 5)
    # two sequences that fill a row together share it; one token more and they take two rows
    assert pack_records([[([1, 2], [3])], [([1, 2, 3], [4])]], 2, 5) == [[[(1, 0), (0, 0)], []]]
    assert pack_records([[([1, 2], [3, 9])], [([1, 2, 3], [4])]], 2, 5) == [[[(0, 0)], [(1, 0)]]]
    batch = build_micro_batch([[(0, ([1, 2], [3])), (1, ([4, 5, 6], [7]))]], seq_len=5, packed=True)
    assert batch.seq_index[0].tolist() == [0, 0, 1, 1, 1] and batch.loss_mask[0].tolist() == [0, 1, 0, 0, 1]
    allowed = ~block_causal_mask(batch)[0, 0]
    assert allowed[:2, :2].all() == allowed[:2, :2].tril().all() and not allowed[2:, :2].any()
    assert allowed.sum() == 3 + 6  # two causal blocks, no padding block
    with pytest.raises(ValueError, match="sequences of 6 input tokens exceed the row length 5"):
        build_micro_batch([[(0, ([1, 2], [3])), (1, ([4, 5, 6], [7, 8]))]], seq_len=5)


# ---------------------------------------------------------------------------------------------
# every numeric flag at the edges of its range (generated from the parser's range table)
# ---------------------------------------------------------------------------------------------

from test_config import AD, BASE  # noqa: E402 - the command lines the config tests build on

METHOD_BASE = {"sft": ["sft"] + BASE, "dpo": ["dpo"] + BASE,
               "aligndistil": AD + ["--rollout", "on-policy", "--rollout-engine", "vllm"]}


def _edge_values(action, lo, lo_inc, hi, hi_inc):
    """(value, accepted) at each bound, one step inside and one step outside it."""
    if action.type is int:
        out = [(lo, lo_inc), (lo + 1, True), (lo - 1, False)]
        if hi is not None:
            out += [(hi, hi_inc), (hi - 1, True), (hi + 1, False)]
        return out
    step_up, step_down = (lambda v: math.nextafter(v, math.inf)), (lambda v: math.nextafter(v, -math.inf))
    lo, hi = float(lo), None if hi is None else float(hi)
    out = [(lo, lo_inc), (step_up(lo), True), (step_down(lo), False)]
    if hi is not None:
        out += [(hi, hi_inc), (step_down(hi), True), (step_up(hi), False)]
    return out + [(math.nan, False), (math.inf, False), (-math.inf, False)]


def _ranges(method):
    """``{dest: (lo, lo inclusive, hi, hi inclusive)}`` of the method's flags, from the configs' fields."""
    from megatron_aligndistil.core.flags import ranges
    from megatron_aligndistil.train.arguments import CONFIGS

    return {dest: (r.lo, r.lo_inclusive, r.hi, r.hi_inclusive) for dest, r in ranges(CONFIGS[method]).items()}


def _range_cases():
    from megatron_aligndistil.train.arguments import build_parser

    methods = build_parser()._subparsers._group_actions[0].choices
    for method, parser in methods.items():
        limits = _ranges(method)
        for action in parser._actions:
            if action.dest in limits:
                for value, accepted in _edge_values(action, *limits[action.dest]):
                    yield pytest.param(method, action, value, accepted, id=f"{method}-{action.dest}={value}")


def _parse(argv):
    from megatron_aligndistil.train.arguments import parse_args

    return parse_args(argv)


@pytest.mark.parametrize("method,action,value,accepted", list(_range_cases()))
def test_every_numeric_flag_at_the_edges_of_its_range(method, action, value, accepted, capsys):
    flag = action.option_strings[0]
    argv = METHOD_BASE[method] + [f"{flag}={value!r}" if action.type is float else f"{flag}={value}"]
    if action.dest == "rollout_batch_size":  # must also equal --global-batch-size
        argv += ["--global-batch-size", str(value), "--micro-batch-size", "1"]
    if action.dest == "global_batch_size":
        argv += ["--micro-batch-size", "1"]
    if action.dest == "lr":
        argv += ["--min-lr", "0"]
    if action.dest in ("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank"):
        argv += ["--pipeline-model-parallel-size", "2"]  # virtual stages interleave a pipeline
    if accepted:
        assert getattr(_parse(argv), action.dest) == value
        return
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    shown = "--tvd-scale (--r)" if action.dest == "r" else flag
    assert f"{shown} {value} is out of range" in err, err


def test_the_range_table_covers_every_numeric_flag():
    """A numeric flag outside the table is checked by nothing but its type: each is named here
    with where its value is checked instead."""
    from megatron_aligndistil.train.arguments import build_parser

    elsewhere = {"constant_alpha": "> 0 (beta_t) or > -1 (vanilla), with the token weight (config.py)",
                 "stop_token_ids": "inside the tokenizer's ids, once the tokenizer is read (weights.check_stop_ids)"}
    for method, parser in build_parser()._subparsers._group_actions[0].choices.items():
        numeric = {a.dest for a in parser._actions if a.type in (int, float)}
        assert numeric - set(_ranges(method)) - set(elsewhere) == set(), method


@pytest.mark.parametrize("weight,value,accepted", [
    ("beta_t", 0.0, False), ("beta_t", 5e-324, True), ("beta_t", -1.0, False),
    ("vanilla", -1.0, False), ("vanilla", math.nextafter(-1.0, 0), True), ("vanilla", 0.0, True),
    ("beta_t", math.nan, False), ("vanilla", math.inf, False), ("constant", -math.inf, False)])
def test_constant_alpha_at_the_bound_of_each_token_weight(weight, value, accepted, capsys):
    argv = METHOD_BASE["aligndistil"] + ["--token-weight", weight, f"--constant-alpha={value!r}"]
    if accepted:
        assert _parse(argv).constant_alpha == value
        return
    with pytest.raises(SystemExit):
        _parse(argv)
    err = capsys.readouterr().err
    assert (f"--constant-alpha {value}" in err), err


# ---------------------------------------------------------------------------------------------
# reward ties, non-finite scores, intervals at their edges
# ---------------------------------------------------------------------------------------------

def test_win_rate_counts_an_exact_tie_as_one_half_and_refuses_non_finite_scores():
    from megatron_aligndistil.eval.reward_model import win_rate

    assert win_rate([1.0, 2.0], [1.0, 2.0], [0, 1]) == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 2}
    above = math.nextafter(1.0, 2.0)
    assert win_rate([above, 1.0], [1.0, above], [0, 1])["mean"] == 0.5  # one win, one loss
    assert win_rate([above, 1.0, 1.0], [1.0, 1.0, above], [0, 0, 0])["mean"] == 0.5  # one prompt: 1, .5, 0
    assert win_rate([-1e300], [-math.nextafter(1e300, 0)], [0])["mean"] == 0.0
    for bad in (math.nan, math.inf, -math.inf):
        for policy, baseline in (([0.0, bad], [0.0, 0.0]), ([0.0, 0.0], [bad, 0.0])):
            with pytest.raises(UserError, match=rf"the reward model scored 1 responses {bad}"):
                win_rate(policy, baseline, [0, 1])
    with pytest.raises(ValueError, match="differ in length"):
        win_rate([1.0], [1.0, 2.0], [0])


def test_intervals_at_their_edges():
    from megatron_aligndistil.eval.stats import mean_ci, per_cluster_means, wilson_interval

    assert mean_ci([0.25]) == {"mean": 0.25, "lo": 0.25, "hi": 0.25, "n": 1}  # one cluster: zero width
    both = mean_ci([0.0, 1.0])
    assert both["mean"] == 0.5 and (both["lo"], both["hi"]) == (0.0, 1.0)  # clipped to the bounds
    assert mean_ci([0.0, 1.0], bounds=None)["lo"] < 0
    assert mean_ci([1.0, 1.0]) == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 2}
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert 0 < wilson_interval(1, 1)[0] < 1
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(0, 0)
    assert per_cluster_means([1, 0, 1, 1], ["a", "b", "a", "b"]) == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------
# the training guards at their thresholds
# ---------------------------------------------------------------------------------------------

def _alignDistil_like(role="rev", constant_alpha=None):
    from megatron_aligndistil.config import AlignDistilLossConfig

    teachers = [SimpleNamespace(role="dpo", path="dpo_dir"), SimpleNamespace(role=role, path="rev_dir")]
    return SimpleNamespace(teachers=teachers, loss_config=AlignDistilLossConfig(constant_alpha=constant_alpha))


@pytest.mark.parametrize("tvd_per_token,refused", [(0.0, True), (1e-7, True), (math.nextafter(1e-7, 1), False),
                                                   (0.3, False)])
def test_identical_teachers_guard_at_its_threshold(tvd_per_token, refused):
    from megatron_aligndistil.train.aligndistil import IDENTICAL_TVD, AlignDistil

    assert IDENTICAL_TVD == 1e-7
    sums = {"tokens": 1.0, "tvd": tvd_per_token}
    if refused:
        with pytest.raises(UserError, match=r"give the same distribution at all 1 response tokens .* the token weight "
                                            r"beta0/alpha is 100"):
            AlignDistil.check_first_step(_alignDistil_like(), sums)
    else:
        AlignDistil.check_first_step(_alignDistil_like(), sums)
    AlignDistil.check_first_step(_alignDistil_like(role="ref"), sums)  # the vanilla teacher: no reverse model
    AlignDistil.check_first_step(_alignDistil_like(), {"tokens": 0.0, "tvd": 0.0})  # no response token yet
    with pytest.raises(UserError, match=r"tokens \(mean TVD 0\): the teacher is the DPO model itself\. Check"):
        AlignDistil.check_first_step(_alignDistil_like(constant_alpha=2.0), {"tokens": 3.0, "tvd": 0.0})


@pytest.mark.parametrize("bf16,limit,got,refused", [
    (False, None, 1e-3, False), (False, None, math.nextafter(1e-3, 1), True), (True, None, 5e-2, False),
    (True, None, math.nextafter(5e-2, 1), True), (False, 0.2, 0.2, False), (False, 0.2, 0.2000001, True),
    (False, None, math.nan, True), (False, None, math.inf, True), (False, None, 0.0, False)])
def test_rollout_mismatch_guard_at_its_threshold(bf16, limit, got, refused):
    from megatron_aligndistil.config import RolloutConfig
    from megatron_aligndistil.rollout.agreement import EngineDisagreement
    from megatron_aligndistil.train.loop import Trainer

    trainer = SimpleNamespace(rollout_config=RolloutConfig(engine="vllm", max_logp_diff=limit),
                              cfg=SimpleNamespace(bf16=bf16), iteration=4)
    mismatch = {"rollout_logp_diff_mean": got, "rollout_logp_diff_max": 1.0}
    if not refused:
        Trainer._check_rollout_mismatch(trainer, mismatch)
        return
    shown = limit if limit is not None else (5e-2 if bf16 else 1e-3)
    with pytest.raises(EngineDisagreement, match=rf"iteration 5: the vllm rollout engine's responses have log-probs "
                                                 rf".* past --max-rollout-logp-diff {shown:g}; stopped before"):
        Trainer._check_rollout_mismatch(trainer, mismatch)


@pytest.mark.parametrize("vocab,max_len", [(2, 2), (151_669, 24), (QWEN_VOCAB, 7)])
def test_agreement_probes_cover_both_ends_of_the_vocabulary(vocab, max_len):
    from megatron_aligndistil.rollout.agreement import probe_sequences

    seqs = probe_sequences(vocab, max_len)
    assert seqs == probe_sequences(vocab, max_len)  # the same on every rank
    ids = [t for s in seqs for t in s]
    assert min(ids) == 0 and max(ids) == vocab - 1 and all(2 <= len(s) <= max_len for s in seqs)
    assert [len(s) for s in seqs] == [min(n, max_len) for n in (7, 12, 17, 24)]


def _tokenizer_dir(tmp_path, ids: dict, added: dict) -> str:
    """A checkpoint directory holding only a tokenizer.json with these (token: id) entries."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel(ids, unk_token=next(iter(ids))))
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    data = json.loads((d / "tokenizer.json").read_text())
    data["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in added.items()]
    (d / "tokenizer.json").write_text(json.dumps(data))
    (d / "qwen_arch.json").write_text("{}")  # a converted checkpoint's marker; only the tokenizer is read
    return str(d)


@pytest.mark.parametrize("vocab_size,ok", [(10, True), (9, False), (200, True)])
def test_the_tokenizers_ids_are_its_largest_id_plus_one_gaps_included(tmp_path, vocab_size, ok):
    """A tokenizer whose ids have gaps: its id space is its largest id + 1, not its token count."""
    from megatron_aligndistil.core.weights import tokenizer_vocab_size

    path = _tokenizer_dir(tmp_path, {"a": 0, "b": 1, "c": 5, "<|end|>": 9}, {"<|end|>": 9})
    arch = SimpleNamespace(vocab_size=vocab_size)
    if ok:
        assert tokenizer_vocab_size(arch, path) == 10
    else:
        with pytest.raises(UserError, match=r"tokenizer has ids up to 9, past the model's vocab_size 9"):
            tokenizer_vocab_size(arch, path)


def test_a_cleanup_that_fails_never_hides_the_write_error(tmp_path, monkeypatch):
    """A full disk inside ``writing``: the temporaries are removed as far as they can be, and the
    user sees the one-line error, not the cleanup's own OSError."""
    from megatron_aligndistil.core.errors import writing

    stuck = tmp_path / "iter_0000002.tmp"
    stuck.mkdir()
    (stuck / "shard.distcp").write_bytes(b"x")
    loose = tmp_path / "release.tmp"
    loose.write_bytes(b"y")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "busy")

    monkeypatch.setattr(os, "unlink", refuse)  # rmtree cannot empty the directory
    with pytest.raises(UserError, match=r"--save .*: cannot write .* \(no space left on the device\)"):
        with writing("--save", str(tmp_path), cleanup=[str(tmp_path / "iter_*.tmp")]):
            raise OSError(28, "No space left on device")
    monkeypatch.undo()
    with pytest.raises(UserError, match="its temporary files were removed"):
        with writing("--save", str(tmp_path), cleanup=[str(tmp_path / "*.tmp")]):
            raise OSError(28, "No space left on device")
    assert not stuck.exists() and not loose.exists()
    with pytest.raises(ZeroDivisionError):  # not a write failure: raised as it is
        with writing("--save", str(tmp_path)):
            raise ZeroDivisionError


def _mismatch_of_known_offsets():
    """One rank: sampler log-probs = the policy's own minus known offsets per response token."""
    from megatron_aligndistil.data.batching import build_micro_batch
    from megatron_aligndistil.rollout import logprob_mismatch

    vocab = 11
    prompts, responses = [[1, 2], [3]], [[4, 5, 6], [7, 8]]
    offsets = [[0.1, -0.5, 0.7], [-0.9, -0.4]]  # d = log p_policy - log p_sampler per token
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, vocab, generator=g, dtype=torch.float64).float()
    logp = torch.log_softmax(logits.double(), -1)
    rows = []
    for i, (p, r, off) in enumerate(zip(prompts, responses, offsets)):
        ids = p + r
        own = [float(logp[i, len(p) - 1 + t, ids[len(p) + t]]) for t in range(len(r))]
        rows.append([(i, (p, r, [x - o for x, o in zip(own, off)]))])
    batch = build_micro_batch(rows, 5)
    sums, maxes = logprob_mismatch(logits, batch, vocab)
    return sums.tolist(), maxes.tolist()


def test_rollout_mismatch_sums_and_maxes_of_known_offsets():
    from megatron_aligndistil.testing import run_distributed

    (sums, maxes), = run_distributed(_mismatch_of_known_offsets, 1)
    abs_sum, tokens, ratio_sum, sequences = sums
    assert tokens == 5 and sequences == 2
    assert abs_sum == pytest.approx(0.1 + 0.5 + 0.7 + 0.9 + 0.4, abs=1e-5)
    assert ratio_sum == pytest.approx(math.exp(0.3) + math.exp(-1.3), rel=1e-5)  # p_policy(y) / p_sampler(y)
    assert maxes == pytest.approx([0.9, 1.3], abs=1e-5)  # the largest token |d|, the largest sequence |sum d|


def test_the_evaluators_engine_holds_its_longest_prompt_and_every_new_token(monkeypatch):
    """vLLM's context is the longest prompt + max_new_tokens (the shortest would cut responses)."""
    from megatron_aligndistil import rollout
    from megatron_aligndistil.config import SamplingParams
    from megatron_aligndistil.eval.policy_eval import PolicyEvaluator

    made = {}
    engine = SimpleNamespace(params=None)
    monkeypatch.setattr(rollout, "make_engine", lambda config, model, arch, vocab, **kw: made.update(kw) or engine)
    evaluator = SimpleNamespace(_engine=None, _engine_model=None, settings=SimpleNamespace(engine="vllm"),
                                prompts=[[1] * 5, [1] * 17, [1] * 9], arch=None, vocab_size=11, _checkpoint=None)
    params = SamplingParams(max_new_tokens=30)
    assert PolicyEvaluator._engine_for(evaluator, "model", params) is engine and engine.params is params
    assert made["max_model_len"] == 17 + 30


def test_an_iteration_checkpoint_reads_its_runs_tokenizer(tmp_path):
    """A teacher or policy given as ``<run>/iter_XXXXXXX`` has no tokenizer.json of its own: its
    ids are those of the run's ``--load`` (args.json), as the export reads them; without that, its
    vocabulary would silently be every embedding row."""
    from megatron_aligndistil.core.weights import tokenizer_file, tokenizer_vocab_size

    load = _tokenizer_dir(tmp_path, {"a": 0, "b": 1, "c": 5, "<|end|>": 9}, {"<|end|>": 9})
    run = tmp_path / "run"
    it = run / "iter_0000002"
    it.mkdir(parents=True)
    for name in ("qwen_arch.json", ".metadata", "common.pt"):
        (it / name).write_text("{}")
    (run / "args.json").write_text(json.dumps({"load": load}))
    assert tokenizer_file(str(it)) == os.path.join(load, "tokenizer.json")
    assert tokenizer_vocab_size(SimpleNamespace(vocab_size=64), str(it)) == 10
    (run / "args.json").write_text(json.dumps({"load": str(tmp_path / "gone")}))
    assert tokenizer_file(str(it)) is None  # the load moved away: the model's own vocab_size, as before
    (it / "common.pt").unlink()  # not a training checkpoint: only its own tokenizer.json counts
    (run / "args.json").write_text(json.dumps({"load": load}))
    assert tokenizer_file(str(it)) is None


@pytest.mark.parametrize("free,fault", [(1 << 20, None), ((1 << 20) - 1, "ENOSPC"), (0, "ENOSPC")])
def test_a_location_is_nearly_full_below_one_mebibyte_free(tmp_path, monkeypatch, free, fault):
    """``location_fault``: exactly 1 MiB free still looks writable; one byte less is a full disk."""
    import errno

    from megatron_aligndistil.core.errors import location_fault

    real = os.statvfs(tmp_path)
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_flag=real.f_flag & ~os.ST_RDONLY,
                                                                  f_bavail=free, f_frsize=1))
    assert location_fault(str(tmp_path / "a" / "b")) == (getattr(errno, fault) if fault else None)
