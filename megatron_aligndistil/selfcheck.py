"""Checks this machine end to end: a tiny Qwen-shaped policy and two frozen teachers at several TP
layouts, one Megatron schedule step with the vocab-parallel AlignDistil loss, compared to TP1 PP1.

    python -m megatron_aligndistil.selfcheck [--layouts 1x1 2x1]

PP > 1 layouts are skipped (reported) until the trainer runs teachers in lockstep across stages.

Prints one line per layout (loss, KL, alpha, max gradient difference to TP1 PP1) and exits 1 on a
mismatch. It is the quickstart's first stage until the full pipeline lands (issue 9).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from .models.qwen import QwenArch
from .parallel import Layout
from .testing import run_distributed

TINY = QwenArch(
    model_type="qwen2", num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
    num_query_groups=2, head_dim=16, vocab_size=1000, max_position_embeddings=256, rope_theta=1e6,
    norm_eps=1e-6, qkv_bias=True, qk_layernorm=False, tie_word_embeddings=False,
)


def aligndistil_step(arch_fields, weights, tokens, response_start, num_microbatches):
    """One rank: build policy + frozen teachers, run the pipeline schedule with the AlignDistil loss.

    ``weights`` is None (make them: TP1 PP1 only) or ``{"policy"|"dpo"|"rev": full state dict}``.
    Returns losses (last stage), gathered policy gradients and the weights used.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .loss import vocab_parallel_aligndistil
    from .models import qwen, sharding

    arch = QwenArch(**arch_fields)
    config = qwen.transformer_config(arch)
    models = {}
    for i, role in enumerate(("policy", "dpo", "rev")):
        torch.manual_seed(100 + i)
        models[role] = qwen.build_model(arch, config)
        if weights is None:
            continue
        sharding.load_full_state_dict(models[role], weights[role])
    if weights is None:
        weights = {role: sharding.gather_full_state_dict(m) for role, m in models.items()}
    for role in ("dpo", "rev"):
        models[role].requires_grad_(False).eval()

    seq = tokens.shape[1] - 1
    micro = iter(tokens.chunk(num_microbatches))

    def forward_step(data_iter, model):
        batch = next(data_iter)
        inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:]
        positions = torch.arange(seq).unsqueeze(0).expand_as(inputs)
        mask = torch.zeros_like(labels, dtype=torch.float32)
        mask[:, response_start - 1:] = 1.0  # logits whose target is a response token
        policy_out = model(inputs, positions, None)
        with torch.no_grad():  # frozen teachers, same micro-batch, same stage (PP = 1 here)
            teacher_out = {role: models[role](inputs, positions, None) for role in ("dpo", "rev")}

        def loss_func(out):
            res = vocab_parallel_aligndistil(out.float(), teacher_out["dpo"].float(),
                                             teacher_out["rev"].float(), vocab_size=arch.vocab_size)
            per_seq = (res.loss * mask).sum(-1) / mask.sum(-1)
            loss = per_seq.sum() / tokens.shape[0] * num_microbatches
            stats = {"loss": loss.detach() / num_microbatches,
                     "kl": ((res.kl * mask).sum() / mask.sum()).detach() / num_microbatches,
                     "alpha": ((res.alpha * mask).sum() / mask.sum()).detach() / num_microbatches}
            return loss, stats

        return policy_out, loss_func

    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=micro, model=[models["policy"]],
        num_microbatches=num_microbatches, seq_length=seq,
        micro_batch_size=tokens.shape[0] // num_microbatches, forward_only=False,
    )
    grads = sharding.gather_full_state_dict(models["policy"], use_grad=True)
    stats = {k: float(sum(o[k] for o in out)) for k in ("loss", "kl", "alpha")} if out else None
    return {"stats": stats, "grads": grads, "weights": weights}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=["1x1", "2x1"], help="TPxPP (PP 1 for now; TP must divide the 2 KV groups)")
    args = ap.parse_args(argv)
    fields = dataclasses.asdict(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    t0 = time.time()
    ref = run_distributed(aligndistil_step, 1, args=(fields, None, tokens, 12, 2), layout=Layout(1, 1))[0]
    ok = True
    print(f"{'layout':>8} {'loss':>10} {'kl':>10} {'alpha':>8} {'max|dgrad|':>11}  seconds")
    for spec in args.layouts:
        tp, pp = (int(x) for x in spec.split("x"))
        if pp != 1:
            print(f"{spec:>8} skipped: teachers in lockstep across pipeline stages come with the trainer")
            continue
        t = time.time()
        res = run_distributed(aligndistil_step, tp * pp, args=(fields, ref["weights"], tokens, 12, 2),
                              layout=Layout(tp, pp))
        last = next(r for r in res if r["stats"] is not None)
        diff = max((res[0]["grads"][k] - g).abs().max().item() for k, g in ref["grads"].items())
        dloss = abs(last["stats"]["loss"] - ref["stats"]["loss"])
        good = diff < 1e-5 and dloss < 1e-5
        ok &= good
        s = last["stats"]
        print(f"{spec:>8} {s['loss']:10.6f} {s['kl']:10.6f} {s['alpha']:8.4f} {diff:11.2e}  "
              f"{time.time() - t:5.1f} {'ok' if good else 'MISMATCH'}")
    print(f"selfcheck {'passed' if ok else 'FAILED'} in {time.time() - t0:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
