"""Issue 3: the vocab-parallel AlignDistil loss against a dense float64 reference, at TP 1, 2, 4.

Values and gradients for every variant, fp32 and bf16 inputs, padded vocab (including a rank
with no real entry), masked (-inf) entries, extreme logits; the collective count is asserted.
"""

import pytest
import torch

from megatron_aligndistil.loss.reference import dense_aligndistil
from megatron_aligndistil.loss import vocab_parallel_aligndistil, vocab_parallel_logprobs
from megatron_aligndistil.core.parallel import Layout
from megatron_aligndistil.testing import run_distributed

PADDED_VOCAB = 128
VARIANTS = {
    "default": {},
    "forward_kl": {"direction": "forward"},
    "constant_alpha": {"constant_alpha": 1.5},
    "released_tvd": {"tvd_half": False, "r": 7.5},
    "weight_none": {"token_weight": "none"},
    "weight_constant": {"token_weight": "constant", "beta0": 0.2},
    "vanilla_dpo_teacher": {"constant_alpha": -0.5, "token_weight": "vanilla"},  # w = 0.5, weight 2 beta0
    "forward_constant": {"direction": "forward", "constant_alpha": 2.0, "token_weight": "none"},
    "plausibility_guard": {"plausibility_threshold": 0.02},
    "guard_forward_constant": {"plausibility_threshold": 0.05, "direction": "forward", "constant_alpha": 1.0},
}


