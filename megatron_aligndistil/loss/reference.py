"""Dense single-process reference of AlignDistil, written from the paper's equations: plain torch
over whole vocabulary rows, float64 by default. The tests check the vocab-parallel loss against it
(values and gradients) and ``tools/bench_loss.py`` times it as the naive baseline (all-gathered
rows, float32), as Liger-Kernel keeps one reference per kernel for both."""

import torch

from ..config import AlignDistilLossConfig


def dense_aligndistil(zp, zd, zr, config: AlignDistilLossConfig | None = None, *, vocab_size=None,
                      dtype=torch.float64, **settings):
    """Full-vocab logits ``[..., V]`` -> dict of per-token ``dtype`` tensors (loss, kl, alpha, tvd).

    The settings are ``config``'s, or the keywords of :class:`AlignDistilLossConfig` (the loss's
    own, so the reference cannot drift from them); ``chunk_size`` and ``compile`` do not apply."""
    c = config if config is not None else AlignDistilLossConfig(**settings)
    r, eps, beta0, token_weight, direction = c.r, c.eps, c.beta0, c.token_weight, c.direction
    constant_alpha, tvd_half, plausibility_threshold = c.constant_alpha, c.tvd_half, c.plausibility_threshold
    v = vocab_size or zp.shape[-1]
    zp, zd, zr = (z[..., :v].to(dtype) for z in (zp, zd, zr))
    teacher_mask = torch.isneginf(zd) | torch.isneginf(zr)
    p_dpo, p_rev = torch.softmax(zd, -1), torch.softmax(zr, -1)
    tvd = (p_dpo - p_rev).abs().sum(-1) * (0.5 if tvd_half else 1.0)
    alpha = torch.full_like(tvd, constant_alpha) if constant_alpha is not None else r * tvd + eps
    a = alpha.detach().unsqueeze(-1)
    step = zd - zr
    if plausibility_threshold is not None:  # never raise a token with p_dpo < tau
        step = torch.where(p_dpo < plausibility_threshold, step.clamp(max=0), step)
    z_star = torch.where(teacher_mask, torch.full_like(zd, -torch.inf), zd + a * step)  # Eq. 17
    log_pol, log_star = torch.log_softmax(zp, -1), torch.log_softmax(z_star, -1)
    if direction == "reverse":  # KL(pi_theta || pi*)
        p = log_pol.exp()
        kl = torch.where(p > 0, p * (log_pol - log_star), torch.zeros_like(p)).sum(-1)
    else:  # KL(pi* || pi_theta)
        q = log_star.exp()
        kl = torch.where(q > 0, q * (log_star - log_pol), torch.zeros_like(q)).sum(-1)
    if token_weight == "beta_t":
        weight = beta0 / alpha
    elif token_weight == "vanilla":  # beta = beta0 / w with alpha = w - 1 (Eq. 11)
        weight = beta0 / (1 + alpha)
    elif token_weight == "constant":
        weight = torch.full_like(alpha, beta0)
    else:
        weight = torch.ones_like(alpha)
    return {"loss": weight * kl, "kl": kl, "alpha": alpha, "tvd": tvd}
