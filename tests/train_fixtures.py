"""A tiny AlignDistil setup on disk: three converted random Qwen2 models and tokenized data."""

import json
import os

import torch

from hf_fixtures import save_tiny_hf


def make_distill_data(path, n=24, vocab=1001, seed=0, max_prompt=8, max_response=9):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p = torch.randint(0, vocab, (int(torch.randint(2, max_prompt, (1,), generator=g)),), generator=g)
            r = torch.randint(0, vocab, (int(torch.randint(1, max_response, (1,), generator=g)),), generator=g)
            f.write(json.dumps({"prompt_ids": p.tolist(), "response_ids": r.tolist()}) + "\n")
    return path


def float64_hf(path):
    """The HF model at ``path`` in float64, eval mode; MoE experts run eagerly (transformers'
    grouped matmul has no float64)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    if model.config.model_type.endswith("_moe"):
        model.set_experts_implementation("eager")
    return model


def dense_first_iteration(setup, global_batch=8, seed=1234, vocab=None):
    """Iteration 1 from the HF models in float64: the paper's loss (mean over sequences of the
    token mean), the norm of its gradient w.r.t. the policy's parameters, and the logged metrics
    (kl, alpha, tvd: means over all response tokens of the global batch). ``vocab``: only ids
    below it carry probability (the logits are cut there)."""
    from megatron_aligndistil.loss.reference import dense_aligndistil
    from megatron_aligndistil.data.batching import global_batch_indices

    records = [json.loads(line) for line in open(setup["data"])]
    batch = [records[i] for i in global_batch_indices(len(records), 0, global_batch, seed)]
    models = {r: float64_hf(setup[f"hf_{r}"]) for r in ("policy", "dpo", "rev")}
    per_seq, sums, tokens = [], {"kl": 0.0, "alpha": 0.0, "tvd": 0.0}, 0
    for rec in batch:
        ids = torch.tensor([rec["prompt_ids"] + rec["response_ids"]])
        zp = models["policy"](ids[:, :-1]).logits[0, :, :vocab]
        with torch.no_grad():
            zd, zr = (models[r](ids[:, :-1]).logits[0, :, :vocab] for r in ("dpo", "rev"))
        out = dense_aligndistil(zp, zd, zr)
        start = len(rec["prompt_ids"]) - 1  # logits whose target is the first response token
        per_seq.append(out["loss"][start:].mean())
        for k in sums:
            sums[k] += float(out[k][start:].detach().sum())
        tokens += len(rec["response_ids"])
    loss = torch.stack(per_seq).mean()
    loss.backward()
    grad_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in models["policy"].parameters())))
    return {"loss": float(loss), "grad_norm": grad_norm, "tokens": tokens, **{k: v / tokens for k, v in sums.items()}}


def dense_routing(setup, global_batch=8, micro_batch=2, seed=1234) -> dict:
    """The policy's routing metrics of iteration 1 from the HF MoE model in float64 (see
    megatron_aligndistil/train/routing.py): Megatron's switch balancing loss ``E sum_e f_e P_e /
    (k T^2)`` per micro-batch of ``micro_batch`` sequences (T its tokens, f_e tokens routed to
    expert e, P_e the summed softmax scores), its mean over micro-batches then MoE layers; and per
    layer max over mean of the tokens routed to each expert over the global batch."""
    from megatron_aligndistil.data.batching import global_batch_indices

    records = [json.loads(line) for line in open(setup["data"])]
    batch = [records[i] for i in global_batch_indices(len(records), 0, global_batch, seed)]
    model = float64_hf(setup["hf_policy"])
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    with torch.no_grad():  # per record: a tuple over MoE layers of router logits [tokens, E]
        logits = [model(torch.tensor([(r["prompt_ids"] + r["response_ids"])[:-1]]), output_router_logits=True)
                  .router_logits for r in batch]
    losses, loads = [], []
    for layer in range(len(logits[0])):
        per_mb = []
        load = torch.zeros(experts, dtype=torch.float64)
        for lo in range(0, global_batch, micro_batch):
            scores = torch.softmax(torch.cat([x[layer] for x in logits[lo:lo + micro_batch]]).double(), -1)
            routed = torch.zeros_like(scores).scatter(1, scores.topk(k, -1).indices, 1.0).sum(0)
            tokens = scores.shape[0]
            per_mb.append(float(experts * (routed * scores.sum(0)).sum() / (k * tokens * tokens)))
            load += routed
        losses.append(sum(per_mb) / len(per_mb))
        loads.append(float(load.max() / load.mean()))
    return {"moe_load_balancing_loss": sum(losses) / len(losses), "moe_expert_load_max_mean": sum(loads) / len(loads),
            "moe_expert_load_max_mean_worst": max(loads)}


def _policy(setup):
    return float64_hf(setup["hf_policy"]).train()


def _grad_norm(model) -> float:
    return float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)))


def dense_sft(setup, global_batch=8, seed=1234) -> dict:
    """SFT's iteration 1 in float64: mean over sequences of the mean response-token NLL; its gradient norm."""
    from megatron_aligndistil.data.batching import global_batch_indices

    records = [json.loads(line) for line in open(setup["data"])]
    model = _policy(setup)
    losses = []
    for i in global_batch_indices(len(records), 0, global_batch, seed):
        r = records[i]
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        logp = torch.log_softmax(model(ids[:, :-1]).logits[0], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        losses.append(-logp[len(r["prompt_ids"]) - 1:].mean())
    loss = torch.stack(losses).mean()
    loss.backward()
    return {"loss": loss.item(), "grad_norm": _grad_norm(model)}


def dense_dpo(setup, beta=0.1, global_batch=8, seed=1234) -> dict:
    """DPO's iteration 1 in float64 (reference: the "dpo" model); its gradient norm."""
    import torch.nn.functional as F

    from megatron_aligndistil.data.batching import global_batch_indices

    records = [json.loads(line) for line in open(setup["pairs"])]
    policy = _policy(setup)
    ref = float64_hf(setup["hf_dpo"])

    def logp(model, prompt, response):
        ids = torch.tensor([prompt + response])
        lp = torch.log_softmax(model(ids[:, :-1]).logits[0], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        return lp[len(prompt) - 1:].sum()

    losses = []
    for i in global_batch_indices(len(records), 0, global_batch, seed):
        r = records[i]
        with torch.no_grad():
            ref_margin = logp(ref, r["prompt_ids"], r["chosen_ids"]) - logp(ref, r["prompt_ids"], r["rejected_ids"])
        margin = logp(policy, r["prompt_ids"], r["chosen_ids"]) - logp(policy, r["prompt_ids"], r["rejected_ids"])
        losses.append(-F.logsigmoid(beta * (margin - ref_margin)))
    loss = torch.stack(losses).mean()
    loss.backward()
    return {"loss": loss.item(), "grad_norm": _grad_norm(policy)}


def make_aligndistil_setup(root, tied=False, model_type="qwen2", **model):
    """Returns {"policy"|"dpo"|"rev": converted dir, "hf_*": HF dir, "data": jsonl}. ``model``:
    :func:`hf_fixtures.tiny_hf_model` overrides (e.g. ``hidden_size``)."""
    from megatron_aligndistil.convert.hf import convert_hf_to_megatron

    out = {}
    for seed, role in enumerate(("policy", "dpo", "rev")):
        hf_dir = os.path.join(root, f"hf_{role}")
        save_tiny_hf(hf_dir, model_type, tied=tied, seed=seed, **model)
        out[f"hf_{role}"] = hf_dir
        out[role] = convert_hf_to_megatron(hf_dir, os.path.join(root, role), progress=False)
    out["data"] = make_distill_data(os.path.join(root, "data.jsonl"))
    out["data_indexed"] = write_indexed(out["data"], "distill", vocab=1001)
    return out


def write_indexed(jsonl, kind, vocab):
    """The records of ``jsonl`` as a Megatron indexed dataset beside it; returns its prefix."""
    from megatron_aligndistil.data.indexed import IndexedWriter

    prefix = jsonl[: -len(".jsonl")] + "_indexed"
    writer = IndexedWriter(prefix, kind, vocab)
    for line in open(jsonl):
        writer.add(json.loads(line))
    writer.commit()
    return prefix


def make_setup_with_pairs(root, **model):
    """:func:`make_aligndistil_setup` plus preference pairs (``"pairs"``) for DPO."""
    out = make_aligndistil_setup(root, **model)
    out["pairs"] = make_dpo_data(os.path.join(root, "pairs.jsonl"))
    return out


def aligndistil_argv(setup, save, *extra, iters=5):
    return ["aligndistil", "--load", setup["policy"], "--dpo-load", setup["dpo"], "--rev-load", setup["rev"],
            "--data-path", setup["data"], "--save", save, "--global-batch-size", "8",
            "--micro-batch-size", "2", "--seq-length", "24", "--lr", "1e-3", "--min-lr", "1e-4",
            "--lr-warmup-fraction", "0.2", "--train-iters", str(iters), "--no-progress", *extra]


def run_train(argv):
    """Inside a run_distributed rank: the training entry point; returns its exit code."""
    from megatron_aligndistil.train import main

    return main(argv)


def make_dpo_data(path, n=16, vocab=1001, seed=1):
    """Pairs whose chosen responses come from a low-id 'style' and rejected from a high-id one,
    so a model can learn the preference quickly."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p = torch.randint(0, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
            c = torch.randint(0, vocab // 2, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
            r = torch.randint(vocab // 2, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
            f.write(json.dumps({"prompt_ids": p.tolist(), "chosen_ids": c.tolist(),
                                "rejected_ids": r.tolist()}) + "\n")
    return path


def dpo_argv(setup, save, *extra, iters=4):
    return ["dpo", "--load", setup["policy"], "--data-path", setup["pairs"], "--save", save,
            "--global-batch-size", "8", "--micro-batch-size", "2", "--seq-length", "16", "--lr", "2e-3",
            "--train-iters", str(iters), "--no-progress", "--dpo-beta", "0.1", *extra]


def sft_argv(setup, save, *extra, iters=1):
    return ["sft", "--load", setup["policy"], "--data-path", setup["data"], "--save", save,
            "--global-batch-size", "8", "--micro-batch-size", "2", "--seq-length", "24", "--lr", "1e-3",
            "--train-iters", str(iters), "--no-progress", "--no-export", *extra]


def launch_train(argv, nproc=1, timeout=300):
    """The trainer as a user runs it: ``python -m megatron_aligndistil.train`` (one process) or
    ``torchrun --nproc-per-node N -m megatron_aligndistil.train`` (N > 1). Returns the
    CompletedProcess; a user error exits 2 (torchrun itself then exits 1)."""
    import subprocess
    import sys

    from megatron_aligndistil.core.parallel import free_port

    cmd = [sys.executable, "-m", "megatron_aligndistil.train", *argv]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), "-m", "megatron_aligndistil.train", *argv]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
