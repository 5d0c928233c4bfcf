"""Records: validation errors name file, line and field; skipping counts; micro-batch masks."""

import json

import pytest
import torch

from megatron_aligndistil.data.batching import global_batch_indices, make_micro_batch
from megatron_aligndistil.data.records import DataError, read_jsonl

GOOD = {"prompt_ids": [1, 2, 3], "response_ids": [4, 5]}
BAD_LINES = [
    ('{"prompt_ids": [1, 2], "response_ids": [3', "malformed JSON"),
    (json.dumps({"prompt_ids": [1, 2], "response_ids": [3, 1000]}), "token id 1000 outside the vocabulary"),
    (json.dumps({"prompt_ids": [1, 2], "response_ids": []}), "field 'response_ids' is empty"),
    (json.dumps({"prompt_ids": [1] * 10, "response_ids": [2] * 10}), "20 tokens (prompt + response) exceed"),
    (json.dumps({"prompt_ids": [1, 2]}), "missing field 'response_ids'"),
    (json.dumps({"prompt_ids": [1, 2.5], "response_ids": [3]}), "list of integer token ids"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_records_name_file_line_and_problem(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as err:
        read_jsonl(str(path), "distill", vocab_size=1000, max_tokens=16)
    assert f"{path}:2:" in str(err.value) and message in str(err.value)


def test_skip_bad_records_counts_reasons(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(GOOD)] + [line for line, _ in BAD_LINES] + [json.dumps(GOOD)]) + "\n")
    ds = read_jsonl(str(path), "distill", vocab_size=1000, max_tokens=16, skip_bad=True)
    assert len(ds) == 2 and ds.lines == [1, len(BAD_LINES) + 2]
    assert sum(ds.skipped.values()) == len(BAD_LINES)


def test_loss_mask_covers_exactly_the_response_targets():
    mb = make_micro_batch([([10, 11, 12], [20, 21]), ([30], [40, 41, 42])], seq_len=6)
    # sequence 0: inputs 10 11 12 20, targets 11 12 20 21 -> response targets at positions 2, 3
    assert mb.tokens[0].tolist() == [10, 11, 12, 20, 0, 0]
    assert mb.labels[0].tolist() == [11, 12, 20, 21, 0, 0]
    assert mb.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0]
    # sequence 1: a one-token prompt: the very first logit already predicts the response
    assert mb.loss_mask[1].tolist() == [1, 1, 1, 0, 0, 0]
    assert torch.equal(mb.labels[mb.loss_mask.bool()], torch.tensor([20, 21, 40, 41, 42]))


def test_sampling_is_deterministic_and_wraps_epochs():
    a = global_batch_indices(10, 0, 4, seed=3)
    assert a == global_batch_indices(10, 0, 4, seed=3) and len(set(a)) == 4
    epoch = global_batch_indices(10, 0, 10, seed=3)
    assert sorted(epoch) == list(range(10))
    wrap = global_batch_indices(10, 8, 4, seed=3)
    assert wrap[:2] == epoch[8:]


def test_plot_metrics_writes_a_png(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import plot_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"iteration": i, "loss": 1 / i, "kl": 0.5 / i, "alpha_mean": 1.2,
                                          "tvd_mean": 0.1, "lr": 1e-3, "grad_norm": 0.3})
                              for i in range(1, 6)) + "\n")
    out = tmp_path / "curves.png"
    assert plot_metrics.main([str(path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_flag_errors_name_the_flags(capsys):
    from megatron_aligndistil.train.arguments import parse_args

    base = ["aligndistil", "--load", "a", "--dpo-load", "b", "--rev-load", "c", "--data-path", "d", "--save", "e",
            "--global-batch-size", "8", "--seq-length", "16", "--lr", "1e-5"]
    assert parse_args(["--"] + base).r == 15.0  # torchrun style, with the separator
    assert parse_args(base + ["--tvd-scale", "5"]).r == 5.0  # the torchrun-safe name, no separator needed
    assert parse_args(base).token_weight == "beta_t"
    vanilla = [a if a != "--rev-load" else "--ref-load" for a in base] + ["--constant-alpha", "1"]
    assert parse_args(vanilla).token_weight == "vanilla"  # beta0 / (1 + alpha) = beta0 / w (Eq. 11)
    for extra, message in ((["--micro-batch-size", "3"], "not a multiple of --micro-batch-size 3"),
                           (["--rollout", "on-policy", "--rollout-batch-size", "16"], "--rollout-batch-size 16"),
                           (["--ref-load", "x"], "exactly one of --rev-load"),
                           (["--sequence-parallel"], "--sequence-parallel needs"),
                           # every numeric flag is range-checked, naming the flag (issue 15)
                           (["--r", "-15"], "--tvd-scale (--r) -15.0 is out of range [0, inf)"),
                           (["--eps", "0"], "--eps 0.0 is out of range (0, inf)"),
                           (["--beta0", "0"], "--beta0 0.0 is out of range"),
                           (["--train-iters", "0"], "--train-iters 0 is out of range [1, inf)"),
                           (["--train-iters", "-1"], "--train-iters -1 is out of range"),
                           (["--save-interval", "0"], "--save-interval 0 is out of range"),
                           (["--micro-batch-size", "0"], "--micro-batch-size 0 is out of range"),
                           (["--micro-batch-size", "-2"], "--micro-batch-size -2 is out of range"),
                           (["--global-batch-size", "0"], "--global-batch-size 0 is out of range"),
                           (["--min-lr", "1e-4"], "--min-lr 0.0001 must not exceed --lr 1e-05"),
                           (["--lr", "nan"], "--lr nan is out of range"),
                           (["--temperature", "-1"], "--temperature -1.0 is out of range"),
                           (["--top-p", "0"], "--top-p 0.0 is out of range (0, 1]"),
                           (["--constant-alpha", "0"], "--constant-alpha 0.0 must be > 0 with --token-weight beta_t")):
        with pytest.raises(SystemExit):
            parse_args(base + extra)
        assert message in capsys.readouterr().err
    dpo = ["dpo"] + base[base.index("--data-path"):] + ["--load", "a"]
    for argv, message in ((vanilla[:-1] + ["-1"], "--constant-alpha -1.0 must be > -1 with --token-weight vanilla"),
                          (dpo + ["--dpo-beta", "0"], "--dpo-beta 0.0 is out of range (0, inf)")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
