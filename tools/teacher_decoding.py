#!/usr/bin/env python
"""Gold rate of sampling *directly from AlignDistil's teacher* z* on the gold world's held-out prompts.

    python tools/teacher_decoding.py --run-dir runs/paper --seed 1 [--samples-per-prompt 8]

A diagnostic, not a training run: for the SFT, DPO and reverse-DPO models of one seed of a
reproduction (``python -m megatron_aligndistil.eval.reproduce``), it samples responses token by
token from softmax(z*) with z* built by the loss's own ``teacher_logits`` at several constant
alphas, the TVD-adaptive alpha (r * TVD + eps), with and without the plausibility guard, and the
vanilla teacher (SFT reference in the reverse model's place). If the teacher is no better than the
DPO model, no amount of distillation makes the policy better (docs/alignment.md). One process,
transformers models (the checkpoints are exported to HF under <run-dir>/seed<N>/hf_teacher_probe).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--samples-per-prompt", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=14)
    ap.add_argument("--constant-alphas", type=float, nargs="*", default=[0.5, 1.0, 2.0])
    ap.add_argument("--r", type=float, nargs="*", default=[5.0, 15.0, 30.0], help="adaptive alpha = r * TVD + 1e-3")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.05, 0.1, 0.2], help="plausibility guard taus")
    ap.add_argument("--out", default=None, help="JSON results (default: <run-dir>/teacher_decoding_seed<N>.json)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_aligndistil.convert.hf import convert_megatron_to_hf
    from megatron_aligndistil.eval.world import judge
    from megatron_aligndistil.loss.aligndistil import teacher_logits

    seed_dir = os.path.join(args.run_dir, f"seed{args.seed}")
    models = {}
    for name in ("sft", "dpo", "rev"):
        out = os.path.join(seed_dir, "hf_teacher_probe", name)
        if not os.path.exists(os.path.join(out, "config.json")):
            convert_megatron_to_hf(os.path.join(seed_dir, name, "release"), out, progress=False, overwrite=True)
        models[name] = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(seed_dir, "hf_teacher_probe", "sft"))
    items = [json.loads(line) for line in open(os.path.join(args.run_dir, "data", "heldout_prompts.jsonl"))]
    prompts = [tok.apply_chat_template([{"role": "user", "content": it["instruction"]}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for it in items]
    k = args.samples_per_prompt

    @torch.no_grad()
    def gold_rate(teacher) -> float:
        """Sample every (prompt, k) from softmax(teacher(z_sft, z_dpo, z_rev)); mean gold."""
        g = torch.Generator().manual_seed(args.seed)
        seqs = [list(p) for p in prompts for _ in range(k)]
        outs, done = [[] for _ in seqs], [False] * len(seqs)
        for _ in range(args.max_new_tokens):
            width = max(len(s) for s in seqs)
            x = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
            last = torch.tensor([len(s) - 1 for s in seqs])
            # the tokenizer's ids only, as the trainer's loss (rows past it are embedding padding)
            z = {n: m(x).logits[torch.arange(len(seqs)), last, : len(tok)].float() for n, m in models.items()}
            nxt = torch.multinomial(torch.softmax(teacher(z["sft"], z["dpo"], z["rev"]), -1), 1, generator=g)[:, 0]
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    done[i] = t == tok.eos_token_id
                    if not done[i]:
                        outs[i].append(t)
                        seqs[i].append(t)
            if all(done):
                break
        gold = [judge(items[i // k]["instruction"], tok.decode(o, skip_special_tokens=True)) for i, o in enumerate(outs)]
        return sum(gold) / len(gold)

    def contrastive(alpha=None, r=None, tau=None, reference="rev"):
        def teacher(z_sft, z_dpo, z_rev):
            other = z_sft if reference == "ref" else z_rev
            a = alpha
            if r is not None:
                tvd = 0.5 * (torch.softmax(z_dpo, -1) - torch.softmax(other, -1)).abs().sum(-1, keepdim=True)
                a = r * tvd + 1e-3
            a = torch.as_tensor(a).reshape(-1, 1) if not torch.is_tensor(a) else a
            floor = None if tau is None else torch.logsumexp(z_dpo, -1, keepdim=True) + torch.log(torch.tensor(tau))
            return teacher_logits(z_dpo, other, a, floor)
        return teacher

    rows = [("SFT", lambda s, d, r: s), ("DPO (alpha 0)", lambda s, d, r: d)]
    rows += [(f"constant alpha {a}", contrastive(alpha=a)) for a in args.constant_alphas]
    rows += [("vanilla teacher, alpha 1 (DPO + SFT ref)", contrastive(alpha=1.0, reference="ref"))]
    rows += [(f"adaptive r {r}", contrastive(r=r)) for r in args.r]
    for tau in args.thresholds:
        rows += [(f"constant alpha 1.0, guard {tau}", contrastive(alpha=1.0, tau=tau)),
                 (f"adaptive r 15, guard {tau}", contrastive(r=15.0, tau=tau)),
                 (f"adaptive r 5, guard {tau}", contrastive(r=5.0, tau=tau))]
    results = {}
    for label, teacher in rows:
        results[label] = gold_rate(teacher)
        print(f"{label:<42} gold {results[label]:.3f}", flush=True)
    out = args.out or os.path.join(args.run_dir, f"teacher_decoding_seed{args.seed}.json")
    with open(out, "w") as f:
        json.dump({"samples": len(prompts) * k, "gold": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
