"""Issue 17: sequence packing. Packed and unpacked runs give the same iteration-1 loss and the
same gradients for SFT, DPO and AlignDistil (off- and on-policy) at TP2 PP2 (with sequence
parallelism) and TP2 DP2; packs never split a record; a record that does not fit is
a clear error; per-sequence sums over a context-parallel group."""


import pytest
import torch

from megatron_aligndistil.core.schedule import block_causal_mask
from megatron_aligndistil.data.batching import build_micro_batch, input_length, pack_records
from megatron_aligndistil.testing import run_distributed
from train_fixtures import aligndistil_argv, dpo_argv, make_setup_with_pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup_with_pairs(str(tmp_path_factory.mktemp("packing")))


def test_packs_hold_whole_records_within_the_row_length():
    g = torch.Generator().manual_seed(0)
    records = []
    for _ in range(40):
        prompt = list(range(int(torch.randint(1, 9, (1,), generator=g))))
        records.append([(prompt, list(range(int(torch.randint(1, 12, (1,), generator=g)))))
                        for _ in range(2)])  # two sequences a record, as DPO's chosen and rejected
    packs = pack_records(records, rows_per_micro_batch=2, row_length=20)
    placed = [(k, j) for mb in packs for row in mb for k, j in row]
    assert sorted(placed) == [(k, j) for k in range(40) for j in range(2)]  # each sequence exactly once
    for mb in packs:
        assert len(mb) == 2  # every micro-batch has the same rows (one pipeline shape)
        for row in mb:
            assert sum(input_length(records[k][j]) for k, j in row) <= 20
        ks = [k for row in mb for k, _ in row]
        assert all(ks.count(k) == 2 for k in ks)  # a record's sequences share a micro-batch
    assert len(packs) < 40  # records really share micro-batches
    with pytest.raises(ValueError, match="does not fit --seq-length 20"):
        pack_records([[(list(range(15)), list(range(7)))]], 1, 20)


def test_block_causal_mask_keeps_attention_inside_each_sequence():
    batch = build_micro_batch([[(0, ([1, 2], [3, 4])), (1, ([5], [6, 7]))]], seq_len=6, packed=True)
    allowed = ~block_causal_mask(batch)[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()  # sequence 0: positions 0-2
    expected[3:5, 3:5] = torch.ones(2, 2, dtype=torch.bool).tril()  # sequence 1: positions 3-4
    expected[5, 5] = True  # padding attends to itself only
    assert torch.equal(allowed, expected)
    assert batch.seq_index[0].tolist() == [0, 0, 0, 1, 1, -1]
    assert batch.loss_mask[0].tolist() == [0, 1, 1, 1, 1, 0]  # targets 2 3 4 | 6 7
    # TransformerEngine's THD format (the GPU path): the same blocks as cu_seqlens, padding a segment
    from megatron_aligndistil.core.schedule import attention_kwargs

    params = attention_kwargs(batch, thd=True)["packed_seq_params"]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 3, 5, 6] and params.max_seqlen_q == 3
    with pytest.raises(ValueError, match="one row per micro-batch"):
        attention_kwargs(build_micro_batch([[(0, ([1], [2]))], [(1, ([3], [4]))]], seq_len=2, packed=True), thd=True)


def packing_launch(argvs):
    """Inside a run_distributed rank: :func:`first_step_packed_and_unpacked`, then
    :func:`split_sequence_sums` over all ranks (one launch for both tests)."""
    return {"packing": first_step_packed_and_unpacked(argvs), "context_parallel": split_sequence_sums()}


def first_step_packed_and_unpacked(argvs):
    """Inside a run_distributed rank: for each argv, iteration 1's forward-backward without and
    with --pack-sequences. Returns, per argv, both runs' global loss and example count, this
    rank's number of micro-batches, and this rank's shard of the policy gradient."""
    from megatron.core import parallel_state

    from megatron_aligndistil.train import build_trainer
    from megatron_aligndistil.train.arguments import parse_args

    out = []
    for argv in argvs:
        runs = {}
        for name, extra in (("unpacked", []), ("packed", ["--pack-sequences"])):
            trainer = build_trainer(parse_args(argv + extra))
            batches, seq_len, _ = trainer._local_micro_batches()
            sums = trainer.forward_backward(batches, seq_len)
            grad = torch.cat([p.main_grad.detach().flatten().clone()
                              for chunk in trainer.policy_chunks for p in chunk.parameters()])
            runs[name] = {"loss": sums["loss"] / sums["sequences"], "examples": sums["sequences"],
                          "micro_batches": len(batches), "grad": grad,
                          "most_in_a_row": max(len(spans) for b in batches for spans in b.segments)}
            parallel_state.destroy_model_parallel()
        out.append(runs)
    return out


