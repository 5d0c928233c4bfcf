"""Vocab-parallel AlignDistil loss (SPEC section 2): TVD, adaptive alpha, teacher logits, KL.

For each token with logits z over the vocabulary (paper, arXiv 2503.02832)::

    TVD   = 1/2 sum_v |softmax(z_dpo) - softmax(z_rev)|      (tvd_half=False: without the 1/2)
    alpha = r * TVD + eps                                    (or a constant)
    z*    = z_dpo + alpha * (z_dpo - z_rev)                  (Eq. 17; no gradient)
            plausibility guard (optional, threshold tau): where p_dpo(v) < tau the step
            alpha * (z_dpo - z_rev) is clamped at 0: extrapolation may lower a token the DPO
            model finds implausible but never raise it (docs/alignment.md for the evidence)
    KL    = KL(softmax(z_pol) || softmax(z*))                (reverse, default) or KL(teacher || policy)
    loss  = weight * KL,  weight = beta0 / alpha (beta_t) | beta0 / (1 + alpha) (vanilla) | 1 | beta0

The vanilla DPO-reward teacher (Theorem 1, Eq. 11) is the same formula with the reference model
in the reverse model's place and constant alpha = w - 1 (w = beta0 / beta): its token weight is
beta = beta0 / w = beta0 / (1 + alpha).

The vocabulary is never gathered. Forward issues exactly three collectives on the TP group,
whatever the number of tokens (none with one rank):

1. all-gather of the three local log-sum-exps (3 floats/token) -> global log-normalisers;
2. all-reduce of the local partial TVD (1 float/token) -> alpha;
3. all-gather of the local log-sum-exp of z* and the local KL partial sum (2 floats/token).

Backward issues none: the gradient is local. For the reverse KL with S = sum_v p (z_pol - z*),
``dKL/dz_pol = p * (z_pol - z* - S)``; for the forward KL, ``dKL/dz_pol = p - softmax(z*)``.

Memory: the only tensor kept for backward is that gradient, ``[N, V_local]`` in the policy
logits' dtype (the size of the policy shard); backward scales it in place and returns it, so a
graph through this loss can be backpropagated once (``retain_graph`` reuse is not supported).
Teacher logits are not referenced after forward.
Tokens are processed in chunks, so float32 temporaries are a few ``[chunk, V_local]`` tensors
(none when compiled: each chunk kernel is fused). With several TP ranks each step runs over all
chunks before its collective (step-major); with one rank each chunk runs all four steps while it
is in cache (chunk-major).

Exps whose result would be a float32 subnormal are flushed to 0 (``flushed_exp``), as on GPUs:
extrapolated teacher logits span hundreds of nats, and subnormal arithmetic is ~20x slower on CPUs.

Masking: vocab entries at or beyond ``vocab_size`` (Megatron's TP padding) are excluded from
every softmax. An entry that is -inf in either teacher is excluded from the teacher; -inf in the
policy gets probability 0 (and gradient 0).

Non-finite tokens: a token whose KL is NaN or inf (e.g. a teacher row of NaN, or all -inf) keeps
its non-finite loss and KL, but its gradient is exactly 0 and its weight 0 where alpha is NaN:
masking such a token out (``torch.where(mask, loss, 0)``) removes it entirely, values and
gradients; the trainer stops on a non-finite loss at an unmasked token.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import torch

from ..config import AlignDistilLossConfig
from .vocab_parallel import (
    Shard,
    all_gather_rows,
    all_reduce_sum,
    chunks,
    combine_lse,
    compiled,
    flushed_exp,
    local_logsumexp,
    shard_info,
    use_compile,
)

_INF = float("inf")


@dataclass
class AlignDistilOutput:
    """Per-token float32 tensors of the logits' leading shape ``[...]``."""

    loss: torch.Tensor  # weight * kl; differentiable w.r.t. the policy logits
    kl: torch.Tensor  # KL in nats; differentiable w.r.t. the policy logits
    alpha: torch.Tensor  # extrapolation weight (no gradient)
    tvd: torch.Tensor  # total variation distance of the two teachers (no gradient)
    weight: torch.Tensor  # token weight (no gradient)