def make_case(name, dtype=torch.float32, vocab_size=123, scale=3.0, mask=False, seed=0, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    zp, zd, zr = (torch.randn(*shape, PADDED_VOCAB, generator=g) * scale for _ in range(3))
    zr = zd + 0.5 * (zr - zd)  # teachers close-ish, like a DPO / reverse-DPO pair
    for z in (zp, zd, zr):
        z[..., vocab_size:] = 50.0  # padding rows with large logits: must be ignored
    if mask:
        banned = torch.rand(PADDED_VOCAB, generator=g) < 0.2
        banned[vocab_size:] = False
        for z in (zp, zd, zr):
            z[..., banned] = -torch.inf
    upstream = torch.rand(*shape, generator=g) + 0.5  # d(total)/d(loss_t), exercises grad scaling
    return {
        "name": name, "kwargs": dict(VARIANTS[name], vocab_size=vocab_size),
        "logits": [z.to(dtype) for z in (zp, zd, zr)], "upstream": upstream,
    }


def all_cases():
    cases = [make_case(n) for n in VARIANTS]
    cases += [make_case("default", dtype=torch.bfloat16), make_case("forward_kl", dtype=torch.bfloat16)]
    cases += [make_case("default", vocab_size=90, seed=1)]  # the last of 4 ranks holds only padding
    cases += [make_case("default", mask=True, seed=2), make_case("forward_kl", mask=True, seed=2)]
    cases += [make_case("plausibility_guard", mask=True, seed=2), make_case("plausibility_guard", dtype=torch.bfloat16)]
    cases += [make_case("default", scale=1e4, seed=3), make_case("forward_kl", scale=1e4, seed=3)]
    return cases


class CollectiveCounter:
    """Counts torch.distributed collectives while active (wraps the module functions)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
             "reduce_scatter_tensor",
             "broadcast", "reduce", "all_to_all_single", "all_gather_object", "barrier")

    def __init__(self):
        self.count = 0

    def __enter__(self):
        import torch.distributed as dist

        self._orig = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}

        def wrap(fn):
            def counted(*a, **k):
                self.count += 1
                return fn(*a, **k)
            return counted

        for n, fn in self._orig.items():
            setattr(dist, n, wrap(fn))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for n, fn in self._orig.items():
            setattr(dist, n, fn)


def run_cases(cases, chunk_size=4, compile=False):
    """On each TP rank: shard the logits, forward/backward; returns outputs, local grads, counts."""
    import torch.distributed as dist

    tp = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    results = []
    for case in cases:
        shards = [z.chunk(tp, dim=-1)[rank].clone() for z in case["logits"]]
        policy = shards[0].requires_grad_(True)
        with CollectiveCounter() as fwd:
            out = vocab_parallel_aligndistil(policy, shards[1], shards[2], chunk_size=chunk_size,
                                             compile=compile, **case["kwargs"])
        with CollectiveCounter() as bwd:
            (out.loss * case["upstream"]).sum().backward()
        results.append({
            "loss": out.loss.detach(), "kl": out.kl.detach(), "alpha": out.alpha, "tvd": out.tvd,
            "grad": policy.grad, "fwd_collectives": fwd.count, "bwd_collectives": bwd.count,
            "dtypes": (out.loss.dtype, out.kl.dtype, out.alpha.dtype, policy.grad.dtype),
        })
    return results


def reference_for(case):
    """Dense reference over the real vocab; -inf columns (masked in all three) are left out."""
    v = case["kwargs"]["vocab_size"]
    zp, zd, zr = (z[..., :v].double() for z in case["logits"])
    keep = torch.isfinite(zp).reshape(-1, v).all(0)
    kwargs = dict(case["kwargs"], vocab_size=None)
    zp_kept = zp[..., keep].clone().requires_grad_(True)
    ref = dense_aligndistil(zp_kept, zd[..., keep], zr[..., keep], **kwargs)
    (ref["loss"] * case["upstream"].double()).sum().backward()
    grad = torch.zeros(*zp.shape[:-1], PADDED_VOCAB, dtype=torch.float64)
    grad[..., torch.nonzero(keep).squeeze(-1)] = zp_kept.grad  # padding and masked: zero gradient
    return {k: t.detach() for k, t in ref.items()}, grad


def check(cases, per_rank):
    tp = len(per_rank)
    for i, case in enumerate(cases):
        ref, ref_grad = reference_for(case)
        bf16 = case["logits"][0].dtype == torch.bfloat16
        extreme = case["logits"][0].abs().max() > 1e3 and torch.isfinite(case["logits"][0]).all()
        tol = dict(rtol=2e-2 if bf16 else 1e-4, atol=(2e-2 if bf16 else 1e-5))
        label = f"{case['name']} (case {i}, TP{tp}, {case['logits'][0].dtype})"
        for r, res in enumerate(per_rank):
            assert res[i]["fwd_collectives"] <= 3 and res[i]["bwd_collectives"] == 0, label
            if tp == 1:
                assert res[i]["fwd_collectives"] == 0, label
            assert res[i]["dtypes"][:3] == (torch.float32,) * 3
            assert res[i]["dtypes"][3] == case["logits"][0].dtype
            for key in ("tvd", "alpha"):
                torch.testing.assert_close(res[i][key].double(), ref[key], rtol=1e-5, atol=1e-6, msg=label)
            for key in ("kl", "loss"):
                assert torch.isfinite(res[i][key]).all(), label
                atol = tol["atol"] * (1 + ref[key].abs().max().item()) if extreme else tol["atol"]
                torch.testing.assert_close(res[i][key].double(), ref[key], rtol=tol["rtol"], atol=atol,
                                           msg=label + " " + key)
        grad = torch.cat([res[i]["grad"] for res in per_rank], dim=-1).double()
        assert torch.all(grad[..., case["kwargs"]["vocab_size"]:] == 0), label + ": padding gradient"
        gscale = ref_grad.abs().max().item()
        torch.testing.assert_close(grad, ref_grad, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, gscale),
                                   msg=label + " grad")


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_tp1_all_variants(compile):
    """compiled: the torch.compile-fused kernels (the GPU default) against the same reference."""
    from megatron_aligndistil.loss.vocab_parallel import compile_failures

    cases = all_cases()
    check(cases, [run_cases(cases, compile=compile)])
    assert compile_failures() == []  # the fused path really ran, no silent eager fallback


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_all_variants(tp):
    cases = all_cases()
    per_rank = run_distributed(run_cases, tp, args=(cases,), layout=Layout(tp=tp))
    assert all(r["fwd_collectives"] == 3 for res in per_rank for r in res)  # exactly the schedule
    check(cases, per_rank)


def run_cases_compiled(cases):
    from megatron_aligndistil.loss.vocab_parallel import compile_failures

    return run_cases(cases, chunk_size=None, compile=True), compile_failures()


def test_tensor_parallel_compiled_kernels():
    """TP > 1 with compilation: the step-major path with each step's fused kernel (the GPU default)."""
    cases = [make_case("default"), make_case("forward_kl", mask=True, seed=2),
             make_case("constant_alpha", dtype=torch.bfloat16), make_case("default", vocab_size=70, seed=1),
             make_case("plausibility_guard", mask=True, seed=2)]
    per_rank = run_distributed(run_cases_compiled, 2, args=(cases,), layout=Layout(tp=2))
    assert all(failures == [] for _, failures in per_rank)  # no silent eager fallback
    check(cases, [res for res, _ in per_rank])


def test_plausibility_guard_never_raises_an_implausible_token():
    """Hand-checked: tokens below tau under the DPO model are lowered as usual, never raised."""
    from megatron_aligndistil.loss.aligndistil import teacher_logits

    z_dpo = torch.tensor([[4.0, 0.0, -3.0, -3.0, -torch.inf]])
    z_rev = torch.tensor([[3.0, 1.0, -5.0, -1.0, 0.0]])
    floor = torch.logsumexp(z_dpo, -1, keepdim=True) + torch.log(torch.tensor(0.01))  # p_dpo < 0.01
    # p_dpo = [0.98, 0.018, 0.0009, 0.0009, 0]: tokens 2 and 3 are implausible
    plain = teacher_logits(z_dpo, z_rev, torch.tensor([[2.0]]))
    guarded = teacher_logits(z_dpo, z_rev, torch.tensor([[2.0]]), floor)
    assert plain.tolist() == [[6.0, -2.0, 1.0, -7.0, -torch.inf]]
    assert guarded.tolist() == [[6.0, -2.0, -3.0, -7.0, -torch.inf]]  # token 2 not boosted, token 3 lowered


def test_chunking_does_not_change_results():
    case = make_case("default", shape=(4, 7))
    a, b = run_cases([case], chunk_size=1)[0], run_cases([case], chunk_size=1000)[0]
    for key in ("loss", "kl", "alpha", "tvd", "grad"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_gradient_reaches_policy_only_and_kl_is_differentiable():
    case = make_case("default")
    zp, zd, zr = (z.clone().requires_grad_(True) for z in case["logits"])
    out = vocab_parallel_aligndistil(zp, zd, zr, vocab_size=123)
    out.kl.sum().backward()
    assert zp.grad is not None and zd.grad is None and zr.grad is None
    assert not out.alpha.requires_grad and not out.tvd.requires_grad


def test_flushed_exp_is_exp_except_subnormals():
    from megatron_aligndistil.loss.vocab_parallel import flushed_exp

    x = torch.tensor([0.0, -10.0, -87.0, -87.5, -100.0, -torch.inf, 3.0, torch.nan])
    y = flushed_exp(x)
    assert torch.equal(y[[0, 1, 2, 6]], torch.exp(x[[0, 1, 2, 6]]))  # bit-exact above the floor
    assert torch.all(y[[3, 4, 5]] == 0)  # would be subnormal (or is exp(-inf)): exactly 0
    assert torch.isnan(y[7])  # a NaN is never hidden


def test_alpha_is_finite_when_teachers_agree():
    z = torch.randn(6, PADDED_VOCAB)
    out = vocab_parallel_aligndistil(z.clone().requires_grad_(True), z, z.clone())
    assert torch.all(out.tvd == 0) and torch.allclose(out.alpha, torch.full_like(out.alpha, 1e-3))
    assert torch.isfinite(out.loss).all()


def test_bad_arguments_are_named():
    z = torch.randn(2, 8)
    with pytest.raises(ValueError, match="plausibility_threshold"):
        vocab_parallel_aligndistil(*make_case("default")["logits"], plausibility_threshold=1.5)
    with pytest.raises(ValueError, match="same shape"):
        vocab_parallel_aligndistil(z, z, torch.randn(2, 9))
    with pytest.raises(ValueError, match="token_weight"):
        vocab_parallel_aligndistil(z, z, z, token_weight="bogus")
    with pytest.raises(ValueError, match="direction"):
        vocab_parallel_aligndistil(z, z, z, direction="sideways")
    with pytest.raises(ValueError, match="constant_alpha"):
        vocab_parallel_aligndistil(z, z, z, constant_alpha=-0.5)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_aligndistil(z, z, z, vocab_size=9)
    with pytest.raises(ValueError, match="eps > 0"):  # alpha 0 where the teachers agree: infinite beta_t
        vocab_parallel_aligndistil(z, z, z, eps=0.0)
    with pytest.raises(ValueError, match="r >= 0"):  # wrong-direction extrapolation
        vocab_parallel_aligndistil(z, z, z, r=-15.0)
    with pytest.raises(ValueError, match="must be > -1"):
        vocab_parallel_aligndistil(z, z, z, constant_alpha=-1.0, token_weight="vanilla")


def test_vanilla_token_weight_is_beta_over_w():
    """The vanilla DPO-reward teacher: alpha = w - 1, weight beta0 / w (Eq. 11), by hand."""
    z = torch.randn(4, 16)
    for w in (0.5, 2.0):
        out = vocab_parallel_aligndistil(z, z + 1, z, constant_alpha=w - 1, token_weight="vanilla", beta0=0.1)
        assert torch.allclose(out.weight, torch.full((4,), 0.1 / w))


# --- log-probabilities (for DPO) -------------------------------------------------------------

def run_logprobs(logits, target, upstream, vocab_size):
    import torch.distributed as dist

    tp = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = logits.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
    with CollectiveCounter() as fwd:
        logp = vocab_parallel_logprobs(local, target, vocab_size=vocab_size, chunk_size=3)
    with CollectiveCounter() as bwd:
        (logp * upstream).sum().backward()
    return logp.detach(), local.grad, fwd.count, bwd.count


@pytest.mark.parametrize("tp,dtype", [(1, torch.float32), (2, torch.float32), (4, torch.bfloat16)])
def test_logprobs_match_dense(tp, dtype):
    g = torch.Generator().manual_seed(5)
    vocab_size = 90
    logits = (torch.randn(3, 4, PADDED_VOCAB, generator=g) * 4)
    logits[..., vocab_size:] = 30.0
    logits = logits.to(dtype)
    target = torch.randint(0, vocab_size, (3, 4), generator=g)
    upstream = torch.rand(3, 4, generator=g)
    args = (logits, target, upstream, vocab_size)
    per_rank = [run_logprobs(*args)] if tp == 1 else run_distributed(run_logprobs, tp, args=args,
                                                                    layout=Layout(tp=tp))
    ref_in = logits.double()[..., :vocab_size].requires_grad_(True)
    ref = torch.log_softmax(ref_in, -1).gather(-1, target[..., None]).squeeze(-1)
    (ref * upstream.double()).sum().backward()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    grad = torch.cat([r[1] for r in per_rank], -1).double()
    for logp, _, nf, nb in per_rank:
        assert nf == (0 if tp == 1 else 1) and nb == 0
        torch.testing.assert_close(logp.double(), ref.detach(), **tol)
    torch.testing.assert_close(grad[..., :vocab_size], ref_in.grad, **tol)
    assert torch.all(grad[..., vocab_size:] == 0)


def test_bf16_logprob_gradient_is_exact_for_confident_tokens():
    """p(target) in [0.95, 0.9997]: the target entry's gradient upstream * (1 - p) must keep bf16's
    relative precision (2^-8), not be formed by cancellation after rounding p to bf16."""
    n, v = 6, 64  # (beyond p ~ 0.9999 float32 itself, as in Megatron, limits 1 - p)
    logits = torch.zeros(n, v)
    target = torch.arange(n)
    margins = torch.tensor([3.0, 5.0, 6.0, 7.0, 7.5, 8.0])  # 1 - p from 5e-2 down to 3.4e-4
    logits[target, target] = margins + torch.log(torch.tensor(float(v - 1)))
    z = logits.to(torch.bfloat16).requires_grad_(True)
    vocab_parallel_logprobs(z, target).sum().backward()
    ref_in = z.detach().double().requires_grad_(True)
    torch.log_softmax(ref_in, -1).gather(-1, target[:, None]).sum().backward()
    got, want = z.grad.double()[target, target], ref_in.grad[target, target]
    assert torch.all(want > 0)
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)
    torch.testing.assert_close(z.grad.double(), ref_in.grad, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("token_weight", ["beta_t", "vanilla"])
def test_masked_positions_contribute_exactly_zero_whatever_their_values(token_weight):
    """A teacher row of NaN and one of all -inf at masked (padding) positions: the masked sum and
    every gradient equal those of clean logits, bit for bit (no NaN * 0 = NaN leaking through)."""
    from megatron_aligndistil.data.batching import masked

    g = torch.Generator().manual_seed(7)
    clean = [torch.randn(2, 5, 40, generator=g) for _ in range(3)]
    mask = torch.ones(2, 5)
    mask[0, 4] = mask[1, 0] = 0
    dirty = [z.clone() for z in clean]
    dirty[1][0, 4] = float("nan")  # DPO teacher row of NaN
    dirty[2][1, 0] = -float("inf")  # reverse teacher row with no finite entry
    dirty[0][1, 0, 3] = float("inf")  # and a policy entry of +inf, all at masked positions
    results = []
    for logits in (clean, dirty):
        zp = logits[0].clone().requires_grad_(True)
        kw = {"constant_alpha": 0.5} if token_weight == "vanilla" else {}
        out = vocab_parallel_aligndistil(zp, logits[1], logits[2], token_weight=token_weight, **kw)
        total = masked(out.loss, mask).sum() + masked(out.kl, mask).sum()
        total.backward()
        results.append((out, total, zp.grad))
    (_, clean_total, clean_grad), (dirty_out, dirty_total, dirty_grad) = results
    assert not torch.isfinite(dirty_out.kl[0, 4]) and not torch.isfinite(dirty_out.kl[1, 0])  # really dirty
    assert torch.equal(dirty_total, clean_total)
    assert torch.equal(dirty_grad[mask > 0], clean_grad[mask > 0])
    assert torch.all(dirty_grad[mask == 0] == 0)
    # the same for the log-probs of DPO / SFT
    target = torch.randint(0, 40, (2, 5), generator=g)
    grads = []
    for logits in (clean, dirty):
        z = logits[1].clone().requires_grad_(True)
        masked(vocab_parallel_logprobs(z, target), mask).sum().backward()
        grads.append(z.grad)
    assert torch.equal(grads[0][mask > 0], grads[1][mask > 0]) and torch.all(grads[1][mask == 0] == 0)


@pytest.mark.parametrize("settings", [{}, {"r": 5.0, "plausibility_threshold": 0.1}, {"constant_alpha": 1.5},
                                      {"tvd_half": False, "r": 7.0}, {"direction": "forward"}],
                         ids=["paper", "guarded", "constant", "no-half", "forward"])
def test_dense_teacher_is_the_losss_teacher(settings):
    """Issue 28: the pre-flight samples from ``dense_teacher``; its alpha and TVD are the loss's per
    token, and the loss's KL is the KL between the policy and softmax of its z* (both directions)."""
    from megatron_aligndistil.config import AlignDistilLossConfig
    from megatron_aligndistil.loss.aligndistil import aligndistil_loss, dense_teacher

    torch.manual_seed(3)
    zp, zd, zr = (torch.randn(6, 40, dtype=torch.float64) * 2 for _ in range(3))
    zd[0, 5] = zr[1, 7] = float("-inf")  # masked entries stay out of the teacher
    cfg = AlignDistilLossConfig(**settings)
    z_star, alpha, tvd = dense_teacher(zd, zr, cfg)
    out = aligndistil_loss(zp, zd, zr, cfg)
    assert torch.allclose(alpha, out.alpha.double(), atol=1e-6) and torch.allclose(tvd, out.tvd.double(), atol=1e-6)
    log_t, log_p = torch.log_softmax(z_star, -1), torch.log_softmax(zp, -1)
    if cfg.direction == "reverse":
        kl = (log_p.exp() * (log_p - log_t.clamp(min=-1e30))).sum(-1)
    else:
        t = log_t.exp()
        kl = torch.where(t > 0, t * (log_t - log_p), torch.zeros_like(t)).sum(-1)
    finite = torch.isfinite(out.kl)  # reverse KL is inf where the policy has mass the teacher masks
    assert torch.allclose(kl[finite], out.kl.double()[finite], rtol=2e-4) and finite[2:].all()  # float32 loss
    assert z_star[0, 5] == float("-inf") and z_star[1, 7] == float("-inf")