def _argvs(setup, tmp):
    iters = ["--no-export", "--micro-batch-size", "2"]
    ad = aligndistil_argv(setup, str(tmp / "ad"), *iters, iters=1)
    return {
        "sft": ["sft"] + ad[ad.index("--load"): ad.index("--dpo-load")] + ad[ad.index("--data-path"):],
        "dpo": dpo_argv(setup, str(tmp / "dpo"), *iters, iters=1),
        "aligndistil": ad,
        "aligndistil_on_policy": aligndistil_argv(setup, str(tmp / "on"), *iters, "--rollout", "on-policy",
                                                  "--max-new-tokens", "6", "--stop-token-ids", "3", iters=1),
    }


LAYOUTS = {"tp2pp2_sp": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                         "--sequence-parallel"],
           "tp2dp2": ["--tensor-model-parallel-size", "2"]}


@pytest.fixture(scope="module")
def launch(setup, tmp_path_factory):
    """One launch of 4 ranks for the packing comparisons (TP2 PP2 with sequence parallelism, then
    TP2 DP2) and the context-parallel sums."""
    argvs = _argvs(setup, tmp_path_factory.mktemp("packing_runs"))
    cases = [(layout, name) for layout in LAYOUTS for name in argvs]
    results = run_distributed(packing_launch, 4, args=([argvs[name] + LAYOUTS[layout] for layout, name in cases],),
                              timeout=900)
    return {"cases": cases, "results": results}


def test_packed_equals_unpacked_loss_and_gradients(launch):
    """SFT, DPO, AlignDistil off- and on-policy at TP2 PP2 (SP) and TP2 DP2: iteration-1 loss and
    every rank's policy gradient shard (DP2 packed runs are also checked over whole trajectories in
    test_train_dpo.py and test_train_aligndistil.py)."""
    cases = launch["cases"]
    results = [r["packing"] for r in launch["results"]]
    for rank, per_rank in enumerate(results):
        for case, runs in zip(cases, per_rank):
            unpacked, packed = runs["unpacked"], runs["packed"]
            assert packed["examples"] == unpacked["examples"] == 8, (case, rank)
            assert unpacked["most_in_a_row"] == 1 and packed["most_in_a_row"] > 1, (case, rank)  # really packed
            assert packed["micro_batches"] <= unpacked["micro_batches"], (case, rank)
            assert packed["loss"] == pytest.approx(unpacked["loss"], rel=1e-5), (case, rank)
            g_u, g_p = unpacked["grad"], packed["grad"]
            assert g_u.abs().max() > 0, (case, rank)
            torch.testing.assert_close(g_p, g_u, rtol=1e-5, atol=1e-5 * float(g_u.abs().max()),
                                       msg=lambda m, case=case, rank=rank: f"{case} rank {rank}: {m}")


def split_sequence_sums():
    """Inside a run_distributed rank: the positions of two packed sequences split in contiguous
    parts over the ranks (as context parallelism splits them); per-sequence sums over the group and
    their gradients."""
    import torch.distributed as dist

    from megatron_aligndistil.loss.objectives import sequence_sums, token_mean

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    full = torch.randn(1, 10, generator=g, dtype=torch.float64)
    batch = build_micro_batch([[(0, ([1, 2], [3, 4, 5])), (1, ([6], [7, 8, 9, 10, 11, 12]))]], seq_len=10, packed=True)
    part_idx = torch.arange(10).tensor_split(dist.get_world_size())[rank]
    lo, hi = int(part_idx[0]), int(part_idx[-1]) + 1
    part = build_micro_batch([[]], seq_len=hi - lo)
    for name in ("tokens", "labels", "loss_mask", "seq_index", "positions"):
        setattr(part, name, getattr(batch, name)[:, lo:hi])
    part.num_sequences = 2
    values = full[:, lo:hi].clone().requires_grad_(True)
    sums = sequence_sums(values, part, group=dist.group.WORLD)
    tokens = sequence_sums(part.loss_mask.double(), part, group=dist.group.WORLD)
    token_mean(sums, tokens).sum().backward()
    return {"sums": sums.detach(), "grad": values.grad, "full": full, "mask": batch.loss_mask, "index": batch.seq_index}


def test_sequence_sums_over_a_context_parallel_group_equal_the_whole_sequence(launch):
    ranks = [r["context_parallel"] for r in launch["results"]]  # 4 ranks: sequence 1 spans three of them
    full, mask, index = ranks[0]["full"][0], ranks[0]["mask"][0], ranks[0]["index"][0]
    want = torch.stack([full[(index == k) & (mask > 0)].sum() for k in range(2)])
    counts = torch.stack([((index == k) & (mask > 0)).sum() for k in range(2)]).double()
    for r in ranks:
        torch.testing.assert_close(r["sums"], want)
    grad = torch.cat([r["grad"][0] for r in ranks])  # d(sum of token means)/d(value)
    expected = torch.where((mask > 0) & (index >= 0), 1.0 / counts[index.clamp(min=0)], torch.zeros(10, dtype=torch.float64))
    torch.testing.assert_close(grad, expected)