def teacher_logits(z_dpo: torch.Tensor, z_rev: torch.Tensor, alpha: torch.Tensor,
                   floor: torch.Tensor | None = None) -> torch.Tensor:
    """z* = z_dpo + alpha (z_dpo - z_rev); entries masked (-inf) in either teacher stay -inf.

    ``floor`` (``[c, 1]``, the plausibility guard): where ``z_dpo < floor`` (``p_dpo < tau`` with
    ``floor = lse_dpo + log tau``) the step ``z_dpo - z_rev`` is clamped at 0, so extrapolation
    never raises a token the DPO model finds implausible (it may still lower it).
    Masks are comparisons (not isnan/nan_to_num), which Inductor vectorises; a NaN input stays NaN.
    """
    step = z_dpo - z_rev
    if floor is not None:
        step = torch.where(z_dpo < floor, torch.clamp(step, max=0.0), step)
    z = z_dpo + alpha * step
    return torch.where((z_dpo == -_INF) | (z_rev == -_INF), -_INF, z)


def dense_teacher(z_dpo: torch.Tensor, z_other: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss's teacher over whole rows, for sampling from it: ``z_dpo``, ``z_other`` float
    ``[n, V]`` (the reverse-DPO model, or the reference for the vanilla teacher), ``config`` an
    ``AlignDistilLossConfig`` (alpha, TVD convention, plausibility guard). Returns (z* ``[n, V]``,
    alpha ``[n]``, TVD ``[n]``), the same quantities the vocab-parallel loss computes per token."""
    p_dpo, p_other = torch.softmax(z_dpo, -1), torch.softmax(z_other, -1)
    tvd = (p_dpo - p_other).abs().sum(-1) * (0.5 if config.tvd_half else 1.0)
    alpha = torch.full_like(tvd, config.constant_alpha) if config.constant_alpha is not None \
        else config.r * tvd + config.eps
    floor = None
    if config.plausibility_threshold is not None:
        floor = torch.logsumexp(z_dpo, -1, keepdim=True) + math.log(config.plausibility_threshold)
    return teacher_logits(z_dpo, z_other, alpha.unsqueeze(-1), floor), alpha, tvd


def _weighted(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """p * d, and 0 where p == 0 (masked or underflowed entries: no 0 * inf = NaN)."""
    return torch.where(p > 0, p * d, 0.0)


# --- per-chunk kernels: pure functions of float32 [c, v] chunks, fused by torch.compile ------


def _lse3_kernel(z_pol, z_dpo, z_rev):
    """Local log-sum-exps ``[c, 3]`` of the three shards."""
    return torch.stack([local_logsumexp(z.float()) for z in (z_pol, z_dpo, z_rev)], -1)


def _tvd_kernel(z_dpo, z_rev, lse_dpo, lse_rev):
    """Local partial of sum_v |p_dpo - p_rev| ``[c]`` (lse_*: global, ``[c, 1]``)."""
    return (torch.exp(z_dpo.float() - lse_dpo) - torch.exp(z_rev.float() - lse_rev)).abs().sum(-1)


def _kl_partial_kernel(z_pol, z_dpo, z_rev, alpha, lse_pol, reverse: bool, floor=None):
    """``[c, 2]``: local lse of z*, and the local KL partial sum.

    reverse: sum_v p (z_pol - z*) with the global policy normaliser;
    forward: sum_v q (z* - z_pol) with q the *locally* normalised teacher (re-weighted later).
    """
    z_pol = z_pol.float()
    z_star = teacher_logits(z_dpo.float(), z_rev.float(), alpha, floor)
    lse_star = local_logsumexp(z_star, flush=True)
    if reverse:
        part = _weighted(torch.exp(z_pol - lse_pol), z_pol - z_star).sum(-1)
    else:
        part = _weighted(flushed_exp(z_star - lse_star[:, None]), z_star - z_pol).sum(-1)
    return torch.stack([lse_star, part], -1)


def _grad_kernel(z_pol, z_dpo, z_rev, alpha, lse_pol, lse_star, total, reverse: bool, floor=None):
    """dKL/dz_pol ``[c, v]`` float32: reverse p (z_pol - z* - S); forward p - softmax(z*)."""
    z_pol = z_pol.float()
    z_star = teacher_logits(z_dpo.float(), z_rev.float(), alpha, floor)
    p = torch.exp(z_pol - lse_pol)
    if reverse:
        return _weighted(p, z_pol - z_star - total)
    return p - flushed_exp(z_star - lse_star)


def _grad_into_kernel(out, z_pol, z_dpo, z_rev, alpha, lse_pol, lse_star, total, finite, reverse: bool,
                      floor=None):
    """Writes ``_grad_kernel`` into ``out`` (a view of the saved gradient): no chunk-sized copy.
    Rows whose KL is not finite (``finite`` ``[c, 1]`` False) get a zero gradient."""
    out.copy_(torch.where(finite, _grad_kernel(z_pol, z_dpo, z_rev, alpha, lse_pol, lse_star, total, reverse,
                                               floor), 0.0))


_KERNELS = {
    "lse3": _lse3_kernel, "tvd": _tvd_kernel, "kl_partial": _kl_partial_kernel, "grad_into": _grad_into_kernel,
}


def kernels(fused: bool, variant=None) -> dict:
    """The chunk kernels, eager or fused (compiled once per process and ``variant``, lazily)."""
    return {name: compiled(fn, variant) for name, fn in _KERNELS.items()} if fused else _KERNELS


def _forward_rows(policy, dpo, rev, grad, shard: Shard, s: AlignDistilLossConfig, k: dict, chunked: bool = True):
    """Steps 1-4 for the rows ``[n, V_local]`` given, with one set of three collectives.

    ``s``: the loss settings, ``compile`` resolved to a bool; ``k``: the chunk kernels;
    ``chunked=False`` runs each step on all rows at once.
    Writes dKL/dz_pol into ``grad`` (or skips it if None). Returns kl, alpha, tvd ``[n]`` float32.
    """
    v = shard.valid
    n = policy.shape[0]
    f32 = dict(dtype=torch.float32, device=policy.device)
    if not v:  # this rank's shard is all padding
        spans = []
    elif chunked:
        spans = list(chunks(n, shard.size, s.chunk_size, streaming=s.compile))
    else:
        spans = [(0, n)]
    reverse = s.direction == "reverse"

    # 1. log-normalisers of policy, dpo and rev
    lse_local = torch.full((n, 3), -_INF, **f32)
    for b, e in spans:
        lse_local[b:e] = k["lse3"](policy[b:e, :v], dpo[b:e, :v], rev[b:e, :v])
    lse = combine_lse(all_gather_rows(lse_local, shard))  # [n, 3]
    lse_pol, lse_dpo, lse_rev = (x.unsqueeze(-1) for x in lse.unbind(-1))  # [n, 1] each

    # 2. TVD of the two teachers -> alpha
    tvd = torch.zeros(n, **f32)
    for b, e in spans:
        tvd[b:e] = k["tvd"](dpo[b:e, :v], rev[b:e, :v], lse_dpo[b:e], lse_rev[b:e])
    all_reduce_sum(tvd, shard)
    if s.tvd_half:
        tvd.mul_(0.5)
    if s.constant_alpha is not None:
        alpha = torch.full_like(tvd, float(s.constant_alpha))
    else:
        alpha = tvd * s.r + s.eps
    alpha_col = alpha.unsqueeze(-1)
    # the plausibility guard's per-row logit floor, from the DPO normaliser of step 1 (no collective)
    floor = None if s.plausibility_threshold is None else lse_dpo + math.log(s.plausibility_threshold)

    # 3. teacher log-normaliser and the KL partial sum
    partial = torch.zeros(n, 2, **f32)  # [local lse of z*, local KL partial]
    partial[:, 0] = -_INF
    for b, e in spans:
        partial[b:e] = k["kl_partial"](policy[b:e, :v], dpo[b:e, :v], rev[b:e, :v], alpha_col[b:e],
                                       lse_pol[b:e], reverse, None if floor is None else floor[b:e])
    gathered = all_gather_rows(partial, shard)  # [W, n, 2]
    lse_star = combine_lse(gathered[..., 0])
    if reverse:
        total = gathered[..., 1].sum(0)  # S = sum_v p (z_pol - z*)
        kl = total - lse_pol.squeeze(-1) + lse_star
    else:
        share = torch.exp(gathered[..., 0] - lse_star)  # each rank's share of the teacher mass
        total = _weighted(share, gathered[..., 1]).sum(0)
        kl = total - lse_star + lse_pol.squeeze(-1)

    # 4. the gradient, written into the buffer kept for backward
    if grad is not None:
        grad[:, v:] = 0  # padding entries get no gradient
        lse_star_col, total_col = lse_star.unsqueeze(-1), total.unsqueeze(-1)
        finite = (kl.abs() < _INF).unsqueeze(-1)  # False for NaN and +-inf (a comparison: Inductor-friendly)
        for b, e in spans:
            k["grad_into"](grad[b:e, :v], policy[b:e, :v], dpo[b:e, :v], rev[b:e, :v], alpha_col[b:e],
                           lse_pol[b:e], lse_star_col[b:e], total_col[b:e], finite[b:e], reverse,
                           None if floor is None else floor[b:e])
    return kl, alpha, tvd


class _AlignDistilKL(torch.autograd.Function):
    """(policy, dpo, rev) ``[N, V_local]`` -> (kl, alpha, tvd) ``[N]`` float32; grad to policy only."""

    @staticmethod
    def forward(ctx, policy, dpo, rev, shard: Shard, s: AlignDistilLossConfig):
        grad = torch.empty_like(policy) if ctx.needs_input_grad[0] else None
        if shard.collectives():
            # step-major: each step runs over all chunks before its collective (3 in total)
            step_kernels = kernels(s.compile, (s.direction, policy.dtype, s.plausibility_threshold is None))
            kl, alpha, tvd = _forward_rows(policy, dpo, rev, grad, shard, s, step_kernels)
        else:
            # one rank, no collectives: chunk-major, so a chunk's three logit rows stay in cache
            # through all four steps instead of being streamed from memory four times; compiled,
            # the four steps of a chunk are one fused kernel
            n = policy.shape[0]
            kl, alpha, tvd = (torch.empty(n, dtype=torch.float32, device=policy.device) for _ in range(3))
            run = compiled(_forward_rows, (shard, s, grad is None)) if s.compile else _forward_rows
            for b, e in chunks(n, shard.size, s.chunk_size):
                rows = slice(b, e)
                kl[rows], alpha[rows], tvd[rows] = run(
                    policy[rows], dpo[rows], rev[rows], None if grad is None else grad[rows], shard, s, _KERNELS,
                    False)
        if grad is not None:
            ctx.save_for_backward(grad)  # the only saved tensor
        ctx.mark_non_differentiable(alpha, tvd)
        return kl, alpha, tvd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl, _grad_alpha, _grad_tvd):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("this loss was already backpropagated once (its gradient buffer is reused)")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        # scaled in place: the saved buffer becomes the returned gradient (no second copy)
        return grad.mul_(grad_kl.to(grad.dtype)[:, None]), None, None, None, None


def vocab_parallel_aligndistil(
    policy_logits: torch.Tensor,
    dpo_logits: torch.Tensor,
    rev_logits: torch.Tensor,
    r: float = 15.0,
    eps: float = 1e-3,
    beta0: float = 0.1,
    token_weight: str = "beta_t",
    direction: str = "reverse",
    constant_alpha: float | None = None,
    tvd_half: bool = True,
    plausibility_threshold: float | None = None,
    vocab_size: int | None = None,
    group=None,
    chunk_size: int | None = None,
    compile: bool | None = None,
) -> AlignDistilOutput:
    """Per-token AlignDistil loss from vocab-sharded logits ``[..., V_local]`` (see module doc);
    the SPEC's keyword form of :func:`aligndistil_loss` (the fields of
    :class:`~megatron_aligndistil.config.AlignDistilLossConfig`, checked there).

    ``group`` is the TP group (None: Megatron's, if initialised, else one process).
    ``chunk_size`` is tokens per chunk (None: a per-device default, see ``vocab_parallel.chunks``).
    ``compile``: fuse the per-chunk kernels with ``torch.compile`` (None: on with CUDA).
    ``plausibility_threshold`` (tau in (0, 1), None: off): extrapolation never raises a token
    whose DPO probability is below tau (see ``teacher_logits``); no extra collective.
    Returns float32 tensors of the leading shape; backward reaches ``policy_logits`` only.
    """
    config = AlignDistilLossConfig(
        r=r, eps=eps, beta0=beta0, token_weight=token_weight, direction=direction, constant_alpha=constant_alpha,
        tvd_half=tvd_half, plausibility_threshold=plausibility_threshold, chunk_size=chunk_size, compile=compile)
    return aligndistil_loss(policy_logits, dpo_logits, rev_logits, config, vocab_size=vocab_size, group=group)


def aligndistil_loss(policy_logits: torch.Tensor, dpo_logits: torch.Tensor, rev_logits: torch.Tensor,
                     config: AlignDistilLossConfig, vocab_size: int | None = None, group=None) -> AlignDistilOutput:
    """:func:`vocab_parallel_aligndistil` with its settings in a validated config."""
    if not (policy_logits.shape == dpo_logits.shape == rev_logits.shape):
        raise ValueError(
            "policy, DPO and reverse-DPO logits must have the same shape (same tokens and vocab "
            f"shard): got {tuple(policy_logits.shape)}, {tuple(dpo_logits.shape)}, "
            f"{tuple(rev_logits.shape)}"
        )
    c = config
    lead, v_local = policy_logits.shape[:-1], policy_logits.shape[-1]
    if not isinstance(c.compile, bool):  # None: on with CUDA
        c = dataclasses.replace(c, compile=use_compile() if c.compile is None else bool(c.compile))
    flat = [t.reshape(-1, v_local) for t in (policy_logits, dpo_logits.detach(), rev_logits.detach())]
    kl, alpha, tvd = _AlignDistilKL.apply(*flat, shard_info(v_local, vocab_size, group), c)
    if c.token_weight == "beta_t":
        weight = c.beta0 / alpha
    elif c.token_weight == "vanilla":
        weight = c.beta0 / (1.0 + alpha)
    elif c.token_weight == "constant":
        weight = torch.full_like(alpha, float(c.beta0))
    else:
        weight = torch.ones_like(alpha)
    # a token whose teachers give a NaN alpha gets weight 0, so its (zero) gradient stays finite
    # when callers mask it out; its loss and KL stay NaN, visible to the caller
    weight = torch.where(alpha.abs() < _INF, weight, torch.zeros_like(weight))
    loss = weight * kl
    return AlignDistilOutput(
        loss=loss.reshape(lead), kl=kl.reshape(lead), alpha=alpha.reshape(lead),
        tvd=tvd.reshape(lead), weight=weight.reshape(lead),
    )
